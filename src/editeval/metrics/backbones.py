"""The networks behind the learned metrics: which one, by name, and loading it.

Every score is stored with the id of the backbone that made it (see :func:`backbone_id`), so numbers
from different backbones are never mixed. Names accepted wherever a backbone is chosen:

- a hub id (``openai/clip-vit-large-patch14``) or a local folder in ``from_pretrained`` layout;
- ``toy``: the toy world's CLIP, trained by editeval and shipped (``toyworld/weights/clip``, 64 px,
  64-dim embeddings). For the structure distance it is a *stand-in* for DINO: the keys of the last
  layer of the toy CLIP's image tower (a ViT with patch size 8, like DINO ViT-B/8), recorded as
  ``toy-clip-vision``, never as DINO;
- ``tiny``: the random tiny backbones of :mod:`editeval.metrics.tiny` (plumbing and tests only).

The field's defaults (:data:`FIELD_DEFAULTS`) need downloads; on runs of the shipped ``toy`` and
``tiny`` model suites the defaults are the offline ones of :data:`OFFLINE_DEFAULTS` instead, so
``editeval score RUN --metrics ...`` works without a network there (:func:`default_backbones`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from editeval.metrics.regions import chw

CLIP_DEFAULT = "openai/clip-vit-large-patch14"
DINO_DEFAULT = "facebook/dino-vitb8"
LPIPS_DEFAULT = "alex"
FID_DEFAULT = "inception"

FIELD_DEFAULTS = {"clip": CLIP_DEFAULT, "dino": DINO_DEFAULT, "lpips": LPIPS_DEFAULT,
                  "fid": FID_DEFAULT}
"""Backbones of the literature (CLIPScore and PIE-Bench's CLIP, PIE-Bench's DINO ViT-B/8, LPIPS'
AlexNet, FID's Inception-v3)."""

OFFLINE_DEFAULTS = {
    "toy": {"clip": "toy", "dino": "toy", "lpips": "alex-random", "fid": "toy"},
    "tiny": {"clip": "tiny", "dino": "tiny", "lpips": "alex-random", "fid": "tiny"},
}
"""Defaults on runs of the offline model suites (``config.json``'s ``model``): the toy (or tiny)
CLIP for the CLIP metrics and as FID/KID's feature extractor, its image tower as DINO's stand-in,
and LPIPS on a random-initialised AlexNet (see :mod:`editeval.metrics.perceptual`)."""


class BackboneUnavailableError(ValueError):
    """A metric backbone cannot be loaded (not cached and no network, or a package is missing);
    the message names it and says what to pass instead."""


def default_backbones(run_model: str | None) -> dict[str, str]:
    """The backbone names to use for a run made with ``run_model`` (see the module docstring)."""
    return dict(OFFLINE_DEFAULTS.get(run_model or "", FIELD_DEFAULTS))


def resolve_vision_checkpoint(name: str, kind: str) -> tuple[str, str]:
    """``(checkpoint, backbone id)`` for a CLIP (``kind="clip"``) or DINO (``kind="dino"``) name.

    ``toy``/``tiny`` become the shipped or built folders; anything else is returned as it is (a hub
    id or a folder) and is its own id.
    """
    from editeval.metrics.tiny import tiny_backbone
    from editeval.toyworld.models import checkpoint

    if name == "toy":
        return str(checkpoint("clip")), "toy-clip" if kind == "clip" else "toy-clip-vision"
    if name == "tiny":
        return str(tiny_backbone(kind)), f"tiny-{kind}"
    return name, name


def load_pretrained(loader: Any, checkpoint: str, what: str, option: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(checkpoint)`` with failures turned into
    :class:`BackboneUnavailableError` naming ``what`` and the command-line ``option`` to change."""
    from transformers.utils import logging as transformers_logging

    from editeval.models.loading import quiet_progress_bars

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # no load report for a CLIP's unused text tower
    try:
        with quiet_progress_bars():
            return loader.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneUnavailableError(
            f"{what} {checkpoint!r} could not be loaded ({reason}); download it once with network "
            f"access, pass {option} with a local folder, or use {option} toy on toy-world runs"
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)


class ClipEmbeddings(nn.Module):
    """A ``transformers`` ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return
    the projected embeddings as tensors, as torchmetrics' CLIPScore expects.

    transformers 5 returns an output object from these methods (the embeddings in its
    ``pooler_output``); transformers 4 returned the tensor. This adapter accepts both, so
    torchmetrics' metric runs unchanged on either.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings, float ``[N, projection_dim]`` (not normalised)."""
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text embeddings, float ``[N, projection_dim]`` (not normalised)."""
        return self._tensor(self.model.get_text_features(input_ids=input_ids,
                                                         attention_mask=attention_mask))


@dataclass
class ClipBackbone:
    """A CLIP model with its processor. ``name``: the id recorded with every score."""

    name: str
    model: ClipEmbeddings
    processor: Any

    def torchmetrics_source(self):
        """What torchmetrics' ``clip_score``/``CLIPScore`` take as ``model_name_or_path``: a
        callable returning this (model, processor)."""
        return lambda: (self.model, self.processor)

    @torch.no_grad()
    def image_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        """Embeddings (float32 ``[N, D]``, not normalised) of uint8 ``H x W x 3`` images, through the
        same processor call as torchmetrics' CLIPScore."""
        tensors = [chw(image) for image in images]
        pixels = self.processor(images=tensors, return_tensors="pt", padding=True)["pixel_values"]
        return self.model.get_image_features(pixels.to(self.model.model.dtype)).float()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (float32 ``[N, D]``, not normalised) of captions (truncated to 77 tokens)."""
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return self.model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).float()


def load_clip(name: str) -> ClipBackbone:
    """The CLIP backbone ``name`` (hub id, folder, ``toy`` or ``tiny``) in float32 on the CPU.

    Raises:
        BackboneUnavailableError: not cached and no network, or not a CLIP checkpoint.
    """
    from transformers import CLIPModel, CLIPProcessor

    checkpoint, backbone = resolve_vision_checkpoint(name, "clip")
    model = load_pretrained(CLIPModel, checkpoint, "CLIP model", "--clip-model",
                            dtype=torch.float32)
    processor = load_pretrained(CLIPProcessor, checkpoint, "CLIP processor", "--clip-model")
    return ClipBackbone(backbone, ClipEmbeddings(model.eval()), processor)
