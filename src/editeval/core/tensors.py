"""Moving results between devices and processes."""

from __future__ import annotations

from typing import Any

import torch


def to_cpu(value: Any) -> Any:
    """``value`` with every torch tensor in it (in dicts, lists and tuples, nested) detached and on
    the CPU, so that a file or a process without the GPU can read it; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if type(value) in (list, tuple):  # not a named tuple: its fields are kept as they are
        return type(value)(to_cpu(item) for item in value)
    return value
