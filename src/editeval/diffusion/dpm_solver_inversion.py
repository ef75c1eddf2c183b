"""LEDITS++'s inversion: edit-friendly inversion for the second-order SDE-DPM-Solver++ sampler.

Papers: "LEDITS++: Limitless Image Editing using Text-to-Image Models", Brack, Friedrich, Kornmeier,
Tsaban, Schramowski, Kersting and Passos, CVPR 2024, arXiv:2311.16711 (section 3.1; official code:
ml-research/ledits_pp); the sampler is the stochastic (SDE) variant of the multistep second-order
DPM-Solver++ (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", arXiv:2211.01095), ``algorithm_type="sde-dpmsolver++"``, ``solver_order=2`` in diffusers.

**Sampler.** With ``alpha_t = sqrt(a_t)``, ``sigma_t = sqrt(1 - a_t)`` (``a_t`` the alpha-bar),
``lambda_t = log(alpha_t / sigma_t)`` and the model's clean-latent estimate ``x0_t = (x_t - sigma_t
eps(x_t)) / alpha_t``, one step from timestep ``s`` to the next, less noisy ``t`` (``h = lambda_t -
lambda_s``) is::

    x_t = sigma_t / sigma_s e^-h x_s + alpha_t (1 - e^-2h) (D0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z_s
    D0 = x0_s,   D1 = (x0_s - x0_prev) h / h_prev      (D1 = 0 at the first step: first order)

with ``x0_prev`` and ``h_prev`` those of the step before and ``z_s`` standard normal noise.

**Timesteps** (the official code): ``steps`` integers evenly spaced from ``T (1 - skip) - 1`` down to
1 (``T`` = 1000 training timesteps; ``skip`` leaves out the noisiest part of the schedule), then 0,
the clean end (``a_0`` = the first alpha-bar).

**Inversion** (as edit-friendly DDPM inversion, Huberman-Spiegelglas et al., CVPR 2024,
arXiv:2304.06140): draw ``x_t = alpha_t x_0 + sigma_t n_t`` at every timestep with independent
standard normal ``n_t``, then, from the noisiest timestep down, solve each step for its noise
``z_s = (x_t - mean_s) / std_s`` and store ``x_t = mean_s + std_s z_s`` back. Sampling from the
noisiest latent with the same noise estimates and these ``z_s`` then regenerates every stored latent
bit for bit (:func:`dpm_solver_sample` and :func:`dpm_solver_invert` share one step). The official
scheduler, when sampling fewer than 15 steps, takes the last step at first order while its inversion
does not; here both always use the update above, so reconstruction is exact at any step count.

Schedule terms are computed in float32 (float64 for float64 latents), then cast to the latents'
dtype, as :func:`~editeval.diffusion.ddim.noise_level_terms` does.
"""

from __future__ import annotations

import numpy as np
import torch

from editeval.diffusion.ddim import NoisePredictor, noise_level_terms


def dpm_solver_timesteps(num_train_timesteps: int, steps: int, skip: float) -> torch.Tensor:
    """The sampling timesteps (int64, noisiest first): ``steps`` of them, evenly spaced from
    ``T (1 - skip) - 1`` down to 1 (the official code's spacing).

    Raises:
        ValueError: ``skip`` outside [0, 1), ``steps`` < 1, or so many steps that two round to the
            same timestep (the message gives the most that fit).
    """
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"skip must be in [0, 1), got {skip}")
    first = num_train_timesteps - skip * num_train_timesteps - 1
    timesteps = torch.from_numpy(np.linspace(first, 1, steps).astype(np.int64))
    if steps < 1 or (timesteps[:-1] <= timesteps[1:]).any():
        raise ValueError(f"num_inference_steps must be in [1, {int(first)}] with skip={skip} "
                         f"({int(first)} distinct timesteps from {int(first)} down to 1), "
                         f"got {steps}")
    return timesteps


class _Solver:
    """One run of the sampler: the step's mean and deviation, keeping the previous step's
    clean-latent estimate and ``h`` for the second-order term."""

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.levels = [alphas_cumprod[int(t)] for t in timesteps] + [alphas_cumprod[0]]
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0, h) of the last step

    def step(self, k: int, latents: torch.Tensor,
             noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of step ``k`` from ``latents`` with the noise estimate
        ``noise`` (both (batch, 4, h, w)); the deviation is a 0-dim tensor in the latents' dtype."""
        precise = torch.float64 if latents.dtype == torch.float64 else torch.float32
        alpha_s, alpha_t = (torch.as_tensor(a).to(latents.device, precise)
                            for a in self.levels[k:k + 2])
        sqrt_alpha_s, sigma_s = alpha_s.sqrt(), (1 - alpha_s).sqrt()
        sqrt_alpha_t, sigma_t = alpha_t.sqrt(), (1 - alpha_t).sqrt()
        h = (sqrt_alpha_t / sigma_t).log() - (sqrt_alpha_s / sigma_s).log()
        decay = torch.exp(-2.0 * h)
        coef_x0 = (sqrt_alpha_t * (1 - decay)).to(latents.dtype)
        a_s, s_s = noise_level_terms(alpha_s, latents)
        x0 = (latents - s_s * noise) / a_s
        mean = (sigma_t / sigma_s * torch.exp(-h)).to(latents.dtype) * latents + coef_x0 * x0
        if self.previous is not None:
            previous_x0, previous_h = self.previous
            mean = mean + 0.5 * coef_x0 * (x0 - previous_x0) * (h / previous_h).to(latents.dtype)
        self.previous = (x0, h)
        return mean, (sigma_t * (1 - decay).sqrt()).to(latents.dtype)


@torch.no_grad()
def dpm_solver_invert(latents: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                      predict: NoisePredictor, *,
                      generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Edit-friendly SDE-DPM-Solver++ inversion of clean ``latents`` (module docstring).

    Args:
        latents: (1, 4, h, w) clean latents.
        timesteps: the sampling timesteps, noisiest first (:func:`dpm_solver_timesteps`).
        alphas_cumprod: the model's alpha-bars (float32, indexed by timestep).
        predict: the noise estimate ``(k, t, latents) -> eps`` the edit will start from (LEDITS++:
            the unconditional prediction); NFE = its cost per step.
        generator: a CPU generator; draws the independent noises of the noisy latents.

    Returns:
        ``(noisy, noise_maps)``: ``noisy[k]`` is the latent at ``timesteps[k]`` and ``noisy[-1]``
        the clean level as the last step regenerates it; ``noise_maps[k]`` is step k's noise. Each
        latent is stored as ``mean + std z``, so :func:`dpm_solver_sample` from ``noisy[0]`` with
        the same ``predict`` returns ``noisy[-1]`` bit for bit. All in the latents' dtype.
    """
    noisy = []
    for t in timesteps:
        draw = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        sqrt_alpha, sqrt_one_minus = noise_level_terms(alphas_cumprod[int(t)], latents)
        noisy.append(sqrt_alpha * latents + sqrt_one_minus * draw)
    noisy.append(latents)
    solver, noise_maps = _Solver(alphas_cumprod, timesteps), []
    for k, t in enumerate(timesteps):
        mean, std = solver.step(k, noisy[k], predict(k, t, noisy[k]))
        z = (noisy[k + 1] - mean) / std
        noisy[k + 1] = mean + std * z
        noise_maps.append(z)
    return noisy, noise_maps


@torch.no_grad()
def dpm_solver_sample(latents: torch.Tensor, noise_maps: list[torch.Tensor],
                      timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                      predict: NoisePredictor) -> torch.Tensor:
    """SDE-DPM-Solver++ (2M) sampling with given noise maps, from ``latents`` at ``timesteps[0]``
    to clean latents ((1, 4, h, w)). NFE = ``predict``'s cost per step.

    Raises:
        ValueError: not one noise map per timestep.
    """
    if len(noise_maps) != len(timesteps):
        raise ValueError(f"need one noise map per step ({len(timesteps)}), got {len(noise_maps)}")
    solver = _Solver(alphas_cumprod, timesteps)
    for k, (t, z) in enumerate(zip(timesteps, noise_maps)):
        mean, std = solver.step(k, latents, predict(k, t, latents))
        latents = mean + std * z.to(mean)
    return latents
