"""CycleDiffusion: encode the source into a stochastic sampler's latent code, decode it under the
target prompt.

Paper: "A Latent Space of Stochastic Diffusion Models for Zero-Shot Image Editing and Guidance"
(first titled "Unifying Diffusion Models' Latent Space, with Applications to CycleDiffusion and
Guidance"), Wu and De la Torre, ICCV 2023, arXiv:2210.05559 (official code: ChenWu98/cycle-diffusion).

Algorithm: a stochastic DDIM sampler (eta > 0) is a deterministic map from its latent code, the
initial noisy latent plus every step's noise, to an image. The DPM-Encoder
(:func:`editeval.diffusion.ddpm.dpm_encode`) finds a code of the source image under the source
prompt: it draws ``x_s ~ q(x_s | x_0)`` at the starting timestep, then each ``x_{t-1} ~ q(x_{t-1} |
x_t, x_0)`` from the sampler's posterior, and keeps the noise ``z_t`` that the model's step needs to
land there. The same code decoded under the target prompt (:func:`editeval.diffusion.ddpm.
ddpm_sample`) is the edit: what the two prompts share stays, since the noise is shared.

Defaults (Stable Diffusion): 100 DDIM steps (the official SD configs: 99 "custom steps" on ldm's
uniform grid, which are 100 timesteps) with eta 0.1, encoder guidance ``source_guidance_scale`` 1
(the official ``encoder_unconditional_guidance_scales = [1]``), and, of the official grids
(skip in {15, 20, 25, 30, 40, 50}, decoder guidance in {1, 1.5, 2, 3, 4, 5}), ``skip`` 20 and
``guidance_scale`` 2: the setting of the authors' own example for diffusers' CycleDiffusionPipeline
(strength 0.8 of 100 steps, guidance 2, source guidance 1, eta 0.1).

Deviations: the official code encodes 15 times for every (skip, guidance) pair of its grid and keeps
the output with the best directional CLIP score; with no CLIP model offline (and to keep one edit
one sample) we decode one code at one setting. The source latents are the VAE posterior mean (the
official code samples the posterior).

NFE = (num_inference_steps - skip) * (1, or 2 with source_guidance_scale != 1) (the encoder;
0 when cached) + (num_inference_steps - skip) * (2, or 1 with guidance_scale 1) (the decoder).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_scheduler
from editeval.diffusion.ddpm import ddpm_sample, dpm_encode
from editeval.diffusion.inversion_cache import (
    cached_inversion,
    generator_digest,
    inversion_key,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt

CARD = MethodCard(
    name="cyclediffusion",
    title="CycleDiffusion",
    paper=Paper("A Latent Space of Stochastic Diffusion Models for Zero-Shot Image Editing and "
                "Guidance", "ICCV", 2023, "2210.05559"),
    strategy="training-free",
    subcategory="inversion-sampling-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 100, "eta": 0.1, "skip": 20, "source_guidance_scale": 1.0,
              "guidance_scale": 2.0},
    nfe_formula="(num_inference_steps - skip) * (1, or 2 when source_guidance_scale != 1) "
                "(the DPM-Encoder; 0 when cached) + (num_inference_steps - skip) * (2, or 1 when "
                "guidance_scale is 1) (the decoder)",
    deviations="one code decoded at one setting (skip 20, guidance 2, as the authors' diffusers "
               "example) instead of the official 15 codes per (skip, guidance) grid point ranked "
               "by directional CLIP; source latents are the VAE posterior mean (official: a "
               "posterior sample)",
    note="The seed draws the code: other seeds give other edits.",
)


def _check(*, num_inference_steps: int, eta: float, skip: int, **_: Any) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"cyclediffusion: num_inference_steps must be >= 1, got "
                         f"{num_inference_steps}")
    if not 0 <= skip < num_inference_steps:
        raise ValueError(f"cyclediffusion: skip must be in [0, {num_inference_steps}) (below "
                         f"num_inference_steps), got {skip}")
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"cyclediffusion: eta must be in (0, 1] (the DPM-Encoder needs a "
                         f"stochastic sampler), got {eta}")


@register_method(CARD, check=_check)
def cyclediffusion(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                   num_inference_steps: int, eta: float, skip: int, source_guidance_scale: float,
                   guidance_scale: float) -> MethodOutput:
    """Edit ``inputs.image`` from its source prompt towards its target prompt (see the module)."""
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    uncond = encode_prompt(pipe, "")
    key = inversion_key(kind="dpm-encoder", image=inputs.image, prompt=inputs.source_prompt,
                        pipe=pipe, scheduler=scheduler, num_inference_steps=num_inference_steps,
                        guidance_scale=source_guidance_scale,
                        options={"eta": eta, "skip": skip, "seed": generator.initial_seed(),
                                 "generator_state": generator_digest(generator)})

    def encode() -> dict[str, Any]:
        start, noise_maps = dpm_encode(
            pipe.unet, encode_image(pipe, inputs.image).to(pipe.unet.dtype), scheduler,
            encode_prompt(pipe, inputs.source_prompt), uncond, source_guidance_scale, eta=eta,
            skip=skip, generator=generator)
        return {"start": start, "noise_maps": noise_maps}

    code, cached = cached_inversion(inputs.inversion_cache, key, encode)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    latents = ddpm_sample(pipe.unet, code["start"].to(device, dtype),
                          [z.to(device, dtype) for z in code["noise_maps"]], scheduler,
                          encode_prompt(pipe, inputs.target_prompt), uncond, guidance_scale,
                          skip=skip, eta=eta)
    return MethodOutput(decode_latents(pipe, latents), {"inversion_cached": cached})
