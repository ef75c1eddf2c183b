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

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_scheduler, noise_level_terms, predict_noise
from editeval.diffusion.ddpm import (
    ddpm_sample,
    extract_noise,
    step_levels,
    stochastic_step_mean,
)
from editeval.diffusion.inversion_cache import (
    cached_inversion,
    generator_digest,
    inversion_key,
)
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
    levels = step_levels(scheduler)
    noisy = []
    for _, alpha_t, _ in levels:
        draw = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha_t, latents)
        noisy.append(sqrt_alpha * latents + sqrt_one_minus * draw.to(latents))
    noisy.append(latents)
    noise_maps = []
    for k, (t, alpha_t, alpha_prev) in enumerate(levels):
        noise = predict_noise(unet, scheduler, noisy[k], t, cond, uncond, guidance_scale)
        mean, sigma = stochastic_step_mean(noisy[k], noise, alpha_t, alpha_prev, eta=1.0)
        z, noisy[k + 1] = extract_noise(noisy[k + 1], mean, sigma)
        noise_maps.append(z)
    return noisy, noise_maps


def _check(*, num_inference_steps: int, skip: int, **_: Any) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"ddpm-inversion: num_inference_steps must be >= 1, got "
                         f"{num_inference_steps}")
    if not 0 <= skip < num_inference_steps:
        raise ValueError(f"ddpm-inversion: skip must be in [0, {num_inference_steps}) (below "
                         f"num_inference_steps), got {skip}")


def edit_friendly_inversion(pipe: Any, inputs: EditInputs, generator: torch.Generator,
                            num_inference_steps: int, source_guidance_scale: float
                            ) -> tuple[Any, dict[str, list[torch.Tensor]], bool]:
    """:func:`ddpm_invert` of ``inputs.image`` under its source prompt, through the run's cache
    (shared by ``ddpm-inversion`` and ``ledits``).

    Returns ``(scheduler, {"noisy": ..., "noise_maps": ...}, cached)``: the DDIM scheduler set to
    the steps, :func:`ddpm_invert`'s lists (on the device the cache holds them) and whether they
    came from the cache.
    """
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    uncond = encode_prompt(pipe, "")
    key = inversion_key(kind="ddpm-edit-friendly", image=inputs.image,
                        prompt=inputs.source_prompt, pipe=pipe, scheduler=scheduler,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=source_guidance_scale,
                        options={"eta": 1.0, "seed": generator.initial_seed(),
                                 "generator_state": generator_digest(generator)})

    def invert() -> dict[str, list[torch.Tensor]]:
        noisy, noise_maps = ddpm_invert(pipe.unet, encode_image(pipe, inputs.image), scheduler,
                                        encode_prompt(pipe, inputs.source_prompt), uncond,
                                        source_guidance_scale, generator=generator)
        return {"noisy": noisy, "noise_maps": noise_maps}

    inverted, cached = cached_inversion(inputs.inversion_cache, key, invert)
    return scheduler, inverted, cached


@register_method(CARD, check=_check)
def ddpm_inversion(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                   num_inference_steps: int, source_guidance_scale: float, guidance_scale: float,
                   skip: int) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (see the module)."""
    scheduler, inverted, cached = edit_friendly_inversion(pipe, inputs, generator,
                                                          num_inference_steps,
                                                          source_guidance_scale)
    latents = ddpm_sample(pipe.unet, inverted["noisy"][skip].to(pipe.device),
                          [z.to(pipe.device) for z in inverted["noise_maps"][skip:]], scheduler,
                          encode_prompt(pipe, inputs.target_prompt), encode_prompt(pipe, ""),
                          guidance_scale, skip=skip)
    return MethodOutput(decode_latents(pipe, latents), {"inversion_cached": cached})
