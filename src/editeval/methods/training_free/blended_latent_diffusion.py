"""Blended Latent Diffusion: generate inside the mask, the noised source outside it at every step.

Paper: "Blended Latent Diffusion", Avrahami, Fried and Lischinski, SIGGRAPH 2023 (ACM Transactions
on Graphics 42(4)), arXiv:2206.02779. Official code: github.com/omriav/blended-latent-diffusion
(its Stable Diffusion script ``scripts/text_editing_SD2.py`` gives the defaults below).

Algorithm (the paper's Algorithm 1, on :mod:`editeval.diffusion.masked_blending`):

1. ``z_init`` = the source's latents; the edit mask is downsampled to latent size by nearest
   neighbour (the official code's ``NEAREST`` resize, no dilation).
2. Skip the first ``blending_start_percentage`` of the ``num_inference_steps`` DDIM steps:
   ``k = int(num_inference_steps * blending_start_percentage)`` and start from ``z_init`` noised
   to the k-th timestep.
3. For every remaining step: a DDIM step (eta 0) under the target prompt with classifier-free
   guidance, then the latents outside the mask are replaced by ``z_init`` noised to the level the
   step reached (a fresh noise draw each step); after the last step, by ``z_init`` itself.
4. Decode; optionally preserve the background in pixels (``background``):

   - ``"none"`` (default, as the official Stable Diffusion script): the decoded latents.
   - ``"finetune-decoder"``: the paper's background reconstruction, a per-image
     fit of the VAE decoder so that the decoded image keeps the edit inside the mask and the
     source outside it (``decoder_steps`` Adam steps at learning rate 1e-4, background weight
     100, as the official ``reconstruct.py``), on a float32 copy of the VAE: the pipeline's own
     VAE is never changed.
   - ``"paste-source-pixels"``: NOT the paper's method: the source's pixels copied outside the
     mask (the official ``reconstruct.py``'s ``pixel`` option), exact there, with a visible seam.

Deviations:

- The source is noised to the level each step lands on; the official SD script noises it to the
  step's starting timestep (one step noisier than the latents it replaces).
- Start: the source noised to the k-th timestep, as the paper's Algorithm 1 and the official LDM
  code; the official SD script starts from pure Gaussian noise at that timestep.
- After the last step the known region is the clean source latents (the paper's ``t = 0``); the
  official SD script noises it to timestep 0.
- One sample per edit: the paper generates several and ranks them by CLIP similarity (the SD
  script returns 4 for the user to choose). The paper's progressive mask shrinking for thin masks
  (off by default in the official code) is not implemented.
- The decoder fit starts from the edit's latents (the paper); the official code re-encodes the
  saved edit.

NFE = 2 * (num_inference_steps - floor(num_inference_steps * blending_start_percentage)) with
guidance (half that with guidance_scale 1); the decoder fit evaluates no denoiser.
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_sample, ddim_scheduler
from editeval.diffusion.ddpm import step_levels
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.masked_blending import (
    finetune_decoder,
    known_region,
    mask_image,
    paste_known_pixels,
)

BACKGROUNDS = ("none", "finetune-decoder", "paste-source-pixels")

CARD = MethodCard(
    name="blended-latent-diffusion",
    title="Blended Latent Diffusion",
    paper=Paper("Blended Latent Diffusion", "SIGGRAPH (ACM TOG)", 2023, "2206.02779"),
    strategy="training-free",
    subcategory="mask-guidance",
    inputs=("target_prompt", "mask"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 7.5,
              "blending_start_percentage": 0.25, "background": "none", "decoder_steps": 75},
    nfe_formula="2 * (num_inference_steps - floor(num_inference_steps * "
                "blending_start_percentage))  (1x without guidance)",
    deviations="source noised to the level each step lands on (official SD script: the step's "
               "starting timestep); start from the noised source (paper; the SD script starts "
               "from noise); clean source after the last step; one sample, no CLIP ranking; no "
               "progressive mask shrinking",
    note="background: none (official SD script), finetune-decoder (the paper's background "
         "reconstruction, on a copy of the VAE), paste-source-pixels (not the paper's: the "
         "source's pixels outside the mask)",
)


def _check(*, num_inference_steps: int, blending_start_percentage: float, background: str,
           decoder_steps: int, **_: Any) -> None:
    name = CARD.name
    if num_inference_steps < 1:
        raise ValueError(f"{name}: num_inference_steps must be >= 1, got {num_inference_steps}")
    if not 0.0 <= blending_start_percentage < 1.0:
        raise ValueError(f"{name}: blending_start_percentage must be in [0, 1), got "
                         f"{blending_start_percentage}")
    if background not in BACKGROUNDS:
        raise ValueError(f"{name}: background must be one of {', '.join(BACKGROUNDS)}, got "
                         f"{background!r}")
    if decoder_steps < 0:
        raise ValueError(f"{name}: decoder_steps must be >= 0, got {decoder_steps}")


@register_method(CARD, check=_check)
def blended_latent_diffusion(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                             num_inference_steps: int, guidance_scale: float,
                             blending_start_percentage: float, background: str,
                             decoder_steps: int) -> MethodOutput:
    """Edit ``inputs.image`` inside ``inputs.mask`` towards ``inputs.target_prompt`` (see the
    module docstring)."""
    known = known_region(pipe, inputs.image, inputs.mask, generator)
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    scheduler.timesteps = scheduler.timesteps[int(num_inference_steps * blending_start_percentage):]
    levels = step_levels(scheduler)
    last = len(levels) - 1

    def blend(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return known.blend(latents, levels[i][2] if i < last else 1.0)

    latents = ddim_sample(pipe.unet, known.noised(levels[0][1]), scheduler,
                          encode_prompt(pipe, inputs.target_prompt), encode_prompt(pipe, ""),
                          guidance_scale, blend)
    if background == "finetune-decoder":
        image = finetune_decoder(pipe, latents, inputs.image, inputs.mask, decoder_steps,
                                 f"{CARD.name}: decoder")
    else:
        image = decode_latents(pipe, latents)
        if background == "paste-source-pixels":
            image = paste_known_pixels(image, inputs.image, inputs.mask)
    return MethodOutput(image, intermediates={"latent_mask": mask_image(known.mask)})
