"""LEDITS: edit-friendly DDPM inversion, then DDPM sampling with semantic guidance (SEGA).

Paper: "LEDITS: Real Image Editing with DDPM Inversion and Semantic Guidance", Tsaban and Passos,
arXiv 2023, arXiv:2307.00522 (official code: the Hugging Face space editing-images/ledits).

Algorithm: invert the source with edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR
2024, arXiv:2304.06140; editeval's ``ddpm-inversion``: noisy latents at every step and the noise
maps that regenerate them, under the source prompt at guidance ``source_guidance_scale``), then
sample the last ``num_inference_steps - skip`` DDPM steps with those noise maps under the target
prompt at guidance ``guidance_scale``, adding SEGA's semantic guidance of the edit concepts
(:mod:`editeval.diffusion.semantic_guidance`). With no concept (or edit guidance 0) it is exactly
the ``ddpm-inversion`` edit; the concepts push the edit further where they are strongest.

The concepts come from the prompt pair: the words the target adds are concepts to add, the words it
drops concepts to remove (``reverse_editing_direction``), one concept per run of differing words
found by the Prompt-to-Prompt aligner; ``edit_concepts="+words,-words"`` gives them explicitly.

Defaults (the official space's ``constants.py`` and its SEGA call): 100 steps, source guidance 3.5,
target guidance 15, skip 36; edit guidance scale 5, threshold 0.95, warm-up 1 step (counted from the
first step sampled), momentum scale 0.5, momentum beta 0.6.

Deviations: the concepts are derived from the prompt pair (the space takes them from the user, with
an optional target prompt); the inversion keeps the last step's noise map as ``ddpm-inversion``
does; one scale, threshold and warm-up for every concept.

NFE = 2 * num_inference_steps (the inversion; 1x with source_guidance_scale 1; 0 when cached, and
shared with ``ddpm-inversion`` under the same settings and seed) + (2 + n_concepts) *
(num_inference_steps - skip) (the target prompt and unconditional batch of 2, one per concept).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddpm import ddpm_sample
from editeval.diffusion.latents import decode_latents
from editeval.methods.training_free.ddpm_inversion import edit_friendly_inversion
from editeval.methods.training_free.sega import (
    check_semantic_guidance,
    semantic_guidance,
)

CARD = MethodCard(
    name="ledits",
    title="LEDITS",
    paper=Paper("LEDITS: Real Image Editing with DDPM Inversion and Semantic Guidance", "arXiv",
                2023, "2307.00522"),
    strategy="training-free",
    subcategory="multi-noise-redirection",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 100, "source_guidance_scale": 3.5, "guidance_scale": 15.0,
              "skip": 36, "edit_concepts": "", "edit_guidance_scale": 5.0,
              "edit_threshold": 0.95, "edit_warmup_steps": 1, "edit_momentum_scale": 0.5,
              "edit_mom_beta": 0.6},
    nfe_formula="2 * num_inference_steps (edit-friendly DDPM inversion; 1x with "
                "source_guidance_scale 1; 0 when cached) + (2 + n_concepts) * "
                "(num_inference_steps - skip) (n_concepts: the intermediates' edit_concepts)",
    deviations="edit concepts derived from the prompt pair by the P2P aligner (added words: "
               "concepts to add, dropped words: concepts to remove); keeps the inversion's last "
               "noise map (as ddpm-inversion); one scale, threshold and warm-up for all concepts",
    note="With no concept or edit_guidance_scale=0 it is the ddpm-inversion edit exactly, and it "
         "shares that method's inversion in a run. edit_concepts='+words,-words' gives the "
         "concepts explicitly.",
)


def _check(*, skip: int, num_inference_steps: int, **params: Any) -> None:
    check_semantic_guidance(CARD.name, num_inference_steps=num_inference_steps, **params)
    if not 0 <= skip < num_inference_steps:
        raise ValueError(f"ledits: skip must be in [0, {num_inference_steps}) (below "
                         f"num_inference_steps), got {skip}")


@register_method(CARD, check=_check)
def ledits(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, num_inference_steps: int,
           source_guidance_scale: float, guidance_scale: float, skip: int,
           **guidance: Any) -> MethodOutput:
    """Edit ``inputs.image`` with DDPM inversion and semantic guidance (module docstring)."""
    scheduler, inverted, cached = edit_friendly_inversion(pipe, inputs, generator,
                                                          num_inference_steps,
                                                          source_guidance_scale)
    predict, concepts = semantic_guidance(pipe, scheduler, inputs, inputs.target_prompt,
                                          guidance_scale, **guidance)
    latents = ddpm_sample(pipe.unet, inverted["noisy"][skip].to(pipe.device),
                          [z.to(pipe.device) for z in inverted["noise_maps"][skip:]], scheduler,
                          skip=skip, predict=predict)
    return MethodOutput(decode_latents(pipe, latents),
                        {"inversion_cached": cached, "edit_concepts": concepts})
