"""Outpainting: extend the canvas on chosen sides and draw the new area with an inpainting model.

Model and sampler: Stable Diffusion inpainting (Rombach et al., "High-Resolution Image Synthesis
with Latent Diffusion Models", CVPR 2022, arXiv:2112.10752), through
:func:`editeval.methods.training_based.sd_inpainting.inpaint` (DDIM, as there), at its defaults
(50 steps, guidance 7.5) and strength 1: the new area has nothing to start from.

Algorithm: the canvas grows by ``amount`` on each of ``sides`` (``unit`` "fraction": that
fraction of the source's width for left and right, of its height for top and bottom; "px":
pixels at the source's size); the new area is the mask, the target prompt describes the whole
extended picture. :func:`editeval.editing.edit` does the geometry (the method's ``canvas`` hook):
it pads the source, gives the method the padded image and the new area as its mask at the
model's resolution, maps the result back to the extended canvas at the source's scale and pastes
the source into it, so the edit holds the source's pixels exactly where they were and is larger
than the source.

NFE = 2 * num_inference_steps with guidance (guidance_scale > 1), half without.
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, register_method
from editeval.methods.training_based.sd_inpainting import LDM_PAPER, inpaint

SIDES = ("left", "top", "right", "bottom")
UNITS = ("fraction", "px")
MAX_FRACTION = 4.0  # the canvas at most 9 times the source's side: the source keeps some pixels

CARD = MethodCard(
    name="outpainting",
    title="Outpainting (Stable Diffusion inpainting)",
    paper=LDM_PAPER,
    strategy="training-based",
    subcategory=None,
    inputs=("target_prompt",),
    model_kind="inpainting",
    tasks=(),
    defaults={"amount": 0.25, "unit": "fraction", "sides": "left,top,right,bottom",
              "num_inference_steps": 50, "guidance_scale": 7.5},
    nfe_formula="2 * num_inference_steps with guidance (guidance_scale > 1), half that without",
    deviations="the community's recipe (pad, mask the new area, inpaint), with sd-inpainting's "
               "DDIM sampler; the source's pixels are pasted back at the source's resolution",
    note="Not in the survey's paper list: the survey's section 7 names outpainting as a task of "
         "its own. The edit is larger than the source (the extended canvas at the source's "
         "scale) and holds the source's pixels exactly; it fits none of the EditEval tasks.",
)


def _sides(sides: str) -> list[str]:
    chosen = [side.strip() for side in sides.split(",") if side.strip()]
    unknown = [side for side in chosen if side not in SIDES]
    if not chosen or unknown or len(set(chosen)) < len(chosen):
        raise ValueError(f"{CARD.name}: sides must be a comma-separated list of distinct sides "
                         f"from {', '.join(SIDES)}, got {sides!r}")
    return chosen


def _check(*, amount: float, unit: str, sides: str, num_inference_steps: int,
           guidance_scale: float, **_: Any) -> None:
    _sides(sides)
    if unit not in UNITS:
        raise ValueError(f"{CARD.name}: unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if unit == "fraction" and not 0.0 < amount <= MAX_FRACTION:
        raise ValueError(f"{CARD.name}: amount must be in (0, {MAX_FRACTION:g}] as a fraction "
                         f"of the source's side, got {amount}")
    if unit == "px" and (amount < 1 or amount != int(amount)):
        raise ValueError(f"{CARD.name}: amount must be a whole number of pixels >= 1, got "
                         f"{amount}")
    if num_inference_steps < 1:
        raise ValueError(f"{CARD.name}: num_inference_steps must be >= 1, got "
                         f"{num_inference_steps}")
    if guidance_scale < 0:
        raise ValueError(f"{CARD.name}: guidance_scale must be >= 0, got {guidance_scale}")


def border(size: tuple[int, int], *, amount: float, unit: str, sides: str,
           **_: Any) -> tuple[int, int, int, int]:
    """The pixels added to a source of ``size`` (width, height) on each side, (left, top, right,
    bottom), at the source's size; the method's ``canvas`` hook.

    Raises:
        ValueError: a chosen side would grow by less than a pixel (a fraction of a small image).
    """
    chosen = _sides(sides)
    width, height = size
    added = []
    for side in SIDES:
        length = width if side in ("left", "right") else height
        pixels = round(amount * length) if unit == "fraction" else int(amount)
        if side in chosen and pixels < 1:
            raise ValueError(f"{CARD.name}: amount={amount} of the {width}x{height} source's "
                             f"{side} side is less than a pixel; give a larger amount, or "
                             "unit=px")
        added.append(pixels if side in chosen else 0)
    return tuple(added)


@register_method(CARD, check=_check, canvas=border)
def outpainting(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, amount: float,
                unit: str, sides: str, num_inference_steps: int,
                guidance_scale: float) -> MethodOutput:
    """Draw the extended canvas's new area (``inputs.mask``, given by :func:`editeval.edit`
    from :func:`border`) from ``inputs.target_prompt``; ``amount``, ``unit`` and ``sides`` act
    through :func:`border`. Returns the whole canvas at the model's resolution."""
    return MethodOutput(inpaint(pipe, inputs.image, inputs.mask, inputs.target_prompt, generator,
                                num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, strength=1.0, paste_source=True))
