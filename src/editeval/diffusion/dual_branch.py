"""Sampling a source branch and a target branch together, with classifier-free guidance.

Prompt-to-Prompt and the inversions that run under it denoise the inverted source latents along two
branches at once, the source prompt's and the target prompt's, so that an attention controller can
hand the source branch's attention to the target branch inside one UNet call. Each DDIM step (the
update of :mod:`editeval.diffusion.ddim`) evaluates the UNet on one batch laid out as

    [unconditional x branches, conditional x branches]   (two branches: u_src, u_tgt, c_src, c_tgt)

so the controller sees the unconditional half first, then the conditional half, as diffusers lays
out classifier-free guidance. NFE = 2 x branches per step (4 for the source/target pair).

What an inversion changes in sampling enters through :class:`BranchGuidance`: the unconditional
(null-text or negative-prompt) embeddings of each step, how the two noise predictions combine
(plain classifier-free guidance, or ProxEdit's proximal guidance) and a correction of the latents
after each step (Direct Inversion's, ProxEdit's inversion guidance). A ``callback`` after the
correction lets the method blend the branches (P2P's local blend).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from editeval.diffusion.ddim import ddim_step, model_noise, noise_levels


class BranchGuidance:
    """Plain classifier-free guidance with one unconditional embedding for every step.

    Args:
        uncond: (1, 77, D) unconditional embeddings (the empty prompt's for plain CFG).
        guidance_scale: the classifier-free guidance scale w (1: no guidance, still 2 NFE a branch).
    """

    def __init__(self, uncond: torch.Tensor, guidance_scale: float) -> None:
        self.uncond_embeddings = uncond
        self.guidance_scale = guidance_scale

    def uncond(self, step: int) -> torch.Tensor:
        """(1, 77, D) unconditional embeddings at sampling step ``step`` (0 = the noisiest)."""
        return self.uncond_embeddings

    def combine(self, step: int, timestep: torch.Tensor, noise_uncond: torch.Tensor,
                noise_cond: torch.Tensor) -> torch.Tensor:
        """The guided noise, eps_u + w (eps_c - eps_u); (branches, 4, h, w) in and out."""
        return noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)

    def correct(self, step: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The latents after step ``step`` (branches, 4, h, w), corrected; unchanged here."""
        return latents


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_branches(unet: Any, latents: torch.Tensor, scheduler: Any, conds: torch.Tensor,
                    guidance: BranchGuidance, callback: StepCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling of several prompt branches from one noisy latent.

    Args:
        unet: the pipeline's UNet (an attention controller may be installed on it).
        latents: (1, 4, h, w) latents at the most noisy timestep (the inverted source), or
            (branches, 4, h, w).
        scheduler: a DDIM scheduler set to the number of steps (:func:`~editeval.diffusion.ddim.
            ddim_scheduler`), the one the source was inverted with.
        conds: (branches, 77, D) prompt embeddings, the source prompt's first.
        guidance: how the inversion guides sampling (:class:`BranchGuidance` or a subclass).
        callback: ``callback(step, timestep, latents) -> latents`` after each step's correction.

    Returns:
        (branches, 4, h, w) clean latents. NFE = 2 x branches x steps.
    """
    branches = conds.shape[0]
    latents = latents.expand(branches, *latents.shape[1:]).clone()
    timesteps, alphas = noise_levels(scheduler)
    for step, t in enumerate(scheduler.timesteps):
        level = len(timesteps) - step
        uncond = guidance.uncond(step).to(conds).expand(branches, *conds.shape[1:])
        noise = model_noise(unet, scheduler, torch.cat([latents, latents]), t,
                            torch.cat([uncond, conds]))
        noise_uncond, noise_cond = noise.chunk(2)
        noise = guidance.combine(step, t, noise_uncond, noise_cond)
        latents = ddim_step(latents, noise, alphas[level], alphas[level - 1])
        latents = guidance.correct(step, t, latents)
        if callback is not None:
            latents = callback(step, t, latents)
    return latents
