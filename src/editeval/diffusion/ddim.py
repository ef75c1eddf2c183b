"""DDIM sampling and inversion, written from the paper's update rule.

Denoising Diffusion Implicit Models (Song, Meng and Ermon, ICLR 2021, arXiv:2010.02502). With
alpha-bar (cumulative product of the noise schedule) ``a_t``, the deterministic (eta = 0) update from
``x_t`` to the level ``a_s`` is::

    x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_s = sqrt(a_s) * x0 + sqrt(1 - a_s) * eps

It runs towards lower noise when sampling and towards higher noise when inverting; the inversion
evaluates the UNet at the current latent and the next (noisier) timestep, the usual approximation
eps(x_t) ~ eps(x_{t-1}) whose error falls as the number of steps rises. We do not use diffusers'
``DDIMInverseScheduler``, whose previous-timestep computation is wrong (diffusers issue #10695).

Timesteps follow the pipeline's own scheduler configuration (``steps_offset``, ``timestep_spacing``),
read through ``DDIMScheduler.set_timesteps``, and the level below the first timestep is the
scheduler's ``final_alpha_cumprod``, so sampling exactly mirrors inversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt


def ddim_scheduler(pipe: Any, num_inference_steps: int | None = None):
    """A ``DDIMScheduler`` with the pipeline's noise schedule and timestep spacing.

    ``clip_sample`` is off (SD checkpoints that ship PNDM do not say, and DDIM's default of
    clipping x0 to [-1, 1] is wrong for latents). Set to ``num_inference_steps`` when given.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def ddim_step(latents: torch.Tensor, noise_pred: torch.Tensor, alpha_t: torch.Tensor,
              alpha_next: torch.Tensor) -> torch.Tensor:
    """Move ``latents`` from noise level ``alpha_t`` to ``alpha_next`` (alpha-bars in (0, 1])."""
    x0 = (latents - (1 - alpha_t).sqrt() * noise_pred) / alpha_t.sqrt()
    return alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * noise_pred


def predict_noise(unet: Any, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """The UNet's noise prediction, with classifier-free guidance when ``guidance_scale != 1``.

    ``cond``/``uncond`` are text embeddings (1, 77, D); with guidance the UNet sees a batch of 2
    (2 NFE), without it a batch of 1.
    """
    if uncond is None or guidance_scale == 1.0:
        return unet(latents, timestep, encoder_hidden_states=cond).sample
    noise = unet(torch.cat([latents] * 2), timestep,
                 encoder_hidden_states=torch.cat([uncond, cond])).sample
    noise_uncond, noise_cond = noise.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def noise_levels(scheduler: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Timesteps from least to most noisy and the alpha-bar before each (the clean level first)."""
    timesteps = scheduler.timesteps.flip(0)
    alphas = [torch.as_tensor(scheduler.final_alpha_cumprod)]
    alphas += [scheduler.alphas_cumprod[t] for t in timesteps]
    return timesteps, alphas


@torch.no_grad()
def ddim_invert(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> list[torch.Tensor]:
    """DDIM inversion: the trajectory from clean ``latents`` to noise.

    Returns ``[z_0, z_1, ..., z_T]`` (T = number of scheduler steps + 1 entries), ``z_T`` being the
    inverted noise at the most noisy timestep. NFE = steps (x2 with guidance).
    """
    timesteps, alphas = noise_levels(scheduler)
    trajectory = [latents]
    for i, t in enumerate(timesteps):
        noise = predict_noise(unet, trajectory[-1], t, cond, uncond, guidance_scale)
        trajectory.append(ddim_step(trajectory[-1], noise, alphas[i].to(latents),
                                    alphas[i + 1].to(latents)))
    return trajectory


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def ddim_sample(unet: Any, latents: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling from ``latents`` at the most noisy timestep to clean latents.

    ``callback(i, t, latents)`` runs after step ``i`` and may return replacement latents (methods
    use it to blend or inject). NFE = steps (x2 with guidance).
    """
    timesteps, alphas = noise_levels(scheduler)
    for i, t in enumerate(scheduler.timesteps):
        level = len(timesteps) - i
        noise = predict_noise(unet, latents, t, cond, uncond, guidance_scale)
        latents = ddim_step(latents, noise, alphas[level].to(latents),
                            alphas[level - 1].to(latents))
        if callback is not None:
            latents = callback(i, t, latents) or latents
    return latents


@dataclass
class Reconstruction:
    """DDIM inversion followed by sampling: the images and the latents at both ends."""

    image: Image.Image
    latents: torch.Tensor
    inverted: torch.Tensor
    reconstructed: torch.Tensor

    @property
    def latent_error(self) -> float:
        """Relative L2 error ||z0' - z0|| / ||z0|| of the reconstructed clean latents."""
        return float((self.reconstructed - self.latents).norm() / self.latents.norm())


def reconstruct(pipe: Any, image: Image.Image, prompt: str = "", num_inference_steps: int = 50,
                guidance_scale: float = 1.0) -> Reconstruction:
    """Invert ``image`` with DDIM under ``prompt``, then sample back; NFE = 2 x steps (x2 with CFG).

    ``image``: RGB, sides multiples of 8. ``guidance_scale`` 1 is the exact-as-possible setting;
    larger values show why null-text inversion exists.
    """
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    cond = encode_prompt(pipe, prompt)
    uncond = encode_prompt(pipe, "") if guidance_scale != 1.0 else None
    latents = encode_image(pipe, image)
    inverted = ddim_invert(pipe.unet, latents, scheduler, cond, uncond, guidance_scale)[-1]
    restored = ddim_sample(pipe.unet, inverted, scheduler, cond, uncond, guidance_scale)
    return Reconstruction(decode_latents(pipe, restored), latents, inverted, restored)
