"""SEGA: semantic guidance towards and away from edit concepts, on a DDIM-inverted real image.

Paper: "SEGA: Instructing Text-to-Image Models using Semantic Guidance", Brack, Friedrich,
Hintersdorf, Struppek, Schramowski and Kersting, NeurIPS 2023, arXiv:2301.12247 (official code:
ml-research/semantic-image-editing, diffusers' ``SemanticStableDiffusionPipeline``).

SEGA steers generation: next to classifier-free guidance of the prompt, each edit concept adds its
own guidance term, thresholded to the latent elements where it is strongest, with a warm-up and a
momentum (:mod:`editeval.diffusion.semantic_guidance`). It is a guidance for generation; to edit a
real image here it starts from the image's **DDIM inversion** (Song et al., ICLR 2021): the
deterministic inversion under the source prompt at guidance 1, shared through the run's inversion
cache with Prompt-to-Prompt and its family. That is the smallest addition that makes SEGA an image
editor: DDIM sampling from the inverted noise, the sampler SEGA's pipeline runs with a DDIM
scheduler, retraces the source, and semantic guidance moves it.

Algorithm: ``z_T`` = DDIM-invert(source, source prompt); then 50 DDIM steps (eta 0) from ``z_T``
with the source prompt at guidance ``guidance_scale`` plus semantic guidance of the edit concepts.
The concepts come from the prompt pair: the words the target adds are concepts to add, the words it
drops concepts to remove (``reverse_editing_direction``), one concept per run of differing words
found by the Prompt-to-Prompt aligner; ``edit_concepts="+words,-words"`` gives them explicitly.

Defaults: the official pipeline's (``SemanticStableDiffusionPipeline.__call__``): 50 steps,
guidance 7.5, edit guidance scale 5, threshold 0.9, warm-up 10 steps, momentum scale 0.1, momentum
beta 0.4, no cool-down, every concept weighted 1.

Deviations: a real image is edited from its DDIM inversion (the paper generates from noise); the
sampler is DDIM (the pipeline runs the checkpoint's scheduler, PNDM for SD 1.5), because DDIM
sampling is what retraces a DDIM inversion; the concepts are derived from the prompt pair (the paper
takes them from the user); one scale, threshold and warm-up for every concept (the shared part takes
one per concept).

NFE = num_inference_steps (DDIM inversion at guidance 1; 0 when cached) + (2 + n_concepts) *
num_inference_steps (the prompt and unconditional batch of 2, and a batch of one per concept).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.ddim import ddim_sample, ddim_scheduler
from editeval.diffusion.inversion import ddim_trajectory
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.semantic_guidance import (
    SemanticGuidance,
    concept_embeddings,
    parse_concepts,
    resolve_concepts,
)

CARD = MethodCard(
    name="sega",
    title="SEGA (semantic guidance)",
    paper=Paper("SEGA: Instructing Text-to-Image Models using Semantic Guidance", "NeurIPS", 2023,
                "2301.12247"),
    strategy="training-free",
    subcategory="multi-noise-redirection",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 7.5, "edit_concepts": "",
              "edit_guidance_scale": 5.0, "edit_threshold": 0.9, "edit_warmup_steps": 10,
              "edit_momentum_scale": 0.1, "edit_mom_beta": 0.4},
    nfe_formula="num_inference_steps (DDIM inversion at guidance 1; 0 when cached) + (2 + "
                "n_concepts) * num_inference_steps (n_concepts: the intermediates' edit_concepts)",
    deviations="edits a real image from its DDIM inversion under the source prompt (the paper "
               "generates from noise), sampled with DDIM (the pipeline: the checkpoint's "
               "scheduler); edit concepts derived from the prompt pair by the P2P aligner (added "
               "words: concepts to add, dropped words: concepts to remove); one scale, threshold "
               "and warm-up for all concepts",
    note="edit_concepts='+words,-words' gives the concepts explicitly (comma-separated; '-' "
         "removes). The base prompt is the source prompt: the concepts carry the edit.",
)


def check_semantic_guidance(method: str, *, num_inference_steps: int, edit_concepts: str,
                            edit_threshold: float, edit_warmup_steps: int,
                            edit_guidance_scale: float, edit_momentum_scale: float,
                            edit_mom_beta: float, **_: Any) -> None:
    """The range check of SEGA's parameters, shared by the methods that use semantic guidance
    (other parameters are ignored).

    Raises:
        ValueError: naming ``method``, the parameter, its range and the value.
    """
    if num_inference_steps < 1:
        raise ValueError(f"{method}: num_inference_steps must be >= 1, got {num_inference_steps}")
    parse_concepts(edit_concepts)
    if not 0.0 <= edit_threshold <= 1.0:
        raise ValueError(f"{method}: edit_threshold is a quantile in [0, 1], got {edit_threshold}")
    for name, value in (("edit_warmup_steps", edit_warmup_steps),
                        ("edit_guidance_scale", edit_guidance_scale),
                        ("edit_momentum_scale", edit_momentum_scale)):
        if value < 0:
            raise ValueError(f"{method}: {name} must be >= 0, got {value}")
    if not 0.0 <= edit_mom_beta < 1.0:
        raise ValueError(f"{method}: edit_mom_beta must be in [0, 1), got {edit_mom_beta}")


def _check(**params: Any) -> None:
    check_semantic_guidance(CARD.name, **params)


def semantic_guidance(pipe: Any, scheduler: Any, inputs: EditInputs, prompt: str,
                      guidance_scale: float, *, edit_concepts: str, edit_guidance_scale: float,
                      edit_threshold: float, edit_warmup_steps: int, edit_momentum_scale: float,
                      edit_mom_beta: float) -> tuple[SemanticGuidance, list[str]]:
    """The :class:`SemanticGuidance` of one edit, with ``prompt`` as its base prompt, and its
    concepts as the user writes them (``["+red circle", "-green diamond"]``)."""
    concepts = resolve_concepts(pipe.tokenizer, inputs.source_prompt, inputs.target_prompt,
                                edit_concepts)
    guidance = SemanticGuidance(
        pipe.unet, scheduler, encode_prompt(pipe, prompt), encode_prompt(pipe, ""),
        guidance_scale, concepts, concept_embeddings(pipe, concepts), scale=edit_guidance_scale,
        threshold=edit_threshold, warmup=edit_warmup_steps, momentum_scale=edit_momentum_scale,
        momentum_beta=edit_mom_beta)
    return guidance, [str(c) for c in concepts]


@register_method(CARD, check=_check)
def sega(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, num_inference_steps: int,
         guidance_scale: float, **guidance: Any) -> MethodOutput:
    """Edit ``inputs.image`` by semantic guidance from its DDIM inversion (module docstring)."""
    trajectory, cached = ddim_trajectory(pipe, inputs.image, inputs.source_prompt,
                                         num_inference_steps, inputs.inversion_cache)
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    predict, concepts = semantic_guidance(pipe, scheduler, inputs, inputs.source_prompt,
                                          guidance_scale, **guidance)
    latents = ddim_sample(pipe.unet, trajectory[-1], scheduler, predict=predict)
    return MethodOutput(decode_latents(pipe, latents),
                        {"inversion_cached": cached, "edit_concepts": concepts})
