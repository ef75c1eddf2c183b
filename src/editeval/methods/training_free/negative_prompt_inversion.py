"""Negative-prompt inversion with Prompt-to-Prompt editing.

Paper: "Negative-prompt Inversion: Fast Image Inversion for Editing with Text-guided Diffusion
Models", Miyake, Iohara, Saito and Tanaka, arXiv:2305.16807, 2023.

Null-text inversion's optimised unconditional embedding approximates the source prompt's embedding;
negative-prompt inversion uses the source prompt's embedding directly, with no optimisation:

1. DDIM inversion of the source at guidance 1 under the source prompt (cached, shared).
2. Prompt-to-Prompt editing (:mod:`editeval.methods.training_free.prompt_to_prompt`) with the
   source prompt's embedding as the unconditional ("negative") embedding of both branches: the
   source branch's guidance term vanishes, so it retraces the guidance-1 inversion whatever the
   guidance scale. 50 DDIM steps, guidance 7.5.

Prompt-to-Prompt settings: cross-attention replaced for 0.4 of the steps, self-attention for 0.6,
self-attention in layers up to 32 x 32 query tokens, local blend from 0.2 of the steps at 0.3: the
settings of the authors' comparison code base (the P2P/null-text notebook as used by the ProxEdit
and PnP Inversion code for negative-prompt inversion); the paper gives no other.

Deviations: Prompt-to-Prompt's (blend resolution, automatic blend words).

NFE = num_inference_steps (DDIM inversion; 0 when cached) + 4 * num_inference_steps.
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.methods.training_free.prompt_to_prompt import (
    p2p_check,
    p2p_defaults,
    run_prompt_to_prompt,
)

CARD = MethodCard(
    name="negative-prompt-inversion",
    title="Negative-prompt inversion + Prompt-to-Prompt",
    paper=Paper("Negative-prompt Inversion: Fast Image Inversion for Editing with Text-guided "
                "Diffusion Models", "arXiv", 2023, "2305.16807"),
    strategy="training-free",
    subcategory="inversion-sampling-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults=p2p_defaults(0.4, 0.6, 0.2),
    nfe_formula="num_inference_steps (DDIM inversion; 0 when cached) + 4 * num_inference_steps",
    deviations="Prompt-to-Prompt's deviations (blend resolution, automatic blend words)",
)


@register_method(CARD, check=p2p_check(CARD.name))
def negative_prompt_inversion(pipe: Any, inputs: EditInputs, generator: torch.Generator,
                              **params: Any) -> MethodOutput:
    """Invert with negative-prompt inversion, edit with Prompt-to-Prompt (module docstring)."""
    return run_prompt_to_prompt(pipe, inputs, inversion="negative-prompt", method=CARD.name,
                                self_replace_max_tokens=32 * 32, **params)
