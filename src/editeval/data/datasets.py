"""Datasets by name, so the command line can say ``--dataset editeval-v1 --data-dir DIR``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from editeval.data.editeval_v1 import load_editeval_v1
from editeval.data.samples import Dataset, DatasetError

# name -> (loader(root, prompts_file), environment variable naming the default folder)
DATASETS: dict[str, tuple[Callable[..., Dataset], str]] = {
    "editeval-v1": (load_editeval_v1, "EDITEVAL_V1_DIR"),
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 prompts_file: str | os.PathLike | None = None) -> Dataset:
    """Load the dataset ``name`` from ``data_dir`` (default: the dataset's environment variable).

    Raises:
        DatasetError: unknown name, no folder given, or a folder the loader cannot read.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    loader, env = DATASETS[name]
    data_dir = data_dir or os.environ.get(env)
    if not data_dir:
        raise DatasetError(
            f"dataset {name!r} needs its folder: pass --data-dir DIR or set {env}=DIR"
        )
    return loader(Path(data_dir), prompts_file=prompts_file)
