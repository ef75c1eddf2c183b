"""A source branch beside the target: the cached unconditional inversion and the three-row sampler.

Plug-and-Play and MasaCtrl invert the source under the empty prompt without guidance, then sample
the target while a *source branch* in the same UNet batch either replays the inversion trajectory
(Plug-and-Play) or is denoised along with it (MasaCtrl), so that features and attention can pass
from the source row to the target rows. (Prompt-to-Prompt's two-branch sampler with guided source
branch is :mod:`editeval.diffusion.dual_branch`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from editeval.core.types import EditInputs
from editeval.diffusion.ddim import ddim_invert, ddim_scheduler, ddim_step, model_noise
from editeval.diffusion.inversion_cache import cached_inversion, inversion_key
from editeval.diffusion.latents import encode_image, encode_prompt


@torch.no_grad()
def invert_unconditional(pipe: Any, inputs: EditInputs, num_inference_steps: int,
                         inversion_steps: int) -> tuple[list[torch.Tensor], bool]:
    """DDIM inversion of ``inputs.image`` under the empty prompt, without guidance, cached.

    Inverts with ``inversion_steps`` steps and keeps the latents at the ``num_inference_steps``
    sampling timesteps. Goes through ``inputs.inversion_cache`` (kind ``ddim``; options name the
    kept timesteps), so methods inverting the same image with the same steps share it.

    Returns:
        The latents (each (1, 4, h, w), the UNet's dtype and device) at the sampling timesteps,
        most noisy first, and whether they came from the cache. NFE = ``inversion_steps`` on a miss.

    Raises:
        ValueError: a sampling timestep is not among the inversion's (with SD's "leading"
            spacing, ``inversion_steps`` must be a multiple of ``num_inference_steps``, or 999).
    """
    if num_inference_steps < 1 or inversion_steps < 1:
        raise ValueError(f"num_inference_steps ({num_inference_steps}) and inversion_steps "
                         f"({inversion_steps}) must be at least 1")
    sampling = ddim_scheduler(pipe, num_inference_steps)
    inverting = ddim_scheduler(pipe, inversion_steps)
    saved = [int(t) for t in sampling.timesteps]
    available = [int(t) for t in inverting.timesteps.flip(0)]  # least noisy first
    missing = sorted(set(saved) - set(available))
    if missing:
        raise ValueError(
            f"inversion_steps={inversion_steps} does not visit the sampling timesteps {missing} "
            f"of num_inference_steps={num_inference_steps}; use a multiple of "
            "num_inference_steps (or 999 with SD's leading timestep spacing)"
        )
    key = inversion_key(kind="ddim", image=inputs.image, prompt="", pipe=pipe, scheduler=inverting,
                        num_inference_steps=inversion_steps, guidance_scale=1.0,
                        options={"saved_timesteps": saved})

    def compute() -> dict[str, torch.Tensor]:
        latents = encode_image(pipe, inputs.image).to(pipe.unet.dtype)
        trajectory = ddim_invert(pipe.unet, latents, inverting, encode_prompt(pipe, ""))
        at = {t: trajectory[k + 1] for k, t in enumerate(available)}
        return {"latents": torch.cat([at[t] for t in saved])}

    value, cached = cached_inversion(inputs.inversion_cache, key, compute)
    latents = value["latents"].to(pipe.unet.device, pipe.unet.dtype)
    return list(latents.split(1)), cached


@torch.no_grad()
def denoise_with_source_branch(
    unet: Any, scheduler: Any, start: torch.Tensor, source_text: torch.Tensor,
    target_text: torch.Tensor, uncond_text: torch.Tensor, guidance_scale: float,
    source_latents: list[torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM sampling of a source and a target branch in one UNet batch.

    The batch is [source, target unconditional, target conditional] (3 NFE per step), or
    [source, target] when ``guidance_scale`` is 1 (2 NFE). The source row sees ``source_text``
    without guidance; the target rows ``uncond_text`` and ``target_text`` with classifier-free
    guidance. Controllers and hooks find the source in row 0 and the target in rows 1 and up.

    Args:
        unet, scheduler: the pipeline's UNet and a DDIM scheduler set to the sampling steps.
        start: (1, 4, h, w) latents at the first (most noisy) timestep, for both branches.
        source_text, target_text, uncond_text: (1, 77, D) text embeddings.
        guidance_scale: the target's classifier-free guidance scale.
        source_latents: when given, the source row replays them (one (1, 4, h, w) latent per
            timestep, most noisy first: an inversion trajectory); otherwise it is denoised too.
        on_step: called with the step index before each UNet evaluation.

    Returns:
        The clean (1, 4, h, w) latents of the source and the target branch.
    """
    timesteps = [int(t) for t in scheduler.timesteps]
    if source_latents is not None and len(source_latents) != len(timesteps):
        raise ValueError(f"source_latents has {len(source_latents)} entries for "
                         f"{len(timesteps)} timesteps")
    guided = guidance_scale != 1.0
    texts = [source_text, uncond_text, target_text] if guided else [source_text, target_text]
    text = torch.cat(texts)
    source = target = start
    for i, t in enumerate(timesteps):
        if source_latents is not None:
            source = source_latents[i]
        if on_step is not None:
            on_step(i)
        rows = torch.cat([source] + [target] * (len(texts) - 1))
        noise = model_noise(unet, scheduler, rows, t, text)
        target_noise = noise[-1:]
        if guided:
            target_noise = noise[1:2] + guidance_scale * (noise[2:3] - noise[1:2])
        alpha = scheduler.alphas_cumprod[t]
        alpha_next = (scheduler.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps)
                      else scheduler.final_alpha_cumprod)
        source = ddim_step(source, noise[:1], alpha, alpha_next)
        target = ddim_step(target, target_noise, alpha, alpha_next)
    return source, target
