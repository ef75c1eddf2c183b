"""RePaint: inpaint with an unchanged diffusion model, resampling the generated region.

Paper: "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", Lugmayr, Danelljan,
Romero, Yu, Timofte and Van Gool, CVPR 2022, arXiv:2201.09865. Official code:
github.com/andreas128/RePaint (``guided_diffusion/scheduler.py``, ``get_schedule_jump``).

Algorithm (the paper's Algorithm 1 with its jump schedule, on
:mod:`editeval.diffusion.masked_blending`):

1. Start from Gaussian noise at the noisiest of ``num_inference_steps`` levels (the paper: 250).
2. Walk the levels of :func:`resampling_schedule`: down one level at a time with a DDPM step
   (ancestral, the posterior variance; no noise on the last step), after which the latents
   outside the mask are replaced by the source's latents noised to the new level (the clean
   source at the end); every ``jump_length`` levels (j = 10) the walk jumps back up
   ``jump_length`` levels by the forward process and denoises them again, ``jump_n_sample - 1``
   times (r = 10), so the generated region is harmonised with the known one.

The schedule is the official code's ``get_schedule_jump`` at its paper settings. diffusers'
``RePaintScheduler`` builds the same jumps one level lower (from the clean level instead of the
first noisy one); we follow the official code.

Deviations:

- Latent space of any text-to-image model (the mask downsampled to latent size by nearest
  neighbour); the paper works in pixels with unconditional (or class-conditional) guided-diffusion
  models.
- Text-conditioned with classifier-free guidance under the target prompt (scale 7.5, Stable
  Diffusion's usual); the paper's models are unconditional.
- The DDPM steps use the fixed posterior variance between the spaced levels (the paper's models
  learn their variance); the known region is blended after each step at the level it reached
  (the paper's Algorithm 1; the official code blends before the next step, so its last output is
  not pasted).

Cost: the walk makes ``N + (r - 1) * j * floor((N - 1) / j)`` denoising steps for N =
``num_inference_steps``: 2410 at the paper's 250, 10, 10, almost 10 times the 250 steps, and each
is a classifier-free-guidance batch of 2, so one edit costs 4820 NFE, about 48 times a 50-step
Stable Diffusion edit with guidance (100 NFE).

NFE = 2 * (num_inference_steps + (jump_n_sample - 1) * jump_length * floor((num_inference_steps
- 1) / jump_length)) with guidance (half that with guidance_scale 1).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.progress import step_progress
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_scheduler, noise_levels, predict_noise
from editeval.diffusion.ddpm import stochastic_step_mean
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.masked_blending import diffuse, known_region, mask_image

CARD = MethodCard(
    name="repaint",
    title="RePaint",
    paper=Paper("RePaint: Inpainting using Denoising Diffusion Probabilistic Models", "CVPR",
                2022, "2201.09865"),
    strategy="training-free",
    subcategory=None,
    inputs=("target_prompt", "mask"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 250, "jump_length": 10, "jump_n_sample": 10,
              "guidance_scale": 7.5},
    nfe_formula="2 * (num_inference_steps + (jump_n_sample - 1) * jump_length * "
                "floor((num_inference_steps - 1) / jump_length))  (1x without guidance)",
    deviations="latent space of a text-to-image model instead of pixels; text-conditioned with "
               "classifier-free guidance (the paper's models are unconditional); fixed posterior "
               "variance instead of a learned one",
    note="Not in the survey's paper list: the survey's inpainting section builds on it. At the "
         "paper's settings an edit costs 4820 NFE (2410 guided denoising steps); "
         "num_inference_steps=50 costs 820.",
)


def resampling_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The noise levels RePaint's walk visits, from ``num_steps`` (pure noise) to 0 (clean).

    Consecutive entries differ by one level: a step down is a denoising step, a step up a forward
    diffusion step. On reaching a level ``1 + k * jump_length`` below ``num_steps -
    jump_length + 1`` the walk goes up ``jump_length`` levels and down again, ``jump_n_sample - 1``
    times. This is the official code's ``get_schedule_jump`` with its paper settings, whose time
    ``t`` (from ``num_steps - 1`` to -1) is our level ``t + 1``. Steps down:
    ``num_steps + (jump_n_sample - 1) * jump_length * floor((num_steps - 1) / jump_length)``.
    """
    jumps = {level: jump_n_sample - 1
             for level in range(1, num_steps - jump_length + 1, jump_length)}
    level, levels = num_steps, [num_steps]
    while level > 0:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            levels.extend(range(level + 1, level + jump_length + 1))
            level += jump_length
    return levels


def _check(*, num_inference_steps: int, jump_length: int, jump_n_sample: int, **_: Any) -> None:
    for name, value in (("num_inference_steps", num_inference_steps),
                        ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if value < 1:
            raise ValueError(f"repaint: {name} must be >= 1, got {value}")


@register_method(CARD, check=_check)
def repaint(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, num_inference_steps: int,
            jump_length: int, jump_n_sample: int, guidance_scale: float) -> MethodOutput:
    """Inpaint ``inputs.mask`` of ``inputs.image`` under ``inputs.target_prompt`` (see the module
    docstring)."""
    known = known_region(pipe, inputs.image, inputs.mask, generator)
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    timesteps, alphas = noise_levels(scheduler)  # timesteps[s - 1] and alphas[s]: level s
    cond, uncond = encode_prompt(pipe, inputs.target_prompt), encode_prompt(pipe, "")
    walk = resampling_schedule(num_inference_steps, jump_length, jump_n_sample)
    latents = torch.randn(known.latents.shape, generator=generator,
                          dtype=torch.float32).to(known.latents)
    with step_progress(f"{CARD.name}: resampling", len(walk) - 1) as update:
        for here, there in zip(walk[:-1], walk[1:]):
            if there > here:  # up: forward diffusion by one level
                latents = diffuse(latents, alphas[there], generator, alpha_from=alphas[here])
            else:
                noise = predict_noise(pipe.unet, scheduler, latents, timesteps[here - 1], cond,
                                      uncond, guidance_scale)
                mean, sigma = stochastic_step_mean(latents, noise, alphas[here], alphas[there],
                                                   eta=1.0)
                if there > 0:
                    latents = mean + sigma * torch.randn(latents.shape, generator=generator,
                                                         dtype=torch.float32).to(latents)
                    latents = known.blend(latents, alphas[there])
                else:
                    latents = known.blend(mean, 1.0)
            update()
    return MethodOutput(decode_latents(pipe, latents),
                        intermediates={"latent_mask": mask_image(known.mask)})
