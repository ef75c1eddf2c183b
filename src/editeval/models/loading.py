"""Loading diffusers pipelines by hub id, local directory or short name, always via ``from_pretrained``.

Devices and dtypes: CUDA gets float16 and the CPU float32 unless ``device``/``dtype`` say otherwise.
A checkpoint that is neither on disk nor downloadable raises :class:`ModelNotAvailableError` with a
short message that says how to get it, instead of a huggingface_hub stack trace.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from editeval.models.progress import quiet_progress_bars
from editeval.models.suites import resolve_checkpoint

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ModelNotAvailableError(RuntimeError):
    """The requested checkpoint is neither cached locally nor downloadable."""


def default_device() -> str:
    """``"cuda"`` when a CUDA GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere, unless ``dtype`` ("fp16", "bf16", "fp32" or a torch dtype)."""
    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_available(checkpoint: str, reason: str, *, is_hub_id: bool) -> ModelNotAvailableError:
    how = (
        f"download it on a machine with network access (`hf download {checkpoint}`) and copy the "
        f"Hugging Face cache (~/.cache/huggingface), or pass a local diffusers directory"
        if is_hub_id
        else "pass a directory saved with `save_pretrained` (it holds model_index.json)"
    )
    return ModelNotAvailableError(
        f"model {checkpoint!r} is not available: {reason}. To fix: {how}; without any weights, "
        f"use --model toy (shipped, trained on the toy world: real edits of toy scenes) or --model "
        "tiny (random weights, for plumbing only)."
    )


def load_pipeline(
    name_or_path: str,
    kind: str = "text-to-image",
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load a diffusers pipeline.

    Args:
        name_or_path: a model suite or short name (``sd15``, ``ip2p``, ``tiny``, see
            :mod:`editeval.models.suites`), a local diffusers directory, or a hub id.
        kind: which checkpoint of a suite: ``text-to-image``, ``instruction`` or ``inpainting``.
        device: ``"cuda"``, ``"cpu"``, ...; default: CUDA when available.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` or a torch dtype; default fp16 on CUDA, fp32 else.

    Returns:
        The ``DiffusionPipeline`` subclass named in the checkpoint's ``model_index.json``, on
        ``device``, with the safety checker disabled (benchmark outputs must not be blacked out).

    Raises:
        ModelNotAvailableError: a local path that does not exist, or a hub id that is neither in the
            local cache nor downloadable.
    """
    from diffusers import DiffusionPipeline

    try:
        checkpoint = resolve_checkpoint(name_or_path, kind)
    except FileNotFoundError as err:  # a built-in model whose files are not installed
        raise ModelNotAvailableError(str(err)) from None
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is visible; use --device cpu")
    torch_dtype = resolve_dtype(dtype, device)
    is_path = Path(checkpoint).expanduser().exists()
    if not is_path and (checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1):
        raise _not_available(checkpoint, "no such directory", is_hub_id=False)
    local_only = is_path or not _hub_reachable()
    try:
        with quiet_progress_bars():
            config = DiffusionPipeline.load_config(checkpoint, local_files_only=local_only)
            extra = {"safety_checker": None, "requires_safety_checker": False}
            kwargs = {k: v for k, v in extra.items() if "safety_checker" in config}
            pipe = DiffusionPipeline.from_pretrained(
                checkpoint, dtype=torch_dtype, local_files_only=local_only, **kwargs
            )
    except (OSError, ValueError) as err:
        reason = ("no network and not in the local cache" if local_only and not is_path
                  else str(err).rstrip(". "))
        raise _not_available(checkpoint, reason, is_hub_id=not is_path) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe if device == "cpu" else pipe.to(device)  # loaded on the CPU
