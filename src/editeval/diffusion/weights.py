"""The identity of a loaded pipeline's weights, for keys of results computed with them.

A result computed with a model (an inversion) may be reused only with the same weights. Neither
the checkpoint's path nor its configuration says which weights are loaded: a swapped VAE, a LoRA
or a finetuned UNet saved over the same directory keep both. :func:`weights_digest` hashes the
weights themselves.

Cost: sha256 runs over every byte of every weight, about 0.5-1 GB/s on one CPU core; Stable
Diffusion 1.5 (about 1.07 billion parameters in the UNet, VAE and text encoder) holds 2.1 GB in
float16 and 4.3 GB in float32, a few seconds, paid once per loaded pipeline (the digest is kept on
the pipeline object) and again only after its weights change.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

_CACHE_ATTRIBUTE = "_editeval_weights_digest"


def _modules(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's torch modules (denoiser, VAE, text encoders, ...) by component name."""
    return sorted(((name, module) for name, module in pipe.components.items()
                   if isinstance(module, torch.nn.Module)), key=lambda item: item[0])


def _fingerprint(modules: list[tuple[str, torch.nn.Module]]) -> tuple:
    """What changes whenever a weight does, cheaply: each module's identity and each tensor's
    name, storage address and version counter (bumped by every in-place change, such as
    ``load_state_dict``, ``torch.no_grad()`` updates or fusing a LoRA)."""
    return tuple((name, id(module), key, tensor.data_ptr(), tensor._version, tuple(tensor.shape),
                  tensor.dtype)
                 for name, module in modules for key, tensor in module.state_dict().items())


def _digest(modules: list[tuple[str, torch.nn.Module]]) -> str:
    digest = hashlib.sha256()
    for name, module in modules:
        for key, tensor in module.state_dict().items():
            digest.update(f"{name}.{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def weights_digest(pipe: Any) -> str:
    """sha256 (hex) of every weight of ``pipe``: each torch module among its components (the
    denoiser, the VAE, the text encoder(s), ...), with the tensors' names, dtypes and shapes.

    Equal weights give equal digests, wherever they were loaded from; any changed weight, a swapped
    component or another dtype gives another. Computed once per pipeline and kept on it; computed
    again only when a component was replaced or a weight tensor replaced or changed in place
    (changes written through ``tensor.data`` bypass torch's version counter and are not seen).
    """
    modules = _modules(pipe)
    fingerprint = _fingerprint(modules)
    cached = getattr(pipe, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[1] == fingerprint:
        return cached[2]
    digest = _digest(modules)
    # the modules are held so that their ids and storage addresses stay unique while cached
    object.__setattr__(pipe, _CACHE_ATTRIBUTE, ([module for _, module in modules], fingerprint,
                                                digest))
    return digest
