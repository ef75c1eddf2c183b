"""Tests for the EditEval v1 loader against the shared (incomplete) copy of the dataset and its
original prompts spreadsheet, ``../shared/data/editeval_v1/editing_prompts_collection.xlsx``."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import HUMAN_NAMES, MISSING_IDS, link_tasks, write_prompts
from openpyxl import Workbook, load_workbook

from editeval.data.editeval_v1 import (
    EXPECTED_BLOCKS,
    PROMPTS_FILE,
    TASK_FOLDERS,
    load_editeval_v1,
    read_prompts,
    scan_images,
)
from editeval.core.samples import TASKS, DatasetError

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


def test_missing_spreadsheet_is_explained(shared: Path, tmp_path: Path) -> None:
    root = link_tasks(shared, tmp_path / "editeval_v1")  # the task folders without the spreadsheet
    with pytest.raises(DatasetError) as err:
        load_editeval_v1(root)
    message = str(err.value)
    assert PROMPTS_FILE in message and "prompts" in message and str(root.resolve()) in message


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_editeval_v1(tmp_path / "nope")
    with pytest.raises(DatasetError, match="none of the EditEval v1 task folders"):
        load_editeval_v1(tmp_path)


def test_synthetic_spreadsheet_in_the_release_layout(tmp_path: Path) -> None:
    names = {t: t for t in TASKS}  # canonical spelling, not the original typo
    blocks = read_prompts(write_prompts(tmp_path / "p.xlsx", names=names))
    assert {t: len(rows) for t, rows in blocks.items()} == EXPECTED_BLOCKS
    assert blocks["object_addition"][0] == ("src object_addition 1", "tgt object_addition 1", "ins object_addition 1")
    assert blocks["action_change"][3] == ("src action_change 4", "tgt action_change 4", "ins action_change 4")


def test_unrecognised_task_name(tmp_path: Path) -> None:
    names = dict(HUMAN_NAMES, style_change="Colour Change")
    with pytest.raises(DatasetError, match="Colour Change"):
        read_prompts(write_prompts(tmp_path / "p.xlsx", names=names))


def test_corrupt_spreadsheet(tmp_path: Path) -> None:
    bad = tmp_path / "broken.xlsx"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DatasetError, match="broken.xlsx"):
        read_prompts(bad)


# --- the original spreadsheet ------------------------------------------------------------------

# (source prompt, target prompt, instruction), copied word for word from the original
# editing_prompts_collection.xlsx: at least one sample of every task, including object_addition/3
# (a plant, a lamp and a clock on the wall) and the last rows of the first and last blocks.
REAL_PROMPTS: dict[str, tuple[str, str, str]] = {
    "object_addition/1": (
        "A deserted highway near snow mountains under a partly cloudy sky",
        "A red car on a deserted highway near snow mountains under a partly cloudy sky",
        "Add a red car on the deserted highway",
    ),
    "object_addition/3": (
        "A plant near a lamp on a table with a wooden clock on the wall",
        "A book on the table near a plant and a lamp with a wooden clock on the wall",
        "Add a book on the table near the plant",
    ),
    "object_addition/8": (
        "A camel walking on a desert",
        "A flamingo standing on a camel walking on a desert",
        "Add a flamingo on top of the camel",
    ),
    "object_replacement/1": (
        "A llama toy standing next to a potted plant in a cozy room",
        "A floor lamp standing next to a potted plant in a cozy room",
        "Replace the llama toy with a floor lamp",
    ),
    "object_removal/4": (
        "A person sitting at the seaside with rocks",
        "A seaside with rocks",
        "Remove the person",
    ),
    "background_change/6": (
        "A white fox sitting on a snowland",
        "A white fox sitting on a beach",
        "Change the snowland to a beach",
    ),
    "style_change/3": (
        "A cityscape with skyscrapers and a park",
        "A cyberpunk style of a cityscape with skyscrapers and a park",
        "Transform it to the cyberpunk style",
    ),
    "texture_change/6": (
        "A black church",
        "An ice church",
        "Turn the church into an ice one",
    ),
    "action_change/4": (
        "A bird on the tree",
        "A bird is flying over the tree",
        "Let the bird fly",
    ),
}

FOLDER_TASKS = {folder: task for task, folder in TASK_FOLDERS.items()}


@pytest.fixture(scope="module")
def real_prompts(shared: Path) -> Path:
    """The original prompts spreadsheet in the shared copy; skips the test when it is absent."""
    path = shared / PROMPTS_FILE
    if not path.is_file():
        pytest.skip(f"original EditEval v1 spreadsheet not found at {path}")
    return path


def sheet_prompts(path: Path) -> dict[str, tuple[str, str, str]]:
    """Sample id -> columns B-D of its row, read straight from the sheet without the loader:
    the release has the header on row 1 and the 50 sample rows on rows 2-51, in task order."""
    ids = [f"{task}/{k}" for task, count in EXPECTED_BLOCKS.items() for k in range(1, count + 1)]
    sheet = load_workbook(path).worksheets[0]
    rows = sheet.iter_rows(min_row=2, max_row=51, min_col=2, max_col=4, values_only=True)
    return dict(zip(ids, (tuple(row) for row in rows), strict=True))


def test_real_spreadsheet_reads_all_50_rows(real_prompts: Path) -> None:
    blocks = read_prompts(real_prompts)
    assert list(blocks) == list(TASKS)
    assert {t: len(rows) for t, rows in blocks.items()} == EXPECTED_BLOCKS
    assert sum(len(rows) for rows in blocks.values()) == 50
    # the header row is not a sample
    assert not any("Source Prompt" in cell for rows in blocks.values() for row in rows for cell in row)
    by_id = {f"{t}/{k}": row for t, rows in blocks.items() for k, row in enumerate(rows, start=1)}
    assert by_id == sheet_prompts(real_prompts)
    for sample_id, expected in REAL_PROMPTS.items():
        assert by_id[sample_id] == expected, sample_id


def test_real_dataset_pairs_each_image_with_its_own_prompts(
    shared: Path, real_prompts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="editeval.data.editeval_v1"):
        ds = load_editeval_v1(shared)
    assert len(ds) == 42
    assert ds.missing == MISSING_IDS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(i in warnings[0] for i in MISSING_IDS)  # only the absent images

    expected = sheet_prompts(real_prompts)
    for sample in ds.samples:
        assert sample.id == f"{FOLDER_TASKS[sample.image_path.parent.name]}/{sample.image_path.stem}"
        assert (sample.source_prompt, sample.target_prompt, sample.instruction) == expected[sample.id]
    by_id = {s.id: s for s in ds.samples}
    for sample_id, prompts in REAL_PROMPTS.items():
        sample = by_id[sample_id]
        assert (sample.source_prompt, sample.target_prompt, sample.instruction) == prompts, sample_id
    assert by_id["object_addition/3"].image_path.name == "3.jpg"
    assert by_id["object_removal/4"].image_path.as_posix().endswith("object_removel/4.jpeg")
    assert sorted(ds.missing + list(by_id)) == sorted(expected)


# --- layouts the loader refuses ------------------------------------------------------------------


def write_sheet(path: Path, rows: list[list[str | None]]) -> Path:
    wb = Workbook()
    ws = wb.active
    for row in rows:
        ws.append(row)
    wb.save(path)
    return path


def release_rows(sizes: dict[str, int] = EXPECTED_BLOCKS) -> list[list[str | None]]:
    """Rows in the release's layout with ``sizes`` rows per block (the release's by default)."""
    first = next(iter(sizes))
    rows: list[list[str | None]] = [[HUMAN_NAMES[first], "Source Prompt", "Target Prompt", "Instruction"]]
    for task, count in sizes.items():
        for k in range(1, count + 1):
            label = HUMAN_NAMES[task] if k == 1 and task != first else None
            rows.append([label, f"src {task} {k}", f"tgt {task} {k}", f"ins {task} {k}"])
    return rows


def refusal(path: Path) -> str:
    """The message of the DatasetError that reading ``path`` raises; one line, naming the file."""
    with pytest.raises(DatasetError) as err:
        read_prompts(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_release_rows_helper_reads(tmp_path: Path) -> None:
    blocks = read_prompts(write_sheet(tmp_path / "p.xlsx", release_rows()))
    assert {t: len(rows) for t, rows in blocks.items()} == EXPECTED_BLOCKS


def test_spreadsheet_without_header_is_refused(shared: Path, tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.xlsx", header=False)  # "Object Addition" beside sample 1
    message = refusal(path)
    assert "row 1: expected the header Object Addition | Source Prompt | Target Prompt | Instruction" in message
    assert "src object_addition 1" in message

    root = link_tasks(shared, tmp_path / "editeval_v1")
    write_prompts(root / PROMPTS_FILE, header=False)
    with pytest.raises(DatasetError, match="row 1: expected the header"):
        load_editeval_v1(root)  # refused, not loaded with shifted prompts


def test_header_in_its_own_row_is_refused(tmp_path: Path) -> None:
    # the layout an earlier loader assumed: a header row, then "Object Addition" beside sample 1
    samples = release_rows()[1:]
    samples[0][0] = HUMAN_NAMES["object_addition"]
    rows = [["Editing Type", "Source Prompt", "Target Prompt", "Instruction"], *samples]
    message = refusal(write_sheet(tmp_path / "p.xlsx", rows))
    assert "row 1: column A of the header holds 'Editing Type'; expected 'Object Addition'" in message


@pytest.mark.parametrize(
    ("before", "after", "row"),
    [
        ([["EditEval v1 prompts", None, None, None]], [], 2),  # a title row above the header
        ([[None, None, None, None], [None, None, None, None]], [], 3),  # blank rows above it
        ([], [[None, "Source Prompt", "Target Prompt", "Instruction"]], 52),  # repeated below
    ],
    ids=["title-row-above", "blank-rows-above", "repeated-below"],
)
def test_header_on_another_row_is_refused(tmp_path: Path, before: list, after: list, row: int) -> None:
    rows = release_rows()
    if before:
        rows = before + rows
    message = refusal(write_sheet(tmp_path / "p.xlsx", rows + after))
    assert f"row {row}: the column names" in message
    assert "row 1" in message  # says where the release has them


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        (dict(EXPECTED_BLOCKS, object_replacement=7),
         "row 17: the object_replacement block has 7 sample rows (10-16); the release has 8 rows, 10-17"),
        (dict(EXPECTED_BLOCKS, object_addition=9),
         "row 10: the object_addition block has 9 sample rows (2-10); the release has 8 rows, 2-9"),
        (dict(EXPECTED_BLOCKS, action_change=5),
         "row 52: the action_change block has 5 sample rows (48-52); the release has 4 rows, 48-51"),
        ({t: n for t, n in EXPECTED_BLOCKS.items() if t != "action_change"},
         "row 48: the sheet ends before the action_change block; the release has it on the next 4 rows, 48-51"),
        ({**{t: n for t, n in EXPECTED_BLOCKS.items() if t not in ("texture_change", "action_change")},
          "action_change": 4, "texture_change": 6},
         "row 42: action_change block where the release has texture_change (6 rows, 42-47)"),
    ],
    ids=["short-block", "long-first-block", "long-last-block", "missing-block", "swapped-blocks"],
)
def test_block_of_wrong_size_or_order_is_refused(tmp_path: Path, sizes: dict[str, int], expected: str) -> None:
    assert expected in refusal(write_sheet(tmp_path / "p.xlsx", release_rows(sizes)))


def test_block_size_error_stops_the_load(shared: Path, tmp_path: Path) -> None:
    root = link_tasks(shared, tmp_path / "editeval_v1")
    write_sheet(root / PROMPTS_FILE, release_rows(dict(EXPECTED_BLOCKS, object_addition=9)))
    with pytest.raises(DatasetError, match=r"editing_prompts_collection\.xlsx, row 10: the object_addition block"):
        load_editeval_v1(root)


def test_blank_row_inside_the_blocks_is_refused(tmp_path: Path) -> None:
    rows = release_rows()
    rows.insert(29, [None, None, None, None])  # becomes row 30, inside background_change
    assert "row 30: no prompts in columns B-D" in refusal(write_sheet(tmp_path / "p.xlsx", rows))


def test_trailing_empty_rows_are_ignored(tmp_path: Path) -> None:
    rows = release_rows() + [[None, None, None, None]] * 5
    assert sum(map(len, read_prompts(write_sheet(tmp_path / "p.xlsx", rows)).values())) == 50


# --- the benchmark on the real images and prompts ------------------------------------------------


@pytest.fixture
def one_torch_thread():
    """One torch CPU thread for the test (restored after): on a busy machine torch's threads slow
    each other down by orders of magnitude (README), and this test runs 84 edits in-process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_bench_runs_all_42_images_with_their_own_prompts(
    shared: Path, real_prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    from typer.testing import CliRunner

    import editeval.bench.execute as execute
    from editeval.cli import app

    requests: list[tuple[str, str, tuple[str, str, str]]] = []  # (method, sample id, prompts)
    original_edit = execute.edit

    def recording_edit(request, method, *args, **kwargs):
        image = Path(request.image)
        sample_id = f"{FOLDER_TASKS[image.parent.name]}/{image.stem}"
        requests.append((method, sample_id,
                         (request.source_prompt, request.target_prompt, request.instruction)))
        return original_edit(request, method, *args, **kwargs)

    monkeypatch.setattr(execute, "edit", recording_edit)  # the bench's executor edits through it
    out = tmp_path / "run"
    started = time.perf_counter()
    result = CliRunner().invoke(app, [
        "bench", "--dataset", "editeval-v1", "--data-dir", str(shared),
        "--methods", "sdedit,instructpix2pix", "--model", "tiny", "--out", str(out),
        "--set", "sdedit.num_inference_steps=4", "--set", "instructpix2pix.num_inference_steps=4",
    ])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    print(f"editeval bench on EditEval v1, 84 tiny jobs: {seconds:.1f} s")

    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute("SELECT job_id, method, sample_id, task, status FROM results").fetchall()
    assert len(rows) == 84 and len({job_id for job_id, *_ in rows}) == 84
    assert sum(status == "done" for *_, status in rows) == 84
    assert sum(status == "failed" for *_, status in rows) == 0
    present = sorted(set(sheet_prompts(real_prompts)) - set(MISSING_IDS))
    assert len(present) == 42
    for method in ("sdedit", "instructpix2pix"):
        ids = [sample_id for _, m, sample_id, _, _ in rows if m == method]
        assert len(ids) == 42 and sorted(set(ids)) == present
    assert all(sample_id.split("/")[0] == task for _, _, sample_id, task, _ in rows)

    # every edit got its own image's prompts
    expected = sheet_prompts(real_prompts)
    assert len(requests) == 84
    assert sorted((m, i) for m, i, _ in requests) == sorted((m, i) for _, m, i, _, _ in rows)
    for method, sample_id, prompts in requests:
        assert prompts == expected[sample_id], (method, sample_id)
        if sample_id in REAL_PROMPTS:
            assert prompts == REAL_PROMPTS[sample_id]
