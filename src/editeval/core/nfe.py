"""Counting denoiser evaluations (NFE), the machine-independent cost of an edit.

The counter is a forward pre-hook on the pipeline's denoiser (its UNet, or its transformer for
transformer-based models), installed by :func:`editeval.editing.edit` around every method call, so
no method can forget to count. One NFE is one image passing through the denoiser: a
classifier-free-guidance batch of 2 counts as 2, InstructPix2Pix's batch of 3 as 3.

An inversion reused from a run's cache costs nothing, so what an edit spends depends on which
method of the run computed the inversion first. The cache therefore reports, through
:func:`current_counter`, what each reused inversion cost when it was computed (``NFECounter.saved``),
and ``nfe + saved`` is the edit's own, uncached cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

_ACTIVE: ContextVar[NFECounter | None] = ContextVar("editeval_nfe_counter", default=None)


@dataclass
class NFECounter:
    """Running count of denoiser evaluations.

    Attributes:
        nfe: the sum of the batch sizes the denoiser saw.
        calls: forward calls (a batch of 2 is one call).
        saved: evaluations that cached inversions would have cost (added by the inversion cache).
    """

    nfe: int = 0
    calls: int = 0
    saved: int = 0

    @property
    def uncached(self) -> int:
        """``nfe + saved``: the cost with every cached inversion computed."""
        return self.nfe + self.saved

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else _first_tensor(kwargs)
        self.nfe += int(sample.shape[0])
        self.calls += 1


def _first_tensor(kwargs: dict[str, Any]) -> torch.Tensor:
    # UNets take ``sample``, diffusers' transformers ``hidden_states``
    for name in ("sample", "hidden_states"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise TypeError(f"cannot count NFE: the denoiser got no sample tensor (keywords: "
                    f"{', '.join(kwargs)})")


def denoiser(pipe: Any) -> torch.nn.Module:
    """The module a pipeline evaluates at every step: ``pipe.unet``, or ``pipe.transformer``.

    Raises:
        TypeError: the pipeline has neither.
    """
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer to count")


@contextmanager
def count_nfe(module: torch.nn.Module) -> Iterator[NFECounter]:
    """Count every forward pass of ``module`` (a UNet or transformer) inside the ``with`` block.

    The counter is also :func:`current_counter` inside the block; the hook is always removed.
    """
    counter = NFECounter()
    handle = module.register_forward_pre_hook(counter._hook, with_kwargs=True)
    token = _ACTIVE.set(counter)
    try:
        yield counter
    finally:
        _ACTIVE.reset(token)
        handle.remove()


def current_counter() -> NFECounter | None:
    """The counter of the innermost :func:`count_nfe` block running now, or ``None``."""
    return _ACTIVE.get()
