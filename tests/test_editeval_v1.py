"""Tests for the EditEval v1 loader against the shared (incomplete) copy of the dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import HUMAN_NAMES, MISSING_IDS, link_tasks, write_prompts

from editeval.data.editeval_v1 import (
    EXPECTED_BLOCKS,
    PROMPTS_FILE,
    load_editeval_v1,
    read_prompts,
    scan_images,
)
from editeval.data.samples import TASKS, DatasetError

def test_scan_images_shared_copy(shared: Path) -> None:
    found = scan_images(shared)
    assert list(found) == list(TASKS)
    assert sum(len(v) for v in found.values()) == 42
    assert {t: len(v) for t, v in found.items()} == {
        "object_addition": 6,
        "object_replacement": 6,
        "object_removal": 7,
        "background_change": 7,
        "style_change": 6,
        "texture_change": 6,
        "action_change": 4,
    }
    absent = [
        f"{t}/{k}" for t in TASKS for k in range(1, EXPECTED_BLOCKS[t] + 1) if k not in found[t]
    ]
    assert absent == MISSING_IDS


def test_scan_images_ignores_stray_files_and_accepts_corrected_folder(tmp_path: Path) -> None:
    folder = tmp_path / "object_removal"
    folder.mkdir()
    for name in ("1.JPG", "2.png", "6_src.jpg", "notes.txt", "3.txt"):
        (folder / name).write_bytes(b"x")
    assert scan_images(tmp_path) == {"object_removal": [1, 2]}


def test_load_with_spreadsheet(shared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = link_tasks(shared, tmp_path / "editeval_v1")
    write_prompts(root / PROMPTS_FILE)
    assert {t: len(rows) for t, rows in read_prompts(root / PROMPTS_FILE).items()} == EXPECTED_BLOCKS

    with caplog.at_level(logging.WARNING, logger="editeval.data.editeval_v1"):
        ds = load_editeval_v1(root)
    assert len(ds) == 42
    assert ds.missing == MISSING_IDS
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(i in warnings[0].getMessage() for i in MISSING_IDS)
    assert ds.tasks() == list(TASKS)

    by_id = {s.id: s for s in ds.samples}
    s = by_id["object_removal/4"]
    assert s.task == "object_removal"
    assert s.image_path.as_posix().endswith("object_removel/4.jpeg")
    assert (s.source_prompt, s.target_prompt, s.instruction) == (
        "src object_removal 4",
        "tgt object_removal 4",
        "ins object_removal 4",
    )
    assert all(s.source_prompt == f"src {s.task} {s.id.split('/')[1]}" for s in ds.samples)

    assert [s.id for s in ds.select(tasks=["action_change"])] == [f"action_change/{k}" for k in range(1, 5)]
    assert ds.select(limit=3) == ds.samples[:3]
    assert [s.id for s in ds.select(limit=3)] == ["object_addition/1", "object_addition/3", "object_addition/5"]
    with pytest.raises(DatasetError, match="object_removel.*valid tasks"):
        ds.select(tasks=["object_removel"])


def test_explicit_prompts_file(shared: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "elsewhere.xlsx")
    ds = load_editeval_v1(shared, prompts_file=prompts)
    assert len(ds) == 42 and len(ds.missing) == 8


def test_missing_spreadsheet_is_explained(shared: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_editeval_v1(shared)
    message = str(err.value)
    assert PROMPTS_FILE in message and "prompts" in message and str(shared) in message


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_editeval_v1(tmp_path / "nope")
    with pytest.raises(DatasetError, match="none of the EditEval v1 task folders"):
        load_editeval_v1(tmp_path)


def test_spreadsheet_without_header(tmp_path: Path) -> None:
    names = {t: t for t in TASKS}  # canonical spelling, not the original typo
    blocks = read_prompts(write_prompts(tmp_path / "p.xlsx", header=False, names=names))
    assert {t: len(rows) for t, rows in blocks.items()} == EXPECTED_BLOCKS
    assert blocks["object_addition"][0] == ("src object_addition 1", "tgt object_addition 1", "ins object_addition 1")


def test_unrecognised_task_name(tmp_path: Path) -> None:
    names = dict(HUMAN_NAMES, style_change="Colour Change")
    with pytest.raises(DatasetError, match="Colour Change"):
        read_prompts(write_prompts(tmp_path / "p.xlsx", names=names))


def test_corrupt_spreadsheet(tmp_path: Path) -> None:
    bad = tmp_path / "broken.xlsx"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DatasetError, match="broken.xlsx"):
        read_prompts(bad)
