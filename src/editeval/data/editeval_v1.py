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
``<number>.<ext>`` are samples.

The spreadsheet (first sheet, columns A-D) is read in the release's layout
only; rows are numbered from 1, as a spreadsheet application shows them::

    row 1       Object Addition    | Source Prompt | Target Prompt | Instruction
    rows 2-9    (blank)            | object_addition 1 ... 8
    row 10      Object Replacement | object_replacement 1
    rows 11-17  (blank)            | object_replacement 2 ... 8
    rows 18-25  Object Removal     | object_removal 1 ... 8      (label on row 18 only)
    rows 26-33  Background Change  | background_change 1 ... 8   (label on row 26 only)
    rows 34-41  Style Change       | style_change 1 ... 8        (label on row 34 only)
    rows 42-47  Texture Change     | texture_change 1 ... 6      (label on row 42 only)
    rows 48-51  Action Change      | action_change 1 ... 4       (label on row 48 only)

The header shares row 1 with the first task's label (column A is merged over
each block in the original file); the 50 sample rows follow without gaps, and
column A names the task on the first sample row of every later block. The
*k*-th sample row of a block describes image ``<k>.<ext>`` of that task.
Empty rows after the last block are ignored. Any other layout (no header, the
header on another row, a block of another size or in another order) is a
:class:`DatasetError` naming the file and row, never a silently shifted prompt.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from openpyxl import load_workbook

from editeval.core.samples import TASKS, Dataset, DatasetError, Sample

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


HEADER: tuple[str, str, str] = ("Source Prompt", "Target Prompt", "Instruction")
"""Column names in columns B-D of the spreadsheet's row 1, beside the first task's label."""

FIRST_SAMPLE_ROW = 2
"""Spreadsheet row (1-based) of the first sample: the one below the header."""


def _task_label(task: str) -> str:
    """The release's spelling of a task label, e.g. ``"Object Addition"``."""
    return task.replace("_", " ").title()


def _is_column_names(cells: list[str]) -> bool:
    """Whether columns B-D of a row hold the column names (case and spacing ignored)."""
    return [_squash(c) for c in cells[1:4]] == [_squash(h) for h in HEADER]


def _read_cells(path: Path) -> list[list[str]]:
    """Columns A-D of every row of the first sheet, row 1 first, stripped, empty cells as ``""``;
    trailing empty rows dropped."""
    try:
        book = load_workbook(path, data_only=True)
    except Exception as exc:  # openpyxl/zipfile/OS errors vary by failure mode
        raise DatasetError(f"cannot read prompts spreadsheet {path}: {exc}") from exc
    sheet = book.worksheets[0]
    if sheet.max_column < 4:
        raise DatasetError(
            f"prompts spreadsheet {path} has {sheet.max_column} column(s); expected 4 "
            "(task, source prompt, target prompt, instruction)"
        )
    rows = [
        ["" if v is None else str(v).strip() for v in values]
        for values in sheet.iter_rows(min_row=1, max_col=4, values_only=True)
    ]
    while rows and not any(rows[-1]):
        rows.pop()
    return rows


def read_prompts(path: str | Path) -> dict[str, list[_PromptRow]]:
    """Read the EditEval v1 prompts spreadsheet, in the release's layout (module docstring).

    Row 1 must be the header: the first task's label in column A beside the
    column names Source Prompt, Target Prompt, Instruction (case and spacing
    may differ). The sample rows follow from row 2 in blocks of
    :data:`EXPECTED_BLOCKS` rows, in that order, each block's first row naming
    its task in column A (row 1 does so for the first block). Task labels are
    matched ignoring case, spaces, ``_`` and ``-``; "Removel" is accepted.

    Args:
        path: The ``.xlsx`` file.

    Returns:
        Canonical task id -> ``(source_prompt, target_prompt, instruction)``
        rows in file order (row *k* describes image *k*), in the order of
        :data:`EXPECTED_BLOCKS`, with whitespace stripped and empty cells as ``""``.

    Raises:
        DatasetError: If the file cannot be read or has fewer than four
            columns, or its layout differs from the release's: no header on
            row 1, the column names on another row, an unrecognised task
            label, a sample row without prompts, or a block of another size or
            in another order. The message names the file and the 1-based row.
    """
    path = Path(path)
    rows = _read_cells(path)
    order = list(EXPECTED_BLOCKS)
    header = " | ".join((_task_label(order[0]), *HEADER))
    named = [number for number, cells in enumerate(rows, start=1) if _is_column_names(cells)]
    if not rows or not _is_column_names(rows[0]):
        if named:
            raise DatasetError(
                f"{path}, row {named[0]}: the column names {', '.join(HEADER)} are on this row; "
                f"the release has them on row 1 ({header}) with the samples from row "
                f"{FIRST_SAMPLE_ROW}; use the original {PROMPTS_FILE} unchanged"
            )
        found = " | ".join(rows[0]) if rows else "an empty sheet"
        raise DatasetError(
            f"{path}, row 1: expected the header {header}, found {found!r}; "
            f"use the original {PROMPTS_FILE} unchanged"
        )
    if _canonical_task(rows[0][0]) != order[0]:
        raise DatasetError(
            f"{path}, row 1: column A of the header holds {rows[0][0]!r}; expected "
            f"{_task_label(order[0])!r} (the first task's label, beside the column names), "
            f"with its samples from row {FIRST_SAMPLE_ROW}"
        )
    if len(named) > 1:
        raise DatasetError(
            f"{path}, row {named[1]}: the column names appear again; the release has them "
            "on row 1 only"
        )

    blocks: list[tuple[str, int, list[_PromptRow]]] = [(order[0], FIRST_SAMPLE_ROW, [])]
    for row_no, cells in enumerate(rows[FIRST_SAMPLE_ROW - 1:], start=FIRST_SAMPLE_ROW):
        if not any(cells[1:]):
            raise DatasetError(
                f"{path}, row {row_no}: no prompts in columns B-D; the release has "
                f"{sum(EXPECTED_BLOCKS.values())} sample rows without gaps from row "
                f"{FIRST_SAMPLE_ROW}"
            )
        if cells[0]:
            task = _canonical_task(cells[0])
            if task is None:
                raise DatasetError(
                    f"{path}, row {row_no}: unrecognised task name {cells[0]!r}; "
                    f"expected one of {', '.join(TASKS)}"
                )
            blocks.append((task, row_no, []))
        blocks[-1][2].append((cells[1], cells[2], cells[3]))

    row_no = FIRST_SAMPLE_ROW  # where the next block starts in the release
    for index, (task, count) in enumerate(EXPECTED_BLOCKS.items()):
        expected = f"{count} rows, {row_no}-{row_no + count - 1}"
        if index == len(blocks):
            raise DatasetError(
                f"{path}, row {row_no}: the sheet ends before the {task} block; "
                f"the release has it on the next {expected}"
            )
        found_task, start, found_rows = blocks[index]
        if found_task != task:
            raise DatasetError(
                f"{path}, row {start}: {found_task} block where the release has {task} "
                f"({expected}); expected the blocks in the order {', '.join(order)}"
            )
        if len(found_rows) != count:
            span = f"{start}-{start + len(found_rows) - 1}" if found_rows else "none"
            raise DatasetError(
                f"{path}, row {start + min(len(found_rows), count)}: the {task} block has "
                f"{len(found_rows)} sample rows ({span}); the release has {expected}"
            )
        row_no += count
    if len(blocks) > len(EXPECTED_BLOCKS):
        task, start, _ = blocks[len(EXPECTED_BLOCKS)]
        raise DatasetError(
            f"{path}, row {start}: a second {task} block after the last one "
            f"({order[-1]} ends on row {row_no - 1})"
        )
    return {task: found_rows for task, _, found_rows in blocks}


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

    blocks = read_prompts(prompts_path)  # validated: EXPECTED_BLOCKS rows per task

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
