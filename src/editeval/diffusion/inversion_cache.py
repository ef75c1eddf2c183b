"""A cache of inversions, shared by the methods of one benchmark run.

Inverting a source image (DDIM inversion, null-text optimisation, EDICT's coupled inversion, ...)
is often the dearest part of an edit, and several methods of one run invert the same image under the
same prompt, model and scheduler. :class:`InversionCache` keys an inversion by everything it depends
on (the image's pixels, the prompt, the model, the scheduler configuration, the number of steps, the
guidance scale, the kind of inversion and its own options) and stores it in memory and, when given a
directory, on disk (``<run dir>/inversions/<key>.pt``, written atomically), so a resumed run keeps it.

A cache hit costs no denoiser evaluation, so the NFE of an edit that reuses an inversion drops by
the inversion's cost; methods report ``inversion_cached`` in their intermediates. Each entry keeps
what computing it cost (the NFE counted while it was computed), and a hit adds that to the running
edit's :attr:`~editeval.core.nfe.NFECounter.saved`, so an edit's uncached NFE is known whichever
method computed the inversion first.

Large entries (a test-time finetuning method's fitted weights, :mod:`editeval.diffusion.
finetuning`) are kept apart: in memory only the most recent one, on disk under
``<directory>/finetuned/`` at most ``large_bytes`` in all (default :data:`LARGE_BYTES`, 8 GiB: two
float32 Stable Diffusion 1.x UNets), the least recently used deleted first; an entry larger than
the bound is kept in memory only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from editeval.core.files import atomic_write
from editeval.core.nfe import current_counter, denoiser
from editeval.core.tensors import to_cpu
from editeval.diffusion.weights import weights_digest

Value = dict[str, Any]  # tensors, lists of tensors and plain numbers
FORMAT = 2  # on-disk entries: {"format", "nfe", "value"}; other files are recomputed
LARGE_BYTES = 8 * 1024**3
"""The default bound of the large entries kept on disk (bytes)."""


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (not of its file: re-encoding does not matter)."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()


def generator_digest(generator: torch.Generator) -> str:
    """sha256 of a generator's state, for the key of an inversion that draws random numbers
    (edit-friendly DDPM inversion, CycleDiffusion's DPM-Encoder): it depends on the draws to come."""
    return hashlib.sha256(np.asarray(generator.get_state()).tobytes()).hexdigest()


def inversion_key(*, kind: str, image: Image.Image, prompt: str, pipe: Any, scheduler: Any,
                  num_inference_steps: int, guidance_scale: float,
                  options: Mapping[str, Any] | None = None) -> str:
    """The cache key (hex sha256) of an inversion.

    Args:
        kind: the inversion's name (``ddim``, ``null-text``, ``edict``, ...).
        image: the source at the model's resolution. prompt: the prompt it is inverted under.
        pipe: the pipeline: the digest of its weights (:func:`~editeval.diffusion.weights.
            weights_digest`, so a swapped VAE or changed weights never get a stale inversion),
            the denoiser's class and config and its dtype identify the model.
        scheduler: the scheduler used (class name and config).
        num_inference_steps, guidance_scale: as used by the inversion.
        options: anything else the result depends on (JSON-serialisable).
    """
    model = denoiser(pipe)
    record = {
        "kind": kind,
        "image": image_digest(image),
        "prompt": prompt,
        "weights": weights_digest(pipe),
        "denoiser": [type(model).__name__, _jsonable(dict(model.config))],
        "dtype": str(model.dtype),
        "scheduler": [type(scheduler).__name__, _jsonable(dict(scheduler.config))],
        "steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "options": _jsonable(dict(options or {})),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


class InversionCache:
    """Inversions by key, in memory (the ``memory_items`` most recent) and optionally on disk.

    Args:
        directory: where to keep ``<key>.pt`` files; ``None`` keeps them in memory only.
        memory_items: how many inversions to keep in memory.
        large_bytes: the most bytes of large entries kept on disk.
    """

    def __init__(self, directory: str | os.PathLike | None = None, memory_items: int = 8,
                 large_bytes: int = LARGE_BYTES) -> None:
        self.directory = None if directory is None else Path(directory)
        self.memory_items = memory_items
        self.large_bytes = large_bytes
        self._memory: OrderedDict[str, tuple[Value, int]] = OrderedDict()
        self._large: OrderedDict[str, tuple[Value, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], Value],
                       large: bool = False) -> tuple[Value, bool]:
        """The inversion stored under ``key``, or ``compute()``'s result, stored; and whether it hit.

        On a miss the NFE counted while computing is stored with the entry; on a hit it is added to
        the active counter's ``saved`` (:func:`~editeval.core.nfe.current_counter`). Tensors come
        back on the CPU when read from disk; methods move them to their device. ``large``: a large
        entry (fitted weights: see the module), kept under its own bounds.
        """
        counter = current_counter()
        memory = self._large if large else self._memory
        path = None if self.directory is None else \
            (self.directory / "finetuned" if large else self.directory) / f"{key}.pt"
        entry = memory.get(key)
        if entry is None and path is not None:
            entry = _read(path)
            if entry is not None and large:
                os.utime(path)  # least recently used goes first
        if entry is not None:
            self.hits += 1
            self._remember(memory, key, entry, 1 if large else self.memory_items)
            if counter is not None:
                counter.saved += entry[1]
            return entry[0], True
        self.misses += 1
        before = 0 if counter is None else counter.nfe
        value = compute()
        entry = (value, 0 if counter is None else counter.nfe - before)
        self._remember(memory, key, entry, 1 if large else self.memory_items)
        if path is not None:
            self._save(path, entry, self.large_bytes if large else None)
        return value, False

    @staticmethod
    def _remember(memory: OrderedDict, key: str, entry: tuple[Value, int], items: int) -> None:
        memory[key] = entry
        memory.move_to_end(key)
        while len(memory) > items:
            memory.popitem(last=False)

    @staticmethod
    def _save(path: Path, entry: tuple[Value, int], bound: int | None) -> None:
        cpu = {"format": FORMAT, "nfe": entry[1], "value": to_cpu(entry[0])}
        if bound is not None and _size(cpu["value"]) > bound:
            return  # larger than the bound: memory only
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: torch.save(cpu, handle))
        if bound is not None:
            files = sorted(path.parent.glob("*.pt"), key=lambda f: f.stat().st_mtime_ns)
            total = sum(f.stat().st_size for f in files)
            for old in files:
                if total <= bound or old == path:
                    break
                total -= old.stat().st_size
                old.unlink(missing_ok=True)


def _size(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested dicts and lists)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 0


def _read(path: Path) -> tuple[Value, int] | None:
    """An entry written by :meth:`InversionCache._save`, or ``None`` when absent, damaged (killed
    mid-write elsewhere) or of an older format (without its cost): those are recomputed."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file is recomputed, never trusted
        return None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        return None
    return stored["value"], int(stored["nfe"])


def cached_inversion(cache: InversionCache | None, key: str, compute: Callable[[], Value],
                     large: bool = False) -> tuple[Value, bool]:
    """``cache.get_or_compute(key, compute, large)``, or ``compute()`` (never cached) when
    ``cache`` is None."""
    if cache is None:
        return compute(), False
    return cache.get_or_compute(key, compute, large)
