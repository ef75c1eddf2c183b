"""Images <-> VAE latents and prompts -> text embeddings, for pipelines with SD's components."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def encode_image(pipe: Any, image: Image.Image) -> torch.Tensor:
    """VAE latents of ``image``: the posterior mean times the VAE's scaling factor.

    ``image`` is RGB with sides multiples of 8; returns shape (1, 4, H/8, W/8) in the VAE's dtype on
    its device. The mean, not a sample, so inversion is deterministic.
    """
    vae = pipe.vae
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    pixels = pixels.permute(2, 0, 1)[None].to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> Image.Image:
    """The RGB image (uint8) decoded from SD latents of shape (1, 4, h, w)."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    pixels = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def encode_prompt(pipe: Any, prompt: str) -> torch.Tensor:
    """CLIP text embeddings of ``prompt``, shape (1, 77, D), as the pipeline computes them."""
    embeddings, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    return embeddings
