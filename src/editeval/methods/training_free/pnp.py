"""Plug-and-Play: inject the source's decoder features and self-attention while sampling the target.

Paper: "Plug-and-Play Diffusion Features for Text-Driven Image-to-Image Translation", Tumanyan,
Geyer, Bagon and Dekel, CVPR 2023, arXiv:2211.12572 (official diffusers code: pnp-diffusers).

Algorithm:

1. DDIM-invert the source under the empty prompt without guidance, with many steps (the official
   code inverts with 999 steps and keeps the latent at every timestep).
2. Sample the target prompt from the inverted latent at the first sampling timestep, with
   classifier-free guidance against the negative prompt, while a *source branch* in the same UNet
   batch replays the inversion trajectory (at each sampling timestep the inverted latent of that
   timestep, under the empty prompt). The UNet batch is [source, target unconditional, target
   conditional]: 3 NFE per step.
3. For the first ``feature_injection`` (tau_f = 0.8) of the steps, the output of the residual
   branch of decoder layer 4 (``up_blocks[1].resnets[1]``, its ``conv2`` output before the skip
   connection is added, as in the official code) of both target rows is replaced by the source
   row's. For the first ``attention_injection`` (tau_A = 0.5) of the steps, the self-attention
   queries and keys of decoder layers 4-11 (``up_blocks[1].attentions[1..2]``,
   ``up_blocks[2..3].attentions[0..2]``) of the target rows are replaced by the source row's
   (values stay the target's). Step counts are ``int(num_inference_steps * tau)``, as in the
   official code.

The feature injection is a forward hook on the ``conv2`` module; the query/key injection an
:class:`~editeval.diffusion.attention.AttentionController` under
:func:`~editeval.diffusion.attention.control_attention`; both are removed when the edit ends,
also when it raises.

Layers on other UNets: the paper numbers the 12 decoder layers of SD 1.5 (the resnets of the up
blocks, each with the attention that follows it). On a decoder of L layers, the paper's layer l is
layer ``floor(l * L / 12)`` (identity on SD 1.5): the toy model (L = 6) injects features at
``up_blocks.1.resnets.0`` and queries/keys from decoder layer 2 on (``up_blocks.1.attentions.*``,
``up_blocks.2.attentions.*``); the tiny model (L = 4) at ``up_blocks.0.resnets.1`` and from layer 1.

The cached inversion and the three-row sampler, which MasaCtrl shares, are in
:mod:`editeval.diffusion.source_branch`.

Deviations: the official code uses SD 2.1 base (the paper SD 1.4/1.5 in its original LDM code); we
run whatever model the caller passes, with the layer mapping above on non-SD-shaped UNets.

NFE = inversion_steps + 3 * num_inference_steps (2 * num_inference_steps when guidance_scale = 1);
the inversion term is 0 when the inversion comes from the cache.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.samples import TASKS
from editeval.diffusion.attention import AttentionCall, AttentionController, control_attention
from editeval.diffusion.ddim import ddim_scheduler
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.source_branch import (
    denoise_with_source_branch,
    invert_unconditional,
)

SD15_DECODER_LAYERS = 12
PAPER_FEATURE_LAYER = 4  # f^4: the first decoder layer whose features are injected
PAPER_ATTENTION_LAYERS_FROM = 4  # self-attention queries/keys of decoder layers 4..11

CARD = MethodCard(
    name="pnp",
    title="Plug-and-Play",
    paper=Paper(
        "Plug-and-Play Diffusion Features for Text-Driven Image-to-Image Translation",
        "CVPR", 2023, "2211.12572",
    ),
    strategy="training-free",
    subcategory="attention-modification",
    inputs=("target_prompt",),
    model_kind="text-to-image",
    tasks=TASKS,
    defaults={
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "negative_prompt": "ugly, blurry, black, low res, unrealistic",
        "feature_injection": 0.8,
        "attention_injection": 0.5,
        "inversion_steps": 999,
    },
    nfe_formula="inversion_steps + 3 * num_inference_steps  (2 * num_inference_steps when "
                "guidance_scale = 1; no inversion term when the inversion is cached)",
    deviations="any text-to-image model (official code: SD 2.1 base). On a UNet not shaped like "
               "SD 1.5 the paper's decoder layer l (of 12) maps to layer floor(l * L / 12) of its "
               "L decoder layers: toy model (L=6): features at up_blocks.1.resnets.0, queries/keys "
               "in up_blocks.1-2 self-attention; tiny model (L=4): features at "
               "up_blocks.0.resnets.1, queries/keys from up_blocks.0.attentions.1 on",
    note="inversion_steps=999 as in the official code (999 steps under the empty prompt, every "
         "timestep kept); the source's features come from replaying that trajectory",
)


def _attention_index(name: str) -> tuple[int, int]:
    """(up block, attention) indices of an up-block processor name; (-1, -1) for other blocks."""
    match = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.", name)
    return (int(match.group(1)), int(match.group(2))) if match else (-1, -1)


def pnp_layers(unet: Any) -> tuple[str, list[str]]:
    """The injected layers of ``unet``: the features' module and the self-attention processors.

    Decoder layers are the up blocks' resnets in execution order; the paper's layer ``l`` of SD
    1.5's 12 maps to ``floor(l * L / 12)`` of ``L`` (see the module docstring).

    Returns:
        The name of the ``conv2`` module whose output is injected
        (``up_blocks.1.resnets.1.conv2`` on SD 1.5) and the names of the self-attention
        processors whose queries and keys are injected.

    Raises:
        ValueError: the UNet has no decoder layers.
    """
    decoder = [(b, j) for b, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))]
    if not decoder:
        raise ValueError("pnp needs a UNet with up blocks (a Stable Diffusion UNet)")

    def mapped(paper_layer: int) -> int:
        return math.floor(paper_layer * len(decoder) / SD15_DECODER_LAYERS)

    block, resnet = decoder[mapped(PAPER_FEATURE_LAYER)]
    first = mapped(PAPER_ATTENTION_LAYERS_FROM)
    injected = set(decoder[first:])
    attention = [name for name in unet.attn_processors
                 if name.endswith("attn1.processor") and _attention_index(name) in injected]
    attention.sort(key=lambda name: (*_attention_index(name), name))
    return f"up_blocks.{block}.resnets.{resnet}.conv2", attention


class QueryKeyInjection(AttentionController):
    """Replaces the target rows' self-attention queries and keys by the source row's (row 0) in
    the given layers for the first ``steps`` steps."""

    def __init__(self, layers: list[str], steps: int) -> None:
        super().__init__()
        self.layers = frozenset(layers)
        self.steps = steps

    def wants(self, call: AttentionCall) -> bool:
        return call.layer in self.layers and call.step < self.steps

    def edit_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return query[:1].expand_as(query), key[:1].expand_as(key), value


class FeatureInjection:
    """A forward hook that replaces the target rows of a module's output by the source row's
    (row 0) while ``active``; :meth:`set_step` switches it for the first ``steps`` steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.active = False

    def set_step(self, step: int) -> None:
        self.active = step < self.steps

    def hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output[:1].expand_as(output).contiguous() if self.active else output


def _check(*, feature_injection: float, attention_injection: float, **_: Any) -> None:
    for name, value in (("feature_injection", feature_injection),
                        ("attention_injection", attention_injection)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"pnp: {name} is a fraction of the steps in [0, 1], got {value}")


@register_method(CARD, check=_check)
def plug_and_play(pipe: Any, inputs: EditInputs, generator: torch.Generator, *,
                  num_inference_steps: int, guidance_scale: float, negative_prompt: str,
                  feature_injection: float, attention_injection: float,
                  inversion_steps: int) -> MethodOutput:
    """Translate ``inputs.image`` towards ``inputs.target_prompt`` (see the module docstring).

    ``feature_injection`` and ``attention_injection`` are fractions of the sampling steps in
    [0, 1]. Intermediates: ``inversion_cached``, ``feature_layer``, ``attention_layers`` and the
    clean (1, 4, h, w) ``latents``.
    Deterministic: ``generator`` is unused.
    """
    feature_layer, attention_layers = pnp_layers(pipe.unet)
    source_latents, cached = invert_unconditional(pipe, inputs, num_inference_steps,
                                                  inversion_steps)
    scheduler = ddim_scheduler(pipe, num_inference_steps)
    features = FeatureInjection(int(num_inference_steps * feature_injection))
    controller = QueryKeyInjection(attention_layers, int(num_inference_steps * attention_injection))
    handle = pipe.unet.get_submodule(feature_layer).register_forward_hook(features.hook)
    try:
        with control_attention(pipe.unet, controller):
            _, target = denoise_with_source_branch(
                pipe.unet, scheduler, source_latents[0], encode_prompt(pipe, ""),
                encode_prompt(pipe, inputs.target_prompt), encode_prompt(pipe, negative_prompt),
                guidance_scale, source_latents=source_latents, on_step=features.set_step)
    finally:
        handle.remove()
    return MethodOutput(decode_latents(pipe, target), {
        "inversion_cached": cached,
        "feature_layer": feature_layer,
        "attention_layers": attention_layers,
        "latents": target,
    })
