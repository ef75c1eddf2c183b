"""Direct Inversion (PnP Inversion) with Prompt-to-Prompt editing.

Paper: "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code", Ju, Zeng, Bian,
Liu and Xu, ICLR 2024, arXiv:2310.01506 (official code: cure-lab/PnPInversion).

1. DDIM inversion of the source at guidance 1 under the source prompt: z*_0 ... z*_T (cached,
   shared).
2. Prompt-to-Prompt editing from z*_T with plain classifier-free guidance (empty-prompt
   unconditional embedding); after every step the difference z*_{t-1} - z_src_{t-1} between the
   trajectory and the source branch is added to the source branch, which so stays exactly on the
   trajectory, while the target branch runs free and takes its attention from the corrected source
   branch (:class:`editeval.diffusion.inversion.DirectInversionGuidance`). The correction comes
   before the local blend, as in the official code.

Settings of the paper's PIE-Bench runs (``run_editing_p2p.py``): 50 DDIM steps, guidance 7.5,
cross-attention replaced for 0.4 of the steps, self-attention for 0.6, self-attention in layers up
to 32 x 32 query tokens, local blend from 0.2 of the steps at threshold 0.3.

Deviations: the official code (``DirectInversion.offset_calculate``) computes the differences in a
separate pass along the trajectory before editing, with both prompts under classifier-free
guidance (a UNet batch of 4: 4 x steps NFE), and keeps only the source row's; we take them during
the editing pass, which gives the same differences (the source branch sees the same latents,
prompt and attention: Prompt-to-Prompt never changes the source branch) for no extra NFE.
Prompt-to-Prompt's deviations (blend resolution, automatic blend words).

NFE = num_inference_steps (DDIM inversion; 0 when cached) + 4 * num_inference_steps (the edit).
The official code's edit costs num_inference_steps + 4 * num_inference_steps (the separate pass)
+ 4 * num_inference_steps; its ``edit_image_directinversion`` also samples a reconstruction for
display (another 4 * num_inference_steps).
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
    name="direct-inversion",
    title="Direct Inversion (PnP Inversion) + Prompt-to-Prompt",
    paper=Paper("PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code", "ICLR",
                2024, "2310.01506"),
    strategy="training-free",
    subcategory=None,
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults=p2p_defaults(0.4, 0.6, 0.2),
    nfe_formula="num_inference_steps (DDIM inversion; 0 when cached) + 4 * num_inference_steps",
    deviations="source-branch differences taken during the editing pass instead of the official "
               "separate pass, which runs both prompts under guidance (same values, "
               "4 * num_inference_steps fewer NFE); Prompt-to-Prompt's deviations (blend "
               "resolution, automatic blend words)",
    note="Not in the survey's paper list (it would sit under inversion/sampling modification). "
         "The list's 'Direct inversion' (Elarabawy et al., arXiv:2211.07825) is another method.",
)


@register_method(CARD, check=p2p_check(CARD.name))
def direct_inversion(pipe: Any, inputs: EditInputs, generator: torch.Generator,
                     **params: Any) -> MethodOutput:
    """Edit with Prompt-to-Prompt, the source branch locked to the DDIM trajectory."""
    return run_prompt_to_prompt(pipe, inputs, inversion="direct", method=CARD.name,
                                self_replace_max_tokens=32 * 32, **params)
