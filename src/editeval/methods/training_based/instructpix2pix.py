"""InstructPix2Pix: edit an image by following a written instruction.

Paper: "InstructPix2Pix: Learning to Follow Image Editing Instructions", Brooks, Holynski and
Efros, CVPR 2023, arXiv:2211.09800.

A Stable Diffusion UNet with 8 input channels (noisy latents + source-image latents) trained on
generated (instruction, before, after) triplets. Sampling uses two classifier-free guidance scales:

    eps = eps(z, 0, 0) + s_I * (eps(z, c_I, 0) - eps(z, 0, 0)) + s_T * (eps(z, c_I, c_T) - eps(z, c_I, 0))

Paper defaults: 100 steps of the Euler ancestral sampler (the checkpoint's scheduler), text guidance
s_T = 7.5, image guidance s_I = 1.5. Wraps diffusers' ``StableDiffusionInstructPix2PixPipeline``,
a faithful port of the authors' code.

NFE = 3 * num_inference_steps (one batch of 3 per step) when ``guidance_scale`` > 1 and
``image_guidance_scale`` >= 1, the condition under which diffusers guides; otherwise
num_inference_steps: one unguided pass eps(z, c_I, c_T) per step, and both scales have no effect.

Deviation: images are brought to the model's resolution by editeval's policy (long side 512 for the
SD 1.5 checkpoint, sides multiples of 8) rather than the authors' multiples of 64.
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS

CARD = MethodCard(
    name="instructpix2pix",
    title="InstructPix2Pix",
    paper=Paper("InstructPix2Pix: Learning to Follow Image Editing Instructions", "CVPR", 2023,
                "2211.09800"),
    strategy="training-based",
    subcategory="instructional-editing",
    inputs=("instruction",),
    model_kind="instruction",
    tasks=TASKS,
    defaults={"num_inference_steps": 100, "guidance_scale": 7.5, "image_guidance_scale": 1.5},
    nfe_formula="3 * num_inference_steps when guidance_scale > 1 and image_guidance_scale >= 1, "
                "else num_inference_steps (no guidance: both scales have no effect)",
)


@register_method(CARD)
def instructpix2pix(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                    num_inference_steps: int, guidance_scale: float,
                    image_guidance_scale: float) -> MethodOutput:
    """Edit ``inputs.image`` following ``inputs.instruction`` (see the module docstring)."""
    image = pipe(
        prompt=inputs.instruction,
        image=inputs.image,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        generator=generator,
    ).images[0]
    return MethodOutput(image)
