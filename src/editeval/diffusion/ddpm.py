"""Stochastic DDIM sampling (eta > 0) with given noise maps, and CycleDiffusion's DPM-Encoder.

DDIM's sampler (Song, Meng and Ermon, ICLR 2021, arXiv:2010.02502) with ``eta`` in (0, 1] steps from
``x_t`` (alpha-bar ``a_t``) to the level ``a_prev`` as::

    x0      = (x_t - sqrt(1 - a_t) eps(x_t)) / sqrt(a_t)
    x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps(x_t) + sigma_t z_t
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))

``eta`` = 1 is DDPM's ancestral sampler. Given the per-step noises ``z_t`` (the *noise maps*),
sampling is deterministic: a noisy start latent plus the maps are a latent code of the image, and
decoding the code under another prompt edits it. Two encoders find such a code for a real image:

- edit-friendly DDPM inversion (:mod:`editeval.methods.training_free.ddpm_inversion`): noisy latents
  drawn independently at every level, eta 1;
- CycleDiffusion's DPM-Encoder (:func:`dpm_encode`): a chain drawn from the sampler's own posterior
  ``q(x_{t-1} | x_t, x_0)``, any eta in (0, 1].

Both extract ``z_t = (x_{t-1} - mean_t) / sigma_t`` against the model's step mean and store
``x_{t-1} = mean_t + sigma_t z_t`` back, so :func:`ddpm_sample` with the same prompt and guidance
regenerates every stored latent bit for bit. Schedule terms are computed in float32
(:func:`~editeval.diffusion.ddim.noise_level_terms`).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.diffusion.ddim import (
    NoisePredictor,
    noise_level_terms,
    noise_levels,
    predict_noise,
)

Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def step_levels(scheduler: Any) -> list[Level]:
    """``(timestep, a_t, a_prev)`` of every sampling step of ``scheduler``, noisiest first.

    The alpha-bars are float32 0-dim tensors; the last step's ``a_prev`` is the scheduler's
    ``final_alpha_cumprod`` (the clean level).
    """
    count = len(scheduler.timesteps)
    _, alphas = noise_levels(scheduler)
    return [(t, alphas[count - k], alphas[count - k - 1])
            for k, t in enumerate(scheduler.timesteps)]


def _sigma(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """float32 standard deviation of the step from ``alpha_t`` to ``alpha_prev`` at ``eta``."""
    alpha_t, alpha_prev = alpha_t.float(), alpha_prev.float()
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return eta * variance.clamp(min=0).sqrt()


def stochastic_step_mean(latents: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor,
                         alpha_prev: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the DDIM step at ``eta`` from ``alpha_t`` to ``alpha_prev``.

    ``latents`` and ``noise`` (the model's noise prediction there): (batch, 4, h, w). Returns the
    mean (same shape and dtype) and sigma (a 0-dim tensor in the latents' dtype); the schedule
    terms are computed in float32, then cast.
    """
    sigma = _sigma(alpha_t, alpha_prev, eta)
    sqrt_alpha, sqrt_one_minus = noise_level_terms(alpha_t, latents)
    sqrt_alpha_prev, _ = noise_level_terms(alpha_prev, latents)
    direction = (1 - alpha_prev.float() - sigma ** 2).clamp(min=0).sqrt().to(latents)
    x0 = (latents - sqrt_one_minus * noise) / sqrt_alpha
    return sqrt_alpha_prev * x0 + direction * noise, sigma.to(latents)


def extract_noise(target: torch.Tensor, mean: torch.Tensor,
                  sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise map ``z = (target - mean) / sigma`` of one step and the latent ``mean + sigma z``
    that sampling with it reproduces exactly (``z`` = 0 and the mean itself where sigma is 0)."""
    z = (target - mean) / sigma if sigma > 0 else torch.zeros_like(mean)
    return z, mean + sigma * z


@torch.no_grad()
def ddpm_sample(unet: Any, latents: torch.Tensor, noise_maps: list[torch.Tensor], scheduler: Any,
                cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                guidance_scale: float = 1.0, *, skip: int = 0, eta: float = 1.0,
                predict: NoisePredictor | None = None) -> torch.Tensor:
    """Stochastic DDIM sampling (DDPM at ``eta`` 1) with given noise maps, from step ``skip`` to
    clean latents.

    Args:
        latents: (1, 4, h, w) at ``scheduler.timesteps[skip]``.
        noise_maps: one (1, 4, h, w) map per step from ``skip`` on (``steps - skip`` of them), as
            :func:`dpm_encode` or edit-friendly DDPM inversion return them.
        cond, uncond: (1, 77, D) text embeddings; ``uncond`` is needed when ``guidance_scale != 1``.
        eta: in (0, 1], as the maps were extracted with.
        predict: the noise estimate ``(i, t, latents) -> eps`` (i = 0 at step ``skip``) instead of
            the guidance of ``cond``/``uncond`` (then not needed); LEDITS's semantic guidance.

    Returns:
        (1, 4, h, w) clean latents. NFE = (steps - skip) (x2 with guidance; with ``predict``,
        its own).

    Raises:
        ValueError: ``skip`` outside [0, steps) or a wrong number of noise maps.
    """
    levels = step_levels(scheduler)
    if not 0 <= skip < len(levels):
        raise ValueError(f"skip must be in [0, {len(levels)}), got {skip}")
    if len(noise_maps) != len(levels) - skip:
        raise ValueError(f"need one noise map per step from skip={skip} on "
                         f"({len(levels) - skip}), got {len(noise_maps)}")
    for i, ((t, alpha_t, alpha_prev), z) in enumerate(zip(levels[skip:], noise_maps)):
        noise = predict(i, t, latents) if predict is not None else \
            predict_noise(unet, scheduler, latents, t, cond, uncond, guidance_scale)
        mean, sigma = stochastic_step_mean(latents, noise, alpha_t, alpha_prev, eta)
        latents = mean + sigma * z.to(mean)
    return latents


@torch.no_grad()
def dpm_encode(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor,
               uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, *, eta: float,
               skip: int = 0, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CycleDiffusion's DPM-Encoder: the latent code of clean ``latents`` under a prompt.

    Wu and De la Torre, "A Latent Space of Stochastic Diffusion Models for Zero-Shot Image Editing
    and Guidance", ICCV 2023, arXiv:2210.05559. Draws ``x_s ~ q(x_s | x_0)`` at the step ``skip``
    timestep ``s``, then, step by step, ``x_{t-1} ~ q(x_{t-1} | x_t, x_0)``, the sampler's own
    posterior at ``eta`` (mean ``sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) (x_t - sqrt(a_t)
    x_0) / sqrt(1 - a_t)``, deviation sigma; the last step lands on ``x_0`` itself), and keeps the
    noise map ``z_t`` that the model's step at ``x_t`` needs to reach it (see the module docstring).

    Args:
        latents: (1, 4, h, w) clean latents x_0.
        scheduler: a DDIM scheduler set to the number of steps.
        cond, uncond: (1, 77, D) embeddings of the source prompt and the unconditional prompt
            (needed when ``guidance_scale != 1``).
        eta: in (0, 1]. skip: steps left out at the noisy end, in [0, steps).
        generator: a CPU generator; draws x_s's noise, then one posterior noise per step.

    Returns:
        ``(start, noise_maps)``: ``start`` (the latent at ``scheduler.timesteps[skip]``) and
        ``steps - skip`` noise maps, the code that :func:`ddpm_sample` decodes: under the same
        prompt and guidance it returns ``latents`` up to rounding. All in the latents' dtype.
        NFE = (steps - skip) (x2 with guidance).

    Raises:
        ValueError: ``eta`` outside (0, 1] or ``skip`` outside [0, steps).
    """
    levels = step_levels(scheduler)
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1] (the encoder needs noise), got {eta}")
    if not 0 <= skip < len(levels):
        raise ValueError(f"skip must be in [0, {len(levels)}), got {skip}")

    def draw() -> torch.Tensor:
        return torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)

    sqrt_alpha, sqrt_one_minus = noise_level_terms(levels[skip][1], latents)
    current = sqrt_alpha * latents + sqrt_one_minus * draw()
    start, noise_maps = current, []
    for k, (t, alpha_t, alpha_prev) in enumerate(levels[skip:], start=skip):
        if k == len(levels) - 1:
            target = latents
        else:  # the posterior is the sampler's step with the true noise of x_t
            sqrt_alpha_t, sqrt_one_minus_t = noise_level_terms(alpha_t, latents)
            true_noise = (current - sqrt_alpha_t * latents) / sqrt_one_minus_t
            posterior, sigma = stochastic_step_mean(current, true_noise, alpha_t, alpha_prev, eta)
            target = posterior + sigma * draw()
        noise = predict_noise(unet, scheduler, current, t, cond, uncond, guidance_scale)
        mean, sigma_t = stochastic_step_mean(current, noise, alpha_t, alpha_prev, eta)
        z, current = extract_noise(target, mean, sigma_t)
        noise_maps.append(z)
    return start, noise_maps
