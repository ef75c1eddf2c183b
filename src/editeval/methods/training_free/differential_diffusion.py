"""Differential Diffusion: a soft mask gives every pixel its own edit strength.

Paper: "Differential Diffusion: Giving Each Pixel Its Strength", Levin and Fried, arXiv:2306.00950,
2023 (Computer Graphics Forum 2025); official code: github.com/exx8/differential-diffusion
(``SD2/diff_pipe.py``, whose defaults we take).

Algorithm: the mask's grey level is each pixel's strength s in [0, 1] (255 = 1: change fully,
0: keep), resized to the latent grid bilinearly (without antialiasing, as the official code). One
noise draw eps noises the source latents x0 to every sampling timestep,
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps. Sampling starts from the noised source at the first
(noisiest) timestep; before step i of N (i = 0 the noisiest), every latent pixel whose strength is
below the step's threshold 1 - i / N is reset to the noised source of that timestep, so a pixel of
strength s is held to the source for the first (1 - s) N steps and denoised freely, under the
target prompt with classifier-free guidance, for the last s N: s = 1 changes as much as
text-to-image generation, s = 0 follows the noised source to the last step. A binary mask makes
this an inpainting of the white region.

Mask convention: editeval's mask marks what to edit (white = edit). The official code's map is
the opposite (white = keep: a pixel is reset while ``map > i / N``), so its map is 1 - s.

Defaults: the official pipeline's, 50 steps and guidance 7.5, the whole schedule (its ``strength``
1, which the official code's own docs call superseded by the map), the empty negative prompt.

Deviations:
- DDIM (eta = 0) as the sampler; the official code samples with the checkpoint's own scheduler
  (SD 2.1 base).
- The source latents are the VAE posterior's mean; the official code draws a sample from it.

Mask input: required; its grey levels are read (the card's ``soft_mask``), unlike every other
method's mask, which is binarised. An RGB mask is read by its luminance, so a JPEG's compression
noise becomes small strengths; an all-black mask, or a user's all-white one, is refused; a
dataset's all-white mask (a whole-image edit, as style change) is used as it is: strength 1
everywhere, text-to-image generation from the noised source.

NFE = 2 * num_inference_steps with guidance (num_inference_steps with guidance_scale 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import (
    ddim_scheduler,
    ddim_step,
    noise_level_terms,
    noise_levels,
    predict_noise,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

CARD = MethodCard(
    name="differential-diffusion",
    title="Differential Diffusion",
    paper=Paper("Differential Diffusion: Giving Each Pixel Its Strength", "arXiv", 2023,
                "2306.00950"),
    strategy="training-free",
    subcategory="mask-guidance",
    inputs=("target_prompt", "mask"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 7.5},
    nfe_formula="2 * num_inference_steps (num_inference_steps with guidance_scale 1)",
    deviations="DDIM sampler (the official code: the checkpoint's scheduler); the VAE "
               "posterior's mean instead of a sample",
    note="Reads the mask's grey levels as per-pixel strengths (white = change fully, black = "
         "keep): the official code's map inverted.",
    soft_mask=True,
)


def strength_map(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel strengths of a soft mask on the latent grid.

    Args:
        mask: mode ``"L"`` image, grey levels 0..255 (255 = change fully).
        size: the latent grid ``(h, w)``.

    Returns:
        (1, 1, h, w) float32 in [0, 1] on the CPU, resized bilinearly without antialiasing (the
        official code's ``torchvision`` resize).
    """
    grey = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(grey, size=size, mode="bilinear", align_corners=False, antialias=False)


@torch.no_grad()
def differential_sample(unet: Any, scheduler: Any, latents: torch.Tensor, strength: torch.Tensor,
                        noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                        guidance_scale: float) -> torch.Tensor:
    """DDIM sampling in which each latent pixel is held to the noised source until its strength
    reaches the step's threshold (module docstring).

    Args:
        unet, scheduler: the pipeline's UNet and a DDIM scheduler set to the sampling steps.
        latents: (1, 4, h, w) clean source latents.
        strength: (1, 1, h, w) per-pixel strengths in [0, 1].
        noise: (1, 4, h, w) the one standard normal draw that noises the source to every step.
        cond, uncond: (1, 77, D) embeddings of the target prompt and of the negative prompt.

    Returns:
        (1, 4, h, w) clean latents, the UNet's dtype. NFE = steps (x2 with guidance).
    """
    timesteps, alphas = noise_levels(scheduler)
    steps = len(timesteps)
    held = (1 - strength).to(latents.device)  # the official code's map
    latents, noise = latents.to(unet.dtype), noise.to(latents.device, unet.dtype)
    z = latents
    for i, t in enumerate(scheduler.timesteps):
        level = steps - i
        sqrt_alpha, sqrt_one_minus = noise_level_terms(alphas[level], latents)
        noised = sqrt_alpha * latents + sqrt_one_minus * noise
        z = noised if i == 0 else torch.where(held > i / steps, noised, z)
        eps = predict_noise(unet, scheduler, z, t, cond, uncond, guidance_scale)
        z = ddim_step(z, eps, alphas[level], alphas[level - 1])
    return z


def _check(*, num_inference_steps: int, **_: Any) -> None:
    if num_inference_steps < 1:
        raise ValueError("differential-diffusion: num_inference_steps must be >= 1, got "
                         f"{num_inference_steps}")


@register_method(CARD, check=_check)
def differential_diffusion(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                           num_inference_steps: int, guidance_scale: float) -> MethodOutput:
    """Edit ``inputs.image`` towards ``inputs.target_prompt``, each pixel as far as its strength
    in ``inputs.mask`` (module docstring)."""
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    latents = encode_image(pipe, inputs.image)
    strength = strength_map(inputs.mask, tuple(latents.shape[-2:]))
    noise = torch.randn(latents.shape, generator=generator)
    z = differential_sample(pipe.unet, scheduler, latents, strength, noise,
                            encode_prompt(pipe, inputs.target_prompt), encode_prompt(pipe, ""),
                            guidance_scale)
    return MethodOutput(decode_latents(pipe, z), {"strength": strength[0, 0]})
