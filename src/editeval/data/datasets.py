"""Datasets by name, so the command line can say ``--dataset editeval-v1 --data-dir DIR``."""

from __future__ import annotations

import os
from pathlib import Path

from editeval.core.samples import Dataset, DatasetError

DATASETS = {
    "editeval-v1": "EditEval v1, the survey's benchmark (50 images, 7 tasks); needs --data-dir "
                   "or $EDITEVAL_V1_DIR",
    "editeval-toy": "toy-world edit pairs with exact ground truth (210 pairs, 7 tasks); built "
                    "offline on first use",
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 prompts_file: str | os.PathLike | None = None) -> Dataset:
    """Load the dataset ``name`` (see :data:`DATASETS`) from ``data_dir``.

    Raises:
        DatasetError: unknown name, no folder given where one is needed, or an unreadable folder.
    """
    if name == "editeval-v1":
        from editeval.data.editeval_v1 import load_editeval_v1

        data_dir = data_dir or os.environ.get("EDITEVAL_V1_DIR")
        if not data_dir:
            raise DatasetError(
                "dataset 'editeval-v1' needs its folder: pass --data-dir DIR or set EDITEVAL_V1_DIR"
            )
        return load_editeval_v1(Path(data_dir), prompts_file=prompts_file)
    if name == "editeval-toy":
        from editeval.toyworld.dataset import load_editeval_toy

        return load_editeval_toy(data_dir)
    raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
