"""Storing what an edit produced besides its image (its *intermediates*) in a run directory.

A method returns intermediates by name (:class:`editeval.core.MethodOutput`): whether an inversion
came from the cache, null-text iterations, the blend words, a generated mask, an edit-region map.
They are stored with the edit:

- JSON values (``None``, booleans, numbers, strings, and lists and string-keyed dicts of them) as
  they are, in the results row;
- torch tensors as ``.pt`` files, numpy arrays as ``.npy`` files and PIL images (masks) as ``.png``
  files under ``RUN_DIR/intermediates/METHOD/TASK/N_seedS/NAME.EXT``, written atomically; the row
  holds ``{"$file": PATH, "type": "tensor" | "array" | "image", ...}`` with the path relative to the
  run directory (and the shape and dtype of a tensor or array);
- anything else as ``{"$unstored": TYPE, "repr": TEXT}``, so nothing is dropped in silence.

:func:`load_intermediates` gives the values back (files read).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from editeval.core.files import atomic_write

_SAFE_NAME = re.compile(r"[^\w.-]+")


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)  # JSON has no NaN; a NaN goes through repr
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def store_intermediates(values: Mapping[str, Any], run_dir: Path,
                        folder: Path) -> dict[str, Any]:
    """Write the file-valued ``values`` under ``run_dir / folder`` and return the JSON to store.

    Args:
        values: intermediates by name (names become file names: keep them short, word characters).
        run_dir: the run directory. folder: the job's folder, relative to ``run_dir``.
    """
    stored: dict[str, Any] = {}
    for name, value in values.items():
        if _is_json(value):
            stored[name] = json.loads(json.dumps(value))  # tuples become lists, as read back
            continue
        base = folder / _SAFE_NAME.sub("_", name)
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            reference = {"$file": str(base.with_suffix(".pt")), "type": "tensor",
                         "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
            writer: Callable[[IO[bytes]], Any] = lambda handle, t=tensor: torch.save(t, handle)
        elif isinstance(value, np.ndarray):
            reference = {"$file": str(base.with_suffix(".npy")), "type": "array",
                         "shape": list(value.shape), "dtype": str(value.dtype)}
            writer = lambda handle, a=value: np.save(handle, a, allow_pickle=False)
        elif isinstance(value, Image.Image):
            reference = {"$file": str(base.with_suffix(".png")), "type": "image",
                         "size": list(value.size), "mode": value.mode}
            writer = lambda handle, i=value: i.save(handle, format="PNG")
        else:
            stored[name] = {"$unstored": type(value).__name__, "repr": repr(value)[:500]}
            continue
        path = run_dir / reference["$file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, writer)
        stored[name] = reference
    return stored


def load_intermediates(stored: Mapping[str, Any] | None, run_dir: Path) -> dict[str, Any]:
    """The intermediates as :func:`store_intermediates` stored them, files read back (tensors on the
    CPU, arrays, PIL images); an ``$unstored`` value stays its record.

    Raises:
        FileNotFoundError: a referenced file is missing from the run directory.
    """
    values: dict[str, Any] = {}
    for name, value in (stored or {}).items():
        if not (isinstance(value, Mapping) and "$file" in value):
            values[name] = value
            continue
        path = run_dir / value["$file"]
        if value["type"] == "tensor":
            values[name] = torch.load(path, map_location="cpu", weights_only=True)
        elif value["type"] == "array":
            values[name] = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                values[name] = image.copy()
    return values
