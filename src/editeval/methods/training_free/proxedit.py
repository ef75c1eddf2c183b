"""ProxEdit: negative-prompt inversion with proximal guidance, edited with Prompt-to-Prompt.

Paper: "ProxEdit: Improving Tuning-Free Real Image Editing with Proximal Guidance", Han, Wen, Chen,
Zhang, Song, Ren, Gao, Stathopoulos, He, Chen, Liu, Zhangli, Jiang, Xia, Srivastava and Metaxas,
WACV 2024, arXiv:2306.05414 (official code: phymhan/prompt-to-prompt).

1. DDIM inversion of the source at guidance 1 under the source prompt (cached, shared).
2. Prompt-to-Prompt editing with negative-prompt inversion (the source prompt's embedding as the
   unconditional embedding) and, in place of classifier-free guidance, proximal guidance
   eps_u + w prox(eps_c - eps_u): prox soft-thresholds the guidance term at the
   ``proximal_quantile`` (0.7) of its magnitudes over the batch, so only its large entries steer
   the edit (the official ``prox="l0"`` update d - clip(d, -tau, tau), which is this soft
   threshold).
3. Inversion guidance: at timesteps below ``recon_t`` (400), where the thresholded guidance term is
   not above the threshold (the edit mask, dilated by ``dilate_mask`` = 1 latent pixel), the
   latents of both branches move towards the DDIM trajectory by ``recon_lr`` (1: replaced), before
   the local blend (:class:`editeval.diffusion.inversion.ProximalGuidance`).

Settings from the official examples (``run_npi.py``; quantile 0.7-0.75, recon_lr 1, recon_t 400,
dilation 1-2): 50 DDIM steps, guidance 7.5, cross-attention replaced for 0.4 of the steps,
self-attention for 0.6, self-attention in layers up to 32 x 32 query tokens, local blend from 0.2 of
the steps at 0.3. The official examples also re-weight the new word by 2 (``equalizer``, off by
default here: it needs the word).

Deviations: Prompt-to-Prompt's (blend resolution, automatic blend words).

NFE = num_inference_steps (DDIM inversion; 0 when cached) + 4 * num_inference_steps.
"""

from __future__ import annotations

from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.inversion import PROX_DILATE, PROX_QUANTILE, PROX_RECON_LR, PROX_RECON_T
from editeval.methods.training_free.prompt_to_prompt import (
    p2p_check,
    p2p_defaults,
    run_prompt_to_prompt,
)

CARD = MethodCard(
    name="proxedit",
    title="ProxEdit (proximal negative-prompt inversion + Prompt-to-Prompt)",
    paper=Paper("ProxEdit: Improving Tuning-Free Real Image Editing with Proximal Guidance",
                "WACV", 2024, "2306.05414"),
    strategy="training-free",
    subcategory="inversion-sampling-modification",
    inputs=("source_prompt", "target_prompt"),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={**p2p_defaults(0.4, 0.6, 0.2), "proximal_quantile": PROX_QUANTILE,
              "recon_lr": PROX_RECON_LR, "recon_t": PROX_RECON_T, "dilate_mask": PROX_DILATE},
    nfe_formula="num_inference_steps (DDIM inversion; 0 when cached) + 4 * num_inference_steps",
    deviations="Prompt-to-Prompt's deviations (blend resolution, automatic blend words)",
    note="recon_lr=0 turns the inversion guidance off (proximal guidance alone).",
)


@register_method(CARD, check=p2p_check(CARD.name))
def proxedit(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
             proximal_quantile: float, recon_lr: float, recon_t: int, dilate_mask: int,
             **params: Any) -> MethodOutput:
    """Invert with negative-prompt inversion, edit with proximal guidance (module docstring)."""
    return run_prompt_to_prompt(pipe, inputs, inversion="proxedit", method=CARD.name,
                                self_replace_max_tokens=32 * 32,
                                proximal_quantile=proximal_quantile, recon_lr=recon_lr,
                                recon_t=recon_t, dilate_mask=dilate_mask, **params)
