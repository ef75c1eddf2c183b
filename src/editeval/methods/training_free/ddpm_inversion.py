"""Edit-friendly DDPM inversion: noise maps that regenerate the source exactly, reused under the
target prompt.

Paper: "An Edit Friendly DDPM Noise Space: Inversion and Manipulations", Huberman-Spiegelglas,
Kulikov and Michaeli, CVPR 2024, arXiv:2304.06140.

Inversion. Draw the noisy latents ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n_t`` at every timestep of
the schedule with *independent* standard normal ``n_t`` (not a chain, unlike DDPM's forward
process), then, from the noisiest down, extract the noise map of each DDPM step (DDIM with
``eta`` = 1)::

    mu_t = sqrt(a_prev) * x0_pred(x_t) + sqrt(1 - a_prev - sigma_t^2) * eps(x_t)
    z_t  = (x_{t-1} - mu_t) / sigma_t,   sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)

and store ``x_{t-1} = mu_t + sigma_t z_t`` back (the official code's correction). Sampling with the
same prompt, guidance and these ``z_t`` then regenerates every ``x_t`` and ``x_0`` bit for bit.
The noise predictions use the source prompt with classifier-free guidance ``source_guidance_scale``.

Editing: start from the stored ``x_t`` at the ``skip``-th noisiest timestep and sample the remaining
``num_inference_steps - skip`` DDPM steps under the target prompt with guidance ``guidance_scale``
and the same noise maps. The generator of :func:`editeval.editing.edit` draws the ``n_t``, so the
seed is part of the inversion (and of its cache key).

Defaults (the paper's Stable Diffusion editing settings, as in the official ``main_run.py``):
100 steps, ``source_guidance_scale`` 3.5, ``guidance_scale`` 15, ``skip`` (T_skip) 36, eta 1.

Deviations: the official code zeroes the noise map of the last step (to the clean level) after
inverting, which breaks exact regeneration by that step's (small) noise; we keep it, so the
defining property holds exactly. Where a scheduler's last level is 1 (``set_alpha_to_one``) that
step has no noise (sigma 0) and its map is zero. The source latents are the VAE posterior mean,
as in the official code (``latent_dist.mode()``).

NFE = num_inference_steps * (2, or 1 with source_guidance_scale 1) (the inversion, all steps, so it
serves any ``skip``) + (num_inference_steps - skip) * (2, or 1 with guidance_scale 1) (the edit).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import (
    ddim_scheduler,
    noise_level_terms,
    noise_levels,
    predict_noise,
)
from editeval.diffusion.inversion_cache import cached_inversion, inversion_key
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

CARD = MethodCard(
    name="ddpm-inversion",
    title="Edit-friendly DDPM inversion",
    paper=Paper("An Edit Friendly DDPM Noise Space: Inversion and Manipulations", "CVPR", 2024,
                "2304.06140"),
    strategy="training-free",
    subcategory="inversion-sampling-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 100, "source_guidance_scale": 3.5, "guidance_scale": 15.0,
              "skip": 36},
    nfe_formula="2 * num_inference_steps + 2 * (num_inference_steps - skip)  (each term 1x when "
                "its guidance scale is 1; the first is the inversion)",
    deviations="keeps the last step's noise map (the official code zeroes it), so regeneration "
               "is exact",
)


def _step_levels(scheduler: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(timestep, a_t, a_prev) of every step, noisiest first."""
    count = len(scheduler.timesteps)
    _, alphas = noise_levels(scheduler)
    return [(t, alphas[count - k], alphas[count - k - 1])
            for k, t in enumerate(scheduler.timesteps)]


def _ddpm_mean(latents: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor,
               alpha_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the DDPM (eta 1) step from ``alpha_t`` to ``alpha_prev``.

    The schedule terms are computed in float32 from the float32 alpha-bars, then cast to the
    latents' dtype (:func:`~editeval.diffusion.ddim.noise_level_terms`).
    """
    alpha_t, alpha_prev = alpha_t.float(), alpha_prev.float()
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha_t, latents)
    sqrt_alpha_prev, _ = noise_level_terms(alpha_prev, latents)
    direction = (1 - alpha_prev - variance).clamp(min=0).sqrt().to(latents)
    x0 = (latents - sqrt_one_minus * noise) / sqrt_alpha
    mean = sqrt_alpha_prev * x0 + direction * noise
    return mean, variance.sqrt().to(latents)


@torch.no_grad()
def ddpm_invert(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, *,
                generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Edit-friendly DDPM inversion of clean ``latents``.

    Args:
        unet: the pipeline's UNet. latents: (1, 4, h, w) clean latents.
        scheduler: a DDIM scheduler set to the number of steps (:func:`ddim_scheduler`).
        cond, uncond: (1, 77, D) text embeddings; ``uncond`` is needed when ``guidance_scale != 1``.
        generator: a CPU generator; draws the independent noises of the noisy latents.

    Returns:
        ``(noisy, noise_maps)``: ``noisy[k]`` is the latent at ``scheduler.timesteps[k]`` (noisiest
        first) and ``noisy[-1]`` the clean level as the last step regenerates it (``latents`` up
        to rounding); ``noise_maps[k]`` is the noise map of step k. Each entry is stored as
        ``mean + sigma * z``, so :func:`ddpm_sample` from ``noisy[0]`` with the same prompt and
        guidance returns ``noisy[-1]`` bit for bit. All in the latents' dtype and shape.
        NFE = steps (x2 with guidance).
    """
    levels = _step_levels(scheduler)
    noisy = []
    for _, alpha_t, _ in levels:
        draw = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha_t, latents)
        noisy.append(sqrt_alpha * latents + sqrt_one_minus * draw.to(latents))
    noisy.append(latents)
    noise_maps = []
    for k, (t, alpha_t, alpha_prev) in enumerate(levels):
        noise = predict_noise(unet, scheduler, noisy[k], t, cond, uncond, guidance_scale)
        mean, sigma = _ddpm_mean(noisy[k], noise, alpha_t, alpha_prev)
        z = (noisy[k + 1] - mean) / sigma if sigma > 0 else torch.zeros_like(mean)
        noisy[k + 1] = mean + sigma * z
        noise_maps.append(z)
    return noisy, noise_maps


@torch.no_grad()
def ddpm_sample(unet: Any, latents: torch.Tensor, noise_maps: list[torch.Tensor], scheduler: Any,
                cond: torch.Tensor, uncond: torch.Tensor | None = None,
                guidance_scale: float = 1.0, *, skip: int = 0) -> torch.Tensor:
    """DDPM sampling (eta 1) with the given noise maps, from step ``skip`` to clean latents.

    ``latents``: (1, 4, h, w) at ``scheduler.timesteps[skip]``; ``noise_maps``: one per step of the
    scheduler, as from :func:`ddpm_invert`. NFE = (steps - skip) (x2 with guidance).

    Raises:
        ValueError: ``skip`` outside [0, steps) or a wrong number of noise maps.
    """
    levels = _step_levels(scheduler)
    if len(noise_maps) != len(levels):
        raise ValueError(f"need one noise map per step ({len(levels)}), got {len(noise_maps)}")
    if not 0 <= skip < len(levels):
        raise ValueError(f"skip must be in [0, {len(levels)}), got {skip}")
    for k in range(skip, len(levels)):
        t, alpha_t, alpha_prev = levels[k]
        noise = predict_noise(unet, scheduler, latents, t, cond, uncond, guidance_scale)
        mean, sigma = _ddpm_mean(latents, noise, alpha_t, alpha_prev)
        latents = mean + sigma * noise_maps[k].to(mean)
    return latents


def _generator_digest(generator: torch.Generator) -> str:
    """sha256 of the generator's state: the inversion depends on the draws it will make."""
    return hashlib.sha256(np.asarray(generator.get_state()).tobytes()).hexdigest()


def _check(*, num_inference_steps: int, skip: int, **_: Any) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"ddpm-inversion: num_inference_steps must be >= 1, got "
                         f"{num_inference_steps}")
    if not 0 <= skip < num_inference_steps:
        raise ValueError(f"ddpm-inversion: skip must be in [0, {num_inference_steps}) (below "
                         f"num_inference_steps), got {skip}")


@register_method(CARD, check=_check)
def ddpm_inversion(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                   num_inference_steps: int, source_guidance_scale: float, guidance_scale: float,
                   skip: int) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (see the module)."""
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    uncond = encode_prompt(pipe, "")
    key = inversion_key(kind="ddpm-edit-friendly", image=inputs.image,
                        prompt=inputs.source_prompt, pipe=pipe, scheduler=scheduler,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=source_guidance_scale,
                        options={"eta": 1.0, "seed": generator.initial_seed(),
                                 "generator_state": _generator_digest(generator)})

    def invert() -> dict[str, list[torch.Tensor]]:
        noisy, noise_maps = ddpm_invert(pipe.unet, encode_image(pipe, inputs.image), scheduler,
                                        encode_prompt(pipe, inputs.source_prompt), uncond,
                                        source_guidance_scale, generator=generator)
        return {"noisy": noisy, "noise_maps": noise_maps}

    inverted, cached = cached_inversion(inputs.inversion_cache, key, invert)
    latents = ddpm_sample(pipe.unet, inverted["noisy"][skip].to(pipe.device),
                          [z.to(pipe.device) for z in inverted["noise_maps"]], scheduler,
                          encode_prompt(pipe, inputs.target_prompt), uncond, guidance_scale,
                          skip=skip)
    return MethodOutput(decode_latents(pipe, latents), {"inversion_cached": cached})
