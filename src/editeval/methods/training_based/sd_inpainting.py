"""Stable Diffusion inpainting: redraw the masked region of an image from a text prompt.

Paper: "High-Resolution Image Synthesis with Latent Diffusion Models", Rombach, Blattmann, Lorenz,
Esser and Ommer, CVPR 2022, arXiv:2112.10752 (latent diffusion; its inpainting model, section
4.5, and the Stable Diffusion inpainting checkpoints built on it).

Model: a Stable Diffusion UNet with 5 more input channels, the mask at latent size and the latents
of the masked image (``image * (mask < 0.5)``: mid-grey where masked), fine-tuned from the
text-to-image model with those channels zero-initialised, on synthetic masks (a quarter of them
masking everything). Sampling starts from pure noise (``strength`` 1) and denoises under the
target prompt with classifier-free guidance; the masked-image latents carry what to keep.

Wraps diffusers' ``StableDiffusionInpaintPipeline`` (the checkpoint's model card uses it) with its
defaults (50 steps, guidance 7.5, strength 1) and the sampler of the official code: DDIM, eta 0,
as the latent diffusion repository's inpainting script samples (its Stable Diffusion 2 demo: DDIM
too). Deviation from diffusers: its pipeline samples with the checkpoint's scheduler, PNDM for SD
1.5 inpainting, whose multistep extrapolation at guidance 7.5 wrecks the toy models' samples (toy
text-to-image, 16 captions: colour right 53% under PNDM against 99% under DDIM).

Outside the mask: the model redraws the whole image, so there the edit is the source through the
VAE and the model, not the source's pixels; diffusers and the Stable Diffusion 2 inpainting demo
return it so (the default). The latent diffusion paper's inpainting script pastes the source back
outside the mask: ``paste_source=True`` does that, at the model's resolution (the edit then
equals the source outside the mask up to the resize back to the source's size).

NFE = 2 * floor(num_inference_steps * strength) with guidance (guidance_scale > 1), half
without.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_scheduler

LDM_PAPER = Paper("High-Resolution Image Synthesis with Latent Diffusion Models", "CVPR", 2022,
                  "2112.10752")

CARD = MethodCard(
    name="sd-inpainting",
    title="Stable Diffusion inpainting",
    paper=LDM_PAPER,
    strategy="training-based",
    subcategory=None,
    inputs=("target_prompt", "mask"),
    model_kind="inpainting",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 7.5, "strength": 1.0,
              "paste_source": False},
    nfe_formula="2 * floor(num_inference_steps * strength) with guidance (guidance_scale > 1), "
                "half that without",
    deviations="DDIM (eta 0), the official code's sampler, instead of the checkpoint's scheduler "
               "that diffusers' pipeline uses (PNDM for SD 1.5 inpainting); paste_source=True "
               "pastes the source back outside the mask as the latent diffusion paper's "
               "inpainting script does",
    note="Not in the survey's paper list: the inpainting model of latent diffusion, which the "
         "survey's section 7 (inpainting and outpainting) builds on. The target prompt describes "
         "the whole edited image, as the model was trained on captions of whole images. Outside "
         "the mask the edit is the model's redrawing of the source unless paste_source=True.",
)


def _check(*, num_inference_steps: int, guidance_scale: float, strength: float,
           **_: Any) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"{CARD.name}: num_inference_steps must be >= 1, got "
                         f"{num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"{CARD.name}: guidance_scale must be >= 0, got {guidance_scale}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"{CARD.name}: strength must be in (0, 1], got {strength}")
    if int(num_inference_steps * strength) < 1:
        raise ValueError(f"{CARD.name}: num_inference_steps * strength must be >= 1 (one "
                         f"denoising step), got {num_inference_steps} * {strength}")


def inpaint(pipe: Any, image: Image.Image, mask: Image.Image, prompt: str,
            generator: torch.Generator, *, num_inference_steps: int, guidance_scale: float,
            strength: float, paste_source: bool) -> Image.Image:
    """Redraw the white region of ``mask`` in ``image`` from ``prompt`` with the inpainting
    checkpoint ``pipe`` (any pipeline whose components are an inpainting model's), sampling with
    DDIM (eta 0) on its noise schedule.

    ``image``: RGB, sides multiples of 8; ``mask``: mode "L" of the same size, 255 = redraw
    (binarised at 128 by the pipeline). Returns RGB of the same size; with ``paste_source``
    every pixel outside the mask is ``image``'s.
    """
    from diffusers import StableDiffusionInpaintPipeline

    inpainter = StableDiffusionInpaintPipeline(
        **{**pipe.components, "scheduler": ddim_scheduler(pipe)}, requires_safety_checker=False)
    inpainter.set_progress_bar_config(disable=True)
    result = inpainter(
        prompt=prompt, image=image, mask_image=mask, height=image.height, width=image.width,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        strength=strength, generator=generator,
    ).images[0]
    return Image.composite(result, image, mask) if paste_source else result


@register_method(CARD, check=_check)
def sd_inpainting(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                  num_inference_steps: int, guidance_scale: float, strength: float,
                  paste_source: bool) -> MethodOutput:
    """Redraw ``inputs.mask``'s region of ``inputs.image`` from ``inputs.target_prompt`` (see
    the module docstring)."""
    return MethodOutput(inpaint(pipe, inputs.image, inputs.mask, inputs.target_prompt, generator,
                                num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, strength=strength,
                                paste_source=paste_source))
