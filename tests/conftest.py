"""Shared test fixtures: the EditEval v1 copy in ../shared, a synthetic prompts spreadsheet in the
original layout (recognisable per-row prompts; tests of the real spreadsheet read the shared copy's
own file), and the tiny offline pipelines."""

from __future__ import annotations

import os

# One torch CPU thread unless the caller chose otherwise (subprocesses inherit it): torch's threads
# wait on each other, and with one of 2 cores busy with other work two toy-model tests took 30 s on
# 1 thread but had not finished after 19 min on 2 (the whole suite: 4 min against 76). torch reads
# the variable when first imported; set_num_threads covers a torch that a plugin imported earlier.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from openpyxl import Workbook  # noqa: E402

from editeval.data.editeval_v1 import EXPECTED_BLOCKS, PROMPTS_FILE, TASK_FOLDERS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "editeval_v1"

MISSING_IDS = [
    "object_addition/2",
    "object_addition/4",
    "object_replacement/2",
    "object_replacement/8",
    "object_removal/2",
    "background_change/8",
    "style_change/1",
    "style_change/2",
]

HUMAN_NAMES = {
    "object_addition": "Object Addition",
    "object_replacement": "object_replacement",
    "object_removal": "Object Removel",
    "background_change": "Background-Change",
    "style_change": "STYLE CHANGE",
    "texture_change": "Texture Change ",
    "action_change": "action change",
}


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared EditEval v1 image copy; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared EditEval v1 copy not found at {SHARED}")
    return SHARED


def write_prompts(path: Path, header: bool = True, names: dict[str, str] = HUMAN_NAMES) -> Path:
    """Write a prompts spreadsheet in the original layout with recognisable per-row prompts
    ("src <task> <k>", ...): row 1 holds the first task's label beside the column names, the
    50 sample rows follow, and column A names each later task on its block's first row.
    ``header=False`` leaves row 1 out (the first task's label moves to its first sample row),
    a layout the loader refuses."""
    wb = Workbook()
    ws = wb.active
    first = next(iter(EXPECTED_BLOCKS))
    if header:
        ws.append([names[first], "Source Prompt", "Target Prompt", "Instruction"])
    for task, count in EXPECTED_BLOCKS.items():
        for k in range(1, count + 1):
            label = names[task] if k == 1 and not (header and task == first) else None
            ws.append([label, f"src {task} {k}", f"tgt {task} {k}", f"ins {task} {k}"])
    wb.save(path)
    return path


def link_tasks(shared: Path, dest: Path) -> Path:
    """Create ``dest`` holding symlinks to the seven real task folders."""
    dest.mkdir()
    for folder in TASK_FOLDERS.values():
        (dest / folder).symlink_to(shared / folder, target_is_directory=True)
    return dest



@pytest.fixture(scope="session")
def editeval_v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder: the 7 real task folders (symlinked) and a spreadsheet in the original layout."""
    if not SHARED.is_dir():
        pytest.skip(f"shared EditEval v1 copy not found at {SHARED}")
    root = link_tasks(SHARED, tmp_path_factory.mktemp("v1") / "editeval_v1")
    write_prompts(root / PROMPTS_FILE)
    return root


@pytest.fixture(scope="session")
def tiny_sd():
    """The tiny text-to-image pipeline, loaded through ``load_pipeline`` as a user would."""
    from editeval.models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def tiny_ip2p():
    """The tiny InstructPix2Pix pipeline."""
    from editeval.models import load_pipeline

    return load_pipeline("tiny", "instruction")
