"""Tiny random-weight metric backbones, built offline: a CLIP and a DINO-style ViT.

They have the architectures of ``openai/clip-vit-large-patch14`` (``CLIPModel`` with a
``CLIPProcessor``) and ``facebook/dino-vitb8`` (``ViTModel``, patch size 8, with a
``ViTImageProcessor``) at toy size (32 px inputs, hidden size 32, 2 layers), so every code path a real
backbone takes (``from_pretrained``, the processors, torchmetrics' CLIPScore, the key hook of the
structure distance) runs in a second on a CPU. Their numbers mean nothing: use them for plumbing and
golden-value tests, never for quality claims. Saved under ``editeval.core.cache.cache_dir()`` like
:func:`editeval.models.tiny.tiny_checkpoint`, and named ``tiny`` on the command line
(``--clip-model tiny``, ``--dino-model tiny``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

TINY_BACKBONE_VERSION = 1  # bump when a builder changes, so stale cached copies are not reused
TINY_IMAGE_SIZE = 32


def build_tiny_clip(path: str | os.PathLike) -> Path:
    """A 2-layer random ``CLIPModel`` (32 px images, patch 8, 16-dim embeddings) with a
    ``CLIPProcessor`` (the real CLIP tokenizer), saved to ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from editeval.models.tiny import TINY_SEED
    from editeval.models.tokenizer import clip_tokenizer

    torch.manual_seed(TINY_SEED)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407, **common),
        vision_config=dict(image_size=TINY_IMAGE_SIZE, patch_size=8, **common),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}),
        tokenizer=clip_tokenizer())
    processor.save_pretrained(path)
    return Path(path)


def build_tiny_dino(path: str | os.PathLike) -> Path:
    """A 2-layer random ``ViTModel`` (32 px images, patch 8, 4 heads) with a ``ViTImageProcessor``
    (ImageNet mean and std, as DINO's), saved to ``path``."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from editeval.models.tiny import TINY_SEED

    torch.manual_seed(TINY_SEED)
    config = ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(
        path)
    return Path(path)


@lru_cache(maxsize=None)
def tiny_backbone(kind: str) -> Path:
    """Path of the saved tiny metric backbone ``kind`` ("clip" or "dino"), built on first use.

    Raises:
        ValueError: unknown ``kind``.
    """
    from editeval.core.cache import build_once, cache_dir
    from editeval.models.progress import quiet_progress_bars

    builders = {"clip": build_tiny_clip, "dino": build_tiny_dino}
    if kind not in builders:
        raise ValueError(f"unknown tiny backbone {kind!r}; expected one of {', '.join(builders)}")
    with quiet_progress_bars():
        return build_once(cache_dir() / "tiny" / f"metrics-v{TINY_BACKBONE_VERSION}" / kind,
                          "config.json", builders[kind])
