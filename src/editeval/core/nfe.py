"""Counting UNet evaluations (NFE), the machine-independent cost of an edit.

The counter is a forward pre-hook on the UNet, installed by :func:`editeval.core.api.edit` around
every method call, so no method can forget to count. One NFE is one image passing through the UNet:
a classifier-free-guidance batch of 2 counts as 2, InstructPix2Pix's batch of 3 as 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class NFECounter:
    """Running count of UNet evaluations; ``nfe`` is the sum of the batch sizes seen."""

    nfe: int = 0
    calls: int = 0

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.nfe += int(sample.shape[0])
        self.calls += 1


@contextmanager
def count_nfe(unet: torch.nn.Module) -> Iterator[NFECounter]:
    """Count every forward pass of ``unet`` inside the ``with`` block; the hook is always removed."""
    counter = NFECounter()
    handle = unet.register_forward_pre_hook(counter._hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()
