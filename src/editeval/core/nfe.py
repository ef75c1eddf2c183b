"""Counting denoiser evaluations (NFE), the machine-independent cost of an edit.

The counter is a forward pre-hook on the pipeline's denoiser (its UNet, or its transformer for
transformer-based models), installed by :func:`editeval.editing.edit` around every method call, so
no method can forget to count. One NFE is one image passing through the denoiser: a
classifier-free-guidance batch of 2 counts as 2, InstructPix2Pix's batch of 3 as 3.

An inversion reused from a run's cache costs nothing, so what an edit spends depends on which
method of the run computed the inversion first. The cache therefore reports, through
:func:`current_counter`, what each reused inversion cost when it was computed (``NFECounter.saved``),
and ``nfe + saved`` is the edit's own, uncached cost.

Optimisation-based methods also pass gradients back through the denoiser; each such backward pass
is counted in ``NFECounter.backward`` (one per denoiser call that gradients flow back through,
whatever its batch size). The denoiser's sample is routed through an identity autograd function
whose backward counts, when the sample requires gradients (guidance on the latent, as
Pix2Pix-Zero's); otherwise its output is, when the output requires gradients (optimising text
embeddings or weights, as null-text inversion does). Gradients that reach only the weights or the
text embeddings from inside the denoiser (a loss on attention maps with the sample constant) are
not seen.
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
        backward: backward passes through the denoiser (one per forward call that gradients
            flowed back through, counted each time they do).
    """

    nfe: int = 0
    calls: int = 0
    saved: int = 0
    backward: int = 0

    @property
    def uncached(self) -> int:
        """``nfe + saved``: the cost with every cached inversion computed."""
        return self.nfe + self.saved

    def _hook(self, module: torch.nn.Module, args: tuple,
              kwargs: dict) -> tuple[tuple, dict] | None:
        sample = args[0] if args else _first_tensor(kwargs)
        self.nfe += int(sample.shape[0])
        self.calls += 1
        if not (torch.is_grad_enabled() and sample.requires_grad):
            return None
        counted = _CountBackward.apply(sample, self)
        if args:
            return (counted, *args[1:]), kwargs
        name = next(name for name, value in kwargs.items() if value is sample)
        return args, {**kwargs, name: counted}

    def _output_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict,
                     output: Any) -> Any:
        sample = args[0] if args else _first_tensor(kwargs)
        if sample.requires_grad or not torch.is_grad_enabled():
            return None  # counted on the sample (or no graph)
        tensor = output[0] if isinstance(output, (tuple, dict)) else output
        if isinstance(output, dict):  # diffusers' BaseOutput: an ordered dict of its fields
            tensor = next(iter(output.values()))
        if not (isinstance(tensor, torch.Tensor) and tensor.requires_grad):
            return None
        counted = _CountBackward.apply(tensor, self)
        if isinstance(output, dict):
            setattr(output, next(iter(output.keys())), counted)
            return output
        if isinstance(output, tuple):
            return (counted, *output[1:])
        return counted


class _CountBackward(torch.autograd.Function):
    """The identity, whose backward adds one to ``counter.backward``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, counter: NFECounter) -> torch.Tensor:
        ctx.counter = counter
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.counter.backward += 1
        return grad, None


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
    """Count every forward pass of ``module`` (a UNet or transformer) inside the ``with`` block,
    and every backward pass through it (see the module).

    The counter is also :func:`current_counter` inside the block; the hooks are always removed.
    """
    counter = NFECounter()
    handles = _attach(counter, module)
    token = _ACTIVE.set(counter)
    try:
        yield counter
    finally:
        _ACTIVE.reset(token)
        for handle in handles:
            handle.remove()


@contextmanager
def count_also(module: torch.nn.Module) -> Iterator[NFECounter | None]:
    """Count ``module``'s forward and backward passes in the running :func:`count_nfe` block too,
    inside the ``with`` block: for a second denoiser an edit evaluates, such as the trainable copy
    a test-time finetuning method fits (:mod:`editeval.diffusion.finetuning`). Outside any
    counting block it counts nothing (and yields ``None``); the hooks are always removed.
    """
    counter = current_counter()
    handles = [] if counter is None else _attach(counter, module)
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def _attach(counter: NFECounter, module: torch.nn.Module) -> list:
    return [module.register_forward_pre_hook(counter._hook, with_kwargs=True),
            module.register_forward_hook(counter._output_hook, with_kwargs=True)]


def current_counter() -> NFECounter | None:
    """The counter of the innermost :func:`count_nfe` block running now, or ``None``."""
    return _ACTIVE.get()
