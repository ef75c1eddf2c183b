"""SDEdit: noise the source to an intermediate time, then denoise it towards the target prompt.

Paper: "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations",
Meng et al., ICLR 2022, arXiv:2108.01073.

Algorithm: perturb the source to time t0 = strength * T with the forward SDE, then solve the reverse
SDE from t0 to 0. ``strength`` trades realism against faithfulness; the paper finds t0 in [0.3, 0.6]
works well and we default to 0.5.

Wraps diffusers' ``StableDiffusionImg2ImgPipeline``, which implements this algorithm faithfully.

Deviations from the paper (as the survey and the community use SDEdit on text-to-image models):
- Guidance is text (Stable Diffusion with classifier-free guidance, scale 7.5 by default), not a
  stroke painting on an unconditional model.
- The reverse process is solved with DDIM (``eta`` = 0, deterministic after the initial noise);
  ``eta=1`` gives the stochastic, DDPM-like solver closer to the paper's SDE solver.

NFE = 2 * floor(num_inference_steps * strength) with guidance (guidance_scale > 1), half that without.
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_scheduler

CARD = MethodCard(
    name="sdedit",
    title="SDEdit",
    paper=Paper(
        "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations",
        "ICLR", 2022, "2108.01073",
    ),
    strategy="training-free",
    subcategory=None,
    inputs=("target_prompt",),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"strength": 0.5, "num_inference_steps": 50, "guidance_scale": 7.5, "eta": 0.0},
    nfe_formula="2 * floor(num_inference_steps * strength)  (1x without guidance)",
    deviations="text guidance on Stable Diffusion instead of stroke guidance; DDIM solver (eta=0)",
    note="Not in the survey's paper list: it is the baseline the survey builds on.",
)


def _img2img(pipe: Any):
    from diffusers import StableDiffusionImg2ImgPipeline

    components = {**pipe.components, "scheduler": ddim_scheduler(pipe)}
    img2img = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def _check(*, strength: float, num_inference_steps: int, **_: Any) -> None:
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"sdedit: strength must be in (0, 1], got {strength}")
    if int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"sdedit: strength {strength} x num_inference_steps {num_inference_steps} leaves no "
            "denoising step; raise either"
        )


@register_method(CARD, check=_check)
def sdedit(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, strength: float,
           num_inference_steps: int, guidance_scale: float, eta: float) -> MethodOutput:
    """Edit ``inputs.image`` towards ``inputs.target_prompt`` (see the module docstring)."""
    image = _img2img(pipe)(
        prompt=inputs.target_prompt,
        image=inputs.image,
        strength=strength,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        generator=generator,
    ).images[0]
    return MethodOutput(image)
