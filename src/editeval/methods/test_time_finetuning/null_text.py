"""Null-text inversion with Prompt-to-Prompt editing.

Paper: "NULL-text Inversion for Editing Real Images using Guided Diffusion Models", Mokady, Hertz,
Aberman, Pritch and Cohen-Or, CVPR 2023, arXiv:2211.09794 (official code: the
``null_text_w_ptp`` notebook of google/prompt-to-prompt). The survey files it under test-time
finetuning, embeddings finetuning: the unconditional embedding is optimised per image and timestep.

1. DDIM inversion of the source at guidance 1 under the source prompt: the pivot trajectory
   (shared through the inversion cache with every DDIM-based method of the run).
2. Null-text optimisation (:func:`editeval.diffusion.inversion.optimise_null_text`): per timestep,
   N = ``null_text_inner_steps`` (10) Adam iterations on the unconditional embedding so that the
   guided DDIM step (w = 7.5) from the current latent lands on the pivot's next latent; early stop
   once the loss is below ``early_stop_epsilon`` (1e-5) + 2e-5 i at step i (the official
   threshold); learning rate 1e-2 (1 - i / 100) at 50 steps; fp32. At most 50 x 10 =
   500 iterations; cached per (image, prompt, model, scheduler, steps, guidance, options).
3. Prompt-to-Prompt editing (:mod:`editeval.methods.training_free.prompt_to_prompt`) from the
   inverted noise with the optimised embeddings as the unconditional embeddings of both branches,
   with the notebook's settings: 50 DDIM steps, guidance 7.5, cross-attention replaced for 0.8 of
   the steps, self-attention for 0.5 (its word-swap example; its other examples use 0.6 and 0.7),
   self-attention replaced in layers up to 32 x 32 query tokens, local blend from 0.2 of the steps
   at threshold 0.3.

Deviations: the learning-rate decay is written as a fraction of the number of steps (identical at
50 steps); ``early_stop_epsilon=0`` turns early stopping off; the P2P deviations of ``p2p`` (blend
resolution, aligner).

NFE = num_inference_steps (pivot) + sum over steps of (3 + n_i) (null-text optimisation: one
conditional pass, n_i <= null_text_inner_steps iterations, two for the guided step; the total of
n_i is reported as ``null_text_iterations``) + 4 * num_inference_steps (editing). A cached pivot
drops the first term, cached embeddings the second. Backward passes through the UNet: sum_i n_i
(one per iteration; 0 with cached embeddings).
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.inversion import NULL_TEXT_EPSILON, NULL_TEXT_INNER_STEPS
from editeval.methods.training_free.prompt_to_prompt import (
    p2p_check,
    p2p_defaults,
    run_prompt_to_prompt,
)

CARD = MethodCard(
    name="null-text",
    title="Null-text inversion + Prompt-to-Prompt",
    paper=Paper("NULL-text Inversion for Editing Real Images using Guided Diffusion Models",
                "CVPR", 2023, "2211.09794"),
    strategy="test-time-finetuning",
    subcategory="embeddings-finetuning",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={**p2p_defaults(0.8, 0.5, 0.2), "null_text_inner_steps": NULL_TEXT_INNER_STEPS,
              "early_stop_epsilon": NULL_TEXT_EPSILON},
    nfe_formula="num_inference_steps (DDIM pivot) + sum_i (3 + n_i) (null-text optimisation, "
                "n_i <= null_text_inner_steps iterations at step i, total reported as "
                "null_text_iterations) + 4 * num_inference_steps (editing); a cached pivot drops "
                "the first term, cached embeddings the second",
    backward_formula="sum_i n_i (0 with cached embeddings)",
    deviations="learning-rate decay as a fraction of the steps (the same at 50); "
               "early_stop_epsilon=0 turns early stopping off; Prompt-to-Prompt's deviations "
               "(blend resolution, automatic blend words)",
    note="early stopping at step i once the loss is below early_stop_epsilon + 2e-5 i; "
         "early_stop_epsilon=0 runs all null_text_inner_steps iterations at every step.",
)


@register_method(CARD, check=p2p_check(CARD.name))
def null_text(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
              null_text_inner_steps: int, early_stop_epsilon: float, **params: Any) -> MethodOutput:
    """Invert with null-text inversion, edit with Prompt-to-Prompt (module docstring)."""
    return run_prompt_to_prompt(pipe, inputs, inversion="null-text", method=CARD.name,
                                self_replace_max_tokens=32 * 32,
                                null_text_inner_steps=null_text_inner_steps,
                                early_stop_epsilon=early_stop_epsilon, **params)
