"""Loader for EditEval v1.

EditEval v1 is the benchmark introduced with the survey *Diffusion Model-Based
Image Editing: A Survey* (Y. Huang et al., arXiv:2402.17525). It holds 50
source images spread over seven editing tasks, each with a source prompt, a
target prompt and an edit instruction.

Layout of the original release::

    <root>/
        editing_prompts_collection.xlsx
        object_addition/      1.jpg ... 8.jpg
        object_replacement/   1.jpg ... 8.jpg
        object_removel/       1.jpg ... 8.jpg     (sic: the original typo)
        background_change/    1.jpg ... 8.jpg
        style_change/         1.jpg ... 8.jpg
        texture_change/       1.jpg ... 6.jpg
        action_change/        1.jpg ... 4.jpg

Image extensions vary (``.jpg``, ``.jpeg``, ``.png`` ...); only files named
``<number>.<ext>`` are samples. The spreadsheet has an optional header row,
then one block of rows per task in the order above (8, 8, 8, 8, 8, 6, 4 rows):
the first column names the task on the first row of its block only, followed
by the columns Source Prompt, Target Prompt and Instruction. Row *k* of a block
describes image *k* of that task.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from editeval.data.samples import TASKS, Dataset, DatasetError, Sample

logger = logging.getLogger(__name__)

TASK_FOLDERS: dict[str, str] = {
    "object_addition": "object_addition",
    "object_replacement": "object_replacement",
    "object_removal": "object_removel",
    "background_change": "background_change",
    "style_change": "style_change",
    "texture_change": "texture_change",
    "action_change": "action_change",
}
"""Canonical task id -> folder name in the original release."""

PROMPTS_FILE = "editing_prompts_collection.xlsx"
"""File name of the prompts spreadsheet at the top of the dataset folder."""

EXPECTED_BLOCKS: dict[str, int] = {
    "object_addition": 8,
    "object_replacement": 8,
    "object_removal": 8,
    "background_change": 8,
    "style_change": 8,
    "texture_change": 6,
    "action_change": 4,
}
"""Number of spreadsheet rows (= images) per task in the original release."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""Recognised image extensions (matched case-insensitively), in order of preference."""

_PromptRow = tuple[str, str, str]


def _squash(text: str) -> str:
    """Lower-case ``text`` and drop whitespace, underscores and hyphens."""
    return re.sub(r"[\s_\-]+", "", text.lower())


_TASK_KEYS: dict[str, str] = {_squash(task): task for task in TASKS}


def _canonical_task(text: str) -> str | None:
    """Map a spreadsheet task cell (e.g. ``"Object Removel"``) to a canonical id."""
    return _TASK_KEYS.get(_squash(text).replace("removel", "removal"))


def _is_header(cells: list[str]) -> bool:
    """Whether a row reads like a header ("Task | Source Prompt | Target Prompt | Instruction")."""
    if _canonical_task(cells[0]) is not None:
        return False
    return any("prompt" in _squash(c) or "instruction" in _squash(c) for c in cells[1:])


def read_prompts(path: str | Path) -> dict[str, list[_PromptRow]]:
    """Read the EditEval v1 prompts spreadsheet.

    The sheet is read without a header so that the header wording does not
    matter; a first row that looks like a header is skipped, and fully empty
    rows are ignored.

    Args:
        path: The ``.xlsx`` file.

    Returns:
        Canonical task id -> ``(source_prompt, target_prompt, instruction)``
        rows in file order, with whitespace stripped and empty cells as ``""``.

    Raises:
        DatasetError: If the file cannot be read, has fewer than four columns,
            has data before the first task name, names a task that is not
            recognised, or repeats a task block.
    """
    path = Path(path)
    try:
        frame = pd.read_excel(path, header=None, dtype=object, engine="openpyxl")
    except Exception as exc:  # openpyxl/zipfile/OS errors vary by failure mode
        raise DatasetError(f"cannot read prompts spreadsheet {path}: {exc}") from exc
    if frame.shape[1] < 4:
        raise DatasetError(
            f"prompts spreadsheet {path} has {frame.shape[1]} column(s); expected 4 "
            "(task, source prompt, target prompt, instruction)"
        )
    rows = [
        ["" if pd.isna(v) else str(v).strip() for v in values[:4]]
        for values in frame.itertuples(index=False, name=None)
    ]
    blocks: dict[str, list[_PromptRow]] = {}
    current: str | None = None
    for index, cells in enumerate(rows):
        if not any(cells):
            continue
        if current is None and _is_header(cells):
            continue
        row_no = index + 1  # 1-based, as shown by spreadsheet applications
        if cells[0]:
            current = _canonical_task(cells[0])
            if current is None:
                raise DatasetError(
                    f"{path}, row {row_no}: unrecognised task name {cells[0]!r}; "
                    f"expected one of {', '.join(TASKS)}"
                )
            if current in blocks:
                raise DatasetError(f"{path}, row {row_no}: task {current} appears in two blocks")
            blocks[current] = []
        elif current is None:
            raise DatasetError(f"{path}, row {row_no}: prompts before the first task name")
        blocks[current].append((cells[1], cells[2], cells[3]))
    return blocks


def _task_dir(root: Path, task: str) -> Path | None:
    """Return the folder of ``task`` under ``root`` (original or corrected spelling), if any."""
    for name in dict.fromkeys((TASK_FOLDERS[task], task)):
        if (root / name).is_dir():
            return root / name
    return None


def _image_number(path: Path) -> int | None:
    """Return ``n`` for an image file named ``<n>.<ext>``, else ``None``."""
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.isdigit():
        return int(path.stem)
    return None


def find_image(task_dir: Path, number: int) -> Path | None:
    """Return the image ``<number>.<ext>`` in ``task_dir`` (any recognised extension), if present."""
    if not task_dir.is_dir():
        return None
    matches = [p for p in task_dir.iterdir() if _image_number(p) == number]
    return min(matches, key=lambda p: IMAGE_EXTENSIONS.index(p.suffix.lower()), default=None)


def scan_images(root: str | Path) -> dict[str, list[int]]:
    """List the image numbers present per task.

    Args:
        root: The dataset folder.

    Returns:
        Canonical task id -> sorted image numbers, for each task whose folder
        exists, in canonical task order. Files not named ``<number>.<ext>``
        (e.g. ``6_src.jpg``) are ignored.
    """
    root = Path(root)
    found: dict[str, list[int]] = {}
    for task in TASKS:
        folder = _task_dir(root, task)
        if folder is not None:
            numbers = {n for p in folder.iterdir() if (n := _image_number(p)) is not None}
            found[task] = sorted(numbers)
    return found


def load_editeval_v1(root: str | Path, prompts_file: str | Path | None = None) -> Dataset:
    """Load EditEval v1.

    One :class:`Sample` is built per spreadsheet row whose image exists. Rows
    whose image is absent are recorded in :attr:`Dataset.missing` and reported
    in a single warning; they never raise.

    Args:
        root: The dataset folder holding the task folders.
        prompts_file: The prompts spreadsheet; defaults to
            ``<root>/editing_prompts_collection.xlsx``.

    Raises:
        DatasetError: If ``root`` is not a directory or holds no task folder,
            or the spreadsheet is absent or malformed (see :func:`read_prompts`).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"EditEval v1 folder {root} does not exist or is not a directory; "
            "pass the folder that holds the task folders (object_addition, ...)"
        )
    folders = {task: _task_dir(root, task) for task in TASKS}
    if not any(folders.values()):
        raise DatasetError(
            f"{root} holds none of the EditEval v1 task folders "
            f"({', '.join(TASK_FOLDERS.values())}); pass the dataset folder itself"
        )
    if prompts_file is None:
        prompts_path = root / PROMPTS_FILE
        if not prompts_path.is_file():
            raise DatasetError(
                f"prompts spreadsheet {PROMPTS_FILE} not found in {root}; pass its path "
                f"with prompts_file= (CLI: --prompts FILE) or put {PROMPTS_FILE} beside "
                "the task folders"
            )
    else:
        prompts_path = Path(prompts_file).expanduser()
        if not prompts_path.is_file():
            raise DatasetError(f"prompts file {prompts_path} does not exist")

    blocks = read_prompts(prompts_path)
    sizes = {task: len(rows) for task, rows in blocks.items()}
    if sizes != EXPECTED_BLOCKS:
        logger.warning(
            "%s: block sizes %s differ from the original release %s",
            prompts_path, sizes, EXPECTED_BLOCKS,
        )

    samples: list[Sample] = []
    missing: list[str] = []
    for task in TASKS:
        folder = folders[task]
        for number, (source, target, instruction) in enumerate(blocks.get(task, []), start=1):
            sample_id = f"{task}/{number}"
            image = find_image(folder, number) if folder is not None else None
            if image is None:
                missing.append(sample_id)
                continue
            samples.append(
                Sample(
                    id=sample_id,
                    task=task,
                    image_path=image,
                    source_prompt=source,
                    target_prompt=target,
                    instruction=instruction,
                )
            )
    if missing:
        logger.warning(
            "EditEval v1 at %s: %d image(s) missing, skipped: %s",
            root, len(missing), ", ".join(missing),
        )
    return Dataset(name="editeval_v1", root=root, samples=samples, missing=missing)
