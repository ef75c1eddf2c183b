"""DINO structure distance (Tumanyan, Bar-Tal, Bagon and Dekel, "Splicing ViT Features for Semantic
Appearance Transfer", CVPR 2022, arXiv:2201.00424), as PIE-Bench (Ju et al., ICLR 2024) reports it.

The structure of an image is the self-similarity of the keys of the last layer of a self-supervised
ViT (DINO ViT-B/8, ``facebook/dino-vitb8``): the keys of all tokens (the [CLS] token included), the
heads concatenated, form a ``[T, C]`` matrix K; its token-by-token cosine similarity
``S = K K^T / (|K_i| |K_j|)`` is ``[T, T]``. The distance of source and edit is the mean squared
difference of their ``S`` (PIE-Bench prints it x 10^3): 0 for identical images, symmetric, small
when the layout is kept whatever the appearance. Images are prepared by the backbone's own image
processor (DINO: resize to 224 x 224, ImageNet mean and std; PIE-Bench resizes the shorter side to
224, the same for its square images).

The keys are read with a forward hook on the last layer's key projection (``k_proj`` in
transformers 5, ``attention.key`` before), so any ViT works: ``--dino-model toy`` uses the toy
CLIP's image tower (a ViT with patch size 8) as a clearly named stand-in when DINO's weights are
not available, recorded as ``toy-clip-vision``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from editeval.metrics.backbones import load_pretrained, resolve_vision_checkpoint
from editeval.metrics.regions import chw


@dataclass
class StructureBackbone:
    """A ViT, its image processor and its last layer's key projection. ``name``: the recorded id."""

    name: str
    vit: nn.Module
    processor: Any
    keys: nn.Module

    @torch.no_grad()
    def self_similarity(self, images: list[np.ndarray]) -> torch.Tensor:
        """Cosine self-similarity of the last layer's keys, float64 ``[N, T, T]``, of uint8
        ``H x W x 3`` images."""
        captured: list[torch.Tensor] = []
        hook = self.keys.register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            tensors = [chw(image) for image in images]
            pixels = self.processor(images=tensors, return_tensors="pt")["pixel_values"]
            self.vit(pixel_values=pixels.to(next(self.vit.parameters()).dtype))
        finally:
            hook.remove()
        keys = captured[-1].double()  # [N, T, heads * head_dim]
        norms = keys.norm(dim=-1, keepdim=True)
        return keys @ keys.transpose(1, 2) / (norms @ norms.transpose(1, 2)).clamp(min=1e-8)

    def distance(self, sources: list[np.ndarray], edits: list[np.ndarray]) -> np.ndarray:
        """Structure distance of each (source, edit) pair: float64 ``[N]``, at least 0."""
        if len(sources) != len(edits):
            raise ValueError(f"{len(sources)} sources but {len(edits)} edits")
        difference = self.self_similarity(sources) - self.self_similarity(edits)
        return difference.pow(2).mean(dim=(1, 2)).numpy()


def _last_key_projection(vit: nn.Module) -> nn.Module:
    found = [module for name, module in vit.named_modules()
             if name.endswith(("k_proj", "attention.key"))]
    if not found:
        raise ValueError(f"{type(vit).__name__} has no attention key projection (k_proj); the "
                         "structure distance needs a ViT such as facebook/dino-vitb8")
    return found[-1]


def load_structure_backbone(name: str) -> StructureBackbone:
    """The ViT ``name`` (hub id, folder, ``toy`` or ``tiny``) for the structure distance, float32 on
    the CPU. A CLIP checkpoint contributes its image tower.

    Raises:
        BackboneUnavailableError: not cached and no network. ValueError: not a ViT.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

    checkpoint, backbone = resolve_vision_checkpoint(name, "dino")
    config = load_pretrained(AutoConfig, checkpoint, "ViT", "--dino-model")
    loader = CLIPVisionModel if config.model_type == "clip" else AutoModel
    vit = load_pretrained(loader, checkpoint, "ViT", "--dino-model", dtype=torch.float32).eval()
    processor = load_pretrained(AutoImageProcessor, checkpoint, "ViT image processor",
                                "--dino-model")
    return StructureBackbone(backbone, vit, processor, _last_key_projection(vit))
