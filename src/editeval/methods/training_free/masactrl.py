"""MasaCtrl: mutual self-attention, the target's queries reading the source's keys and values.

Paper: "MasaCtrl: Tuning-Free Mutual Self-Attention Control for Consistent Image Synthesis and
Editing", Cao, Wang, Qi, Shan, Qie and Zheng, ICCV 2023, arXiv:2304.08465 (official code:
TencentARC/MasaCtrl).

Real-image editing, as in the official ``playground_real`` code:

1. DDIM-invert the source with 50 steps under the empty prompt (the official code inverts under
   the empty source prompt with guidance 7.5, which equals no guidance when both halves of the
   guidance batch see the same empty prompt).
2. Denoise a source branch (empty prompt) and a target branch (the target prompt, classifier-free
   guidance 7.5 against the empty prompt) from the inverted latent. From step S = ``start_step``
   (4) on, in the self-attention layers from L = ``start_layer`` (10, counting SD 1.5's 16
   self-attention layers in execution order: the decoder's ``up_blocks[2..3]``), the target's
   queries attend to the source's keys and values (:class:`MutualSelfAttention`, through
   :func:`~editeval.diffusion.attention.control_attention`).
3. Mask-guided variant (the paper's Sec. 3.3, the official ``MutualSelfAttentionControlMask``)
   when the request has a mask (an empty or full one, as EditEval gives for style changes, is
   no mask): in the controlled layers, target queries inside the mask attend only to the source's
   keys inside it and queries outside only to keys outside (the mask resized to each layer with
   nearest-neighbour interpolation, serving as both source and target mask).
   The official code computes a foreground and a background attention and blends them by the
   target mask; with a binary mask each query takes one of the two, which is what we compute, by
   renormalising the softmax over the allowed keys (exact; in float32). A layer where the resized
   mask is empty or full runs plain mutual self-attention.

The UNet batch is [source, target unconditional, target conditional]: 3 NFE per step. The
official code evaluates the source twice (its unconditional and conditional rows, both under the
empty prompt, so equal) and the inversion with guidance (two equal rows): ours computes the same
result with 3 NFE per step instead of 4 and 1 per inversion step instead of 2.

Layers on other UNets: the paper's self-attention layer index l (of SD 1.5's 16) maps to
``floor(l * n / 16)`` of the UNet's n self-attention layers (identity on SD 1.5). On the toy and
the tiny models (n = 7) L = 10 maps to layer 4: ``up_blocks.1.attentions.1`` and
``up_blocks.2.attentions.*`` on the toy model, ``up_blocks.0.attentions.1`` and
``up_blocks.1.attentions.*`` on the tiny one.

Deviations: the source branch evaluated once per step (same result, see above); a given mask
serves as both source and target mask (the paper can also derive them from cross-attention maps:
not implemented); timesteps follow the pipeline's scheduler configuration (SD 1.5: 981..1, the
official notebook's DDIM scheduler: 980..0); the layer mapping above on non-SD-shaped UNets.

TIC (Duan et al., "Tuning-Free Inversion-Enhanced Control for Consistent Image Editing",
arXiv:2312.14611) is not implemented here: it takes keys and values recorded during the inversion
pass itself and joins them to the sampling branch's by a mask-guided attention concatenation,
neither of which this sampler has.

NFE = num_inference_steps (inversion; 0 when cached) + 3 * num_inference_steps (2 * without
guidance).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.attention import AttentionCall, AttentionController, control_attention
from editeval.diffusion.ddim import ddim_scheduler
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.source_branch import (
    denoise_with_source_branch,
    invert_unconditional,
)

SD15_SELF_ATTENTION_LAYERS = 16

CARD = MethodCard(
    name="masactrl",
    title="MasaCtrl",
    paper=Paper(
        "MasaCtrl: Tuning-Free Mutual Self-Attention Control for Consistent Image Synthesis and "
        "Editing", "ICCV", 2023, "2304.08465",
    ),
    strategy="training-free",
    subcategory="attention-modification",
    inputs=("target_prompt",),
    optional_inputs=("mask",),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={"num_inference_steps": 50, "guidance_scale": 7.5, "start_step": 4,
              "start_layer": 10},
    nfe_formula="num_inference_steps (inversion; none when cached) + 3 * num_inference_steps  "
                "(2 * num_inference_steps when guidance_scale = 1)",
    deviations="source branch evaluated once per step (the official code evaluates two equal "
               "rows), same result; a mask switches on the mask-guided variant with the given "
               "mask as both source and target mask (the paper also derives masks from "
               "cross-attention, not implemented). Timesteps follow the pipeline's scheduler "
               "configuration (SD 1.5: 981..1; the official notebook's DDIM: 980..0). On a UNet "
               "not shaped like SD 1.5 the paper's "
               "self-attention layer l (of 16) maps to floor(l * n / 16) of its n: toy model "
               "(n=7): up_blocks.1.attentions.1 and up_blocks.2; tiny model: "
               "up_blocks.0.attentions.1 and up_blocks.1",
    note="source branch and inversion under the empty prompt, as the official real-image code; "
         "the source prompt is not used",
)

_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def self_attention_layers(unet: Any) -> list[str]:
    """The UNet's self-attention processor names in execution order (down, mid, up blocks)."""

    def position(name: str) -> tuple[int, ...]:
        section = name.split(".")[0]
        return (_ORDER.get(section, 3), *map(int, re.findall(r"\.(\d+)\.", f".{name}.")))

    return sorted((name for name in unet.attn_processors if name.endswith("attn1.processor")),
                  key=position)


def masactrl_layers(unet: Any, start_layer: int) -> list[str]:
    """The self-attention processors MasaCtrl controls: those from the paper's layer
    ``start_layer`` (of SD 1.5's 16) on, mapped by position (see the module docstring).

    Raises:
        ValueError: ``start_layer`` outside 0..15.
    """
    if not 0 <= start_layer < SD15_SELF_ATTENTION_LAYERS:
        raise ValueError(f"masactrl: start_layer counts SD 1.5's 16 self-attention layers, "
                         f"0..15; got {start_layer}")
    layers = self_attention_layers(unet)
    return layers[math.floor(start_layer * len(layers) / SD15_SELF_ATTENTION_LAYERS):]


class MutualSelfAttention(AttentionController):
    """The target rows' (1 and up) self-attention reads the source row's (0) keys and values in
    ``layers`` from step ``start_step`` on; with ``mask`` ((H, W) bool, True = edit region),
    queries inside it read only keys inside it and queries outside only keys outside."""

    def __init__(self, layers: list[str], start_step: int,
                 mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layers = frozenset(layers)
        self.start_step = start_step
        self.mask = mask

    def wants(self, call: AttentionCall) -> bool:
        return call.layer in self.layers and call.step >= self.start_step

    def edit_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return query, key[:1].expand_as(key), value[:1].expand_as(value)

    def edit_probs(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if self.mask is None:
            return probs
        inside = F.interpolate(self.mask[None, None].to(probs.device, torch.float32),
                               size=(call.height, call.width), mode="nearest").flatten().bool()
        if inside.all() or not inside.any():
            return probs
        allowed = (inside[:, None] == inside[None, :]).to(torch.float32)  # (queries, keys)
        target = probs[1:].float() * allowed
        tiny = torch.finfo(torch.float32).tiny
        target = target / target.sum(dim=-1, keepdim=True).clamp_min(tiny)
        return torch.cat([probs[:1], target.to(probs.dtype)])


def _check(*, start_step: int, start_layer: int, **_: Any) -> None:
    if start_step < 0:
        raise ValueError(f"masactrl: start_step must be >= 0, got {start_step}")
    if not 0 <= start_layer < SD15_SELF_ATTENTION_LAYERS:
        raise ValueError(f"masactrl: start_layer counts SD 1.5's 16 self-attention layers, "
                         f"0..15; got {start_layer}")


@register_method(CARD, check=_check)
def masactrl(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
             num_inference_steps: int, guidance_scale: float, start_step: int,
             start_layer: int) -> MethodOutput:
    """Edit ``inputs.image`` towards ``inputs.target_prompt`` (see the module docstring).

    Intermediates: ``inversion_cached``, ``controlled_layers``, ``mask_guided``, and the clean
    (1, 4, h, w) ``source_latents`` (the source branch: the reconstruction) and ``latents``.
    Deterministic: ``generator`` is unused.
    """
    layers = masactrl_layers(pipe.unet, start_layer)
    mask = None if inputs.mask is None else torch.from_numpy(np.asarray(inputs.mask) > 127)
    source_latents, cached = invert_unconditional(pipe, inputs, num_inference_steps,
                                                  num_inference_steps)
    empty = encode_prompt(pipe, "")
    controller = MutualSelfAttention(layers, start_step, mask)
    with control_attention(pipe.unet, controller):
        source, target = denoise_with_source_branch(
            pipe.unet, ddim_scheduler(pipe, num_inference_steps), source_latents[0], empty,
            encode_prompt(pipe, inputs.target_prompt), empty, guidance_scale)
    return MethodOutput(decode_latents(pipe, target), {
        "inversion_cached": cached,
        "controlled_layers": layers,
        "mask_guided": mask is not None,
        "source_latents": source,
        "latents": target,
    })
