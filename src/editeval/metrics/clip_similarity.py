"""CLIP-based edit metrics: CLIPScore, CLIP-I and directional CLIP similarity.

- **CLIPScore** (Hessel, Holtzman, Forbes, Le Bras and Choi, "CLIPScore: A Reference-free
  Evaluation Metric for Image Captioning", EMNLP 2021, arXiv:2104.08718) of the edit against the
  target prompt, computed by torchmetrics' ``clip_score``. Scale: **torchmetrics', 100 * max(cos, 0)**
  in [0, 100] (PIE-Bench's "CLIP similarity" uses it too), not the paper's 2.5 * max(cos, 0); divide
  by 40 to get the paper's. ``clip_t`` scores the whole edit, ``clip_t_edited`` the edit with its
  unedited region zeroed (PIE-Bench's "Edited" CLIP similarity; see
  :mod:`editeval.metrics.regions`).
- **CLIP-I**: cosine similarity of the CLIP image embeddings of the source and the edit, in [-1, 1]
  (raw cosine, not clamped or scaled; DreamBooth's CLIP-I, InstructPix2Pix's "CLIP image
  similarity"). High means the edit kept the source's look.
- **Directional CLIP similarity** (Gal, Patashnik, Maron, Bermano, Chechik and Cohen-Or,
  "StyleGAN-NADA: CLIP-Guided Domain Adaptation of Image Generators", SIGGRAPH 2022,
  arXiv:2108.00946; as InstructPix2Pix uses it to score edits): cosine of the change of the image
  embedding (edit - source) and the change of the text embedding (target prompt - source prompt),
  each embedding L2-normalised first, in [-1, 1]. NaN when either change is zero (an unchanged image or identical prompts) or when the
  source prompt is empty.

Embeddings are the CLIP model's projected embeddings (``get_image_features``/``get_text_features``)
of the images and prompts as its processor prepares them (EditEval and the toy world: resize the
shortest side and centre-crop to the model's input size).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score

from editeval.metrics.backbones import ClipBackbone
from editeval.metrics.regions import chw


@torch.no_grad()
def clip_score(backbone: ClipBackbone, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
    """CLIPScore 100 * max(cos, 0) of each uint8 ``H x W x 3`` image with its caption: float64
    ``[N]`` in [0, 100], by torchmetrics (one image per call: torchmetrics averages a batch)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    source = backbone.torchmetrics_source()
    return np.array([
        float(torchmetrics_clip_score(chw(image), caption, model_name_or_path=source))
        for image, caption in zip(images, captions)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of ``[N, D]`` embeddings: float64 ``[N]``; NaN where a row is
    zero."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    values = (a * b).sum(-1) / norms
    return torch.where(norms > 0, values, torch.full_like(values, float("nan"))).numpy()


def clip_image_similarity(source_embeddings: torch.Tensor,
                          edit_embeddings: torch.Tensor) -> np.ndarray:
    """CLIP-I: cosine of source and edit image embeddings (``[N, D]`` each): float64 ``[N]``."""
    return cosine(source_embeddings, edit_embeddings)


def directional_similarity(source_image: torch.Tensor, edit_image: torch.Tensor,
                           source_text: torch.Tensor, target_text: torch.Tensor) -> np.ndarray:
    """Directional CLIP similarity cos(E_I(edit) - E_I(source), E_T(target) - E_T(source)) of
    ``[N, D]`` embeddings: float64 ``[N]`` in [-1, 1], NaN where a difference is zero.

    Each embedding is L2-normalised before the differences are taken, as in StyleGAN-NADA's
    directional loss and InstructPix2Pix's evaluation code.
    """
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x.double() / x.double().norm(dim=-1, keepdim=True)

    return cosine(unit(edit_image) - unit(source_image), unit(target_text) - unit(source_text))
