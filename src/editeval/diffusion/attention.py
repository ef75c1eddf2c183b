"""Attention control: see and change a UNet's attention while it denoises.

Prompt-to-Prompt, Plug-and-Play, MasaCtrl and their kin edit by reading or rewriting the attention
of a Stable Diffusion UNet. This module is the one place that does it:

- :func:`control_attention` installs a :class:`ControlledAttnProcessor` on every attention layer of a
  UNet, and always restores the original processors when the block ends, also when it raises
  (:func:`swap_attention_processors` does the same for processors of a method's own).
- The processor computes attention with an explicit softmax (SDPA never exposes the probabilities)
  and lets a :class:`AttentionController` rewrite queries, keys and values before the softmax
  (:meth:`AttentionController.edit_qkv`, e.g. MasaCtrl's mutual self-attention) and the
  probabilities after it (:meth:`AttentionController.edit_probs`, e.g. Prompt-to-Prompt's word swap).
  Layers a controller does not want (:meth:`AttentionController.wants`) run through
  ``scaled_dot_product_attention``, as fast as the stock processor.
- Each call sees an :class:`AttentionCall`: self or cross attention, the block (down/mid/up), the
  layer's name and the current denoising ``step`` and ``timestep``, which diffusers' processors
  never see; a forward pre-hook on the UNet keeps them current.
- A controller records attention probabilities per step and layer when asked
  (``record={"cross"}`` or ``{"cross", "self"}``), and :meth:`AttentionController.average_maps`
  averages them over layers, heads and steps at one spatial resolution.

Shapes inside the hooks: queries, keys and values are (batch, heads, tokens, head_dim); probabilities
are (batch, heads, query_tokens, key_tokens), each row summing to 1. The batch is the UNet's batch,
laid out by the method (for classifier-free guidance: the unconditional half, then the conditional).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionCall:
    """Where and when an attention layer runs.

    Attributes:
        layer: the processor's name in the UNet (``up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``).
        is_cross: cross-attention (keys from the text) rather than self-attention.
        block: ``down``, ``mid`` or ``up``.
        step: index of the denoising step inside the controlled block (0 for the first timestep the
            UNet sees, +1 whenever the timestep changes).
        timestep: the UNet's timestep (0..999 on SD's schedule).
        height, width: the spatial size of the layer's query tokens (``height * width`` tokens).
    """

    layer: str
    is_cross: bool
    block: str
    step: int
    timestep: int
    height: int
    width: int


class AttentionController:
    """Override :meth:`wants`, :meth:`edit_qkv` and :meth:`edit_probs`; the base class changes nothing.

    Args:
        record: which attention to record per step and layer: a subset of ``{"cross", "self"}``.
        record_max_tokens: record only layers with at most this many query tokens (SD's 16x16 and
            32x32 layers with the default; the 64x64 self-attention maps would take gigabytes).
    """

    def __init__(self, record: set[str] | frozenset[str] = frozenset(),
                 record_max_tokens: int = 1024) -> None:
        unknown = set(record) - {"cross", "self"}
        if unknown:
            raise ValueError(f"record must be a subset of {{'cross', 'self'}}, got {sorted(unknown)}")
        self.record = frozenset(record)
        self.record_max_tokens = record_max_tokens
        self.maps: dict[int, dict[str, torch.Tensor]] = {}  # step -> layer -> probs

    def wants(self, call: AttentionCall) -> bool:
        """Whether this call needs the explicit path (edits or recording); default: only to record."""
        return self._records(call)

    def edit_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewrite (batch, heads, tokens, head_dim) queries, keys and values before the softmax."""
        return query, key, value

    def edit_probs(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """Rewrite (batch, heads, query_tokens, key_tokens) probabilities after the softmax."""
        return probs

    def _records(self, call: AttentionCall) -> bool:
        kind = "cross" if call.is_cross else "self"
        return kind in self.record and call.height * call.width <= self.record_max_tokens

    def _store(self, probs: torch.Tensor, call: AttentionCall) -> None:
        if self._records(call):
            self.maps.setdefault(call.step, {})[call.layer] = probs.detach()

    def average_maps(self, height: int, width: int, is_cross: bool = True,
                     steps: list[int] | None = None) -> torch.Tensor:
        """Recorded probabilities at one resolution, averaged over layers, heads and ``steps``.

        Returns a (batch, height, width, key_tokens) float32 tensor.

        Raises:
            ValueError: nothing of that kind was recorded at that resolution.
        """
        picked = [probs for step, layers in self.maps.items() if steps is None or step in steps
                  for layer, probs in layers.items()
                  if layer.endswith("attn2.processor") == is_cross
                  and probs.shape[2] == height * width]
        if not picked:
            raise ValueError(f"no {'cross' if is_cross else 'self'}-attention maps recorded at "
                             f"{height}x{width}; record them with record={{...}} and check the "
                             "resolution (the UNet's latent size divided by 1, 2, 4 or 8)")
        mean = torch.stack([p.float().mean(dim=1) for p in picked]).mean(dim=0)
        return mean.reshape(mean.shape[0], height, width, mean.shape[-1])


class _Clock:
    """The current step and timestep, advanced by a forward pre-hook on the UNet."""

    def __init__(self) -> None:
        self.step = -1
        self.timestep: int | None = None
        self.latent_size: tuple[int, int] = (0, 0)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        value = int(torch.as_tensor(timestep).flatten()[0])
        if value != self.timestep:
            self.step += 1
            self.timestep = value
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))


class ControlledAttnProcessor:
    """An attention processor that hands its queries, keys, values and probabilities to a controller.

    Numerically it is diffusers' ``AttnProcessor`` (explicit softmax, through the layer's own
    ``get_attention_scores``, which honours ``upcast_attention`` and ``upcast_softmax``: scores or
    softmax in float32 when set, as float16 checkpoints that need it expect) on the layers the
    controller wants and ``scaled_dot_product_attention`` on the others.
    """

    def __init__(self, name: str, controller: AttentionController, clock: _Clock) -> None:
        self.name = name
        self.controller = controller
        self.clock = clock
        self.is_cross = name.endswith("attn2.processor")
        self.block = name.split(".")[0].split("_")[0]

    def _call(self, tokens: int) -> AttentionCall:
        lat_h, lat_w = self.clock.latent_size
        factor = math.sqrt(lat_h * lat_w / tokens) if tokens else 1.0
        height = max(1, round(lat_h / factor))
        return AttentionCall(self.name, self.is_cross, self.block, max(self.clock.step, 0),
                             int(self.clock.timestep or 0), height, tokens // height)

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, h, w = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, h * w).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, H*D) -> (B, H, N, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), \
            heads(attn.to_v(context))
        call = self._call(tokens)
        if self.controller.wants(call):
            query, key, value = self.controller.edit_qkv(query, key, value, call)
            probs = attn.get_attention_scores(query.reshape(-1, *query.shape[-2:]),
                                              key.reshape(-1, *key.shape[-2:]), attention_mask)
            probs = probs.view(batch, attn.heads, *probs.shape[-2:]).to(value.dtype)
            probs = self.controller.edit_probs(probs, call)
            self.controller._store(probs, call)
            out = probs @ value
        else:
            mask = None if attention_mask is None else \
                attention_mask.view(batch, -1, *attention_mask.shape[-2:])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                 scale=attn.scale)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def swap_attention_processors(unet: Any, processors: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Install ``processors`` (layer name -> processor; layers not named keep theirs) inside the
    ``with`` block, which gets the original processors by name; they are restored on exit, whatever
    happens inside."""
    originals = dict(unet.attn_processors)
    try:
        unet.set_attn_processor({**originals, **processors})  # diffusers empties the dict it is given
        yield dict(originals)
    finally:
        unet.set_attn_processor(dict(originals))


@contextmanager
def control_attention(unet: Any, controller: AttentionController) -> Iterator[AttentionController]:
    """Route every attention layer of ``unet`` through ``controller`` inside the ``with`` block.

    The original processors are restored and the step hook removed on exit, whatever happens
    inside. Steps count from 0 at the first UNet call in the block.
    """
    clock = _Clock()
    processors = {name: ControlledAttnProcessor(name, controller, clock)
                  for name in unet.attn_processors}
    handle = unet.register_forward_pre_hook(clock.hook, with_kwargs=True)
    try:
        with swap_attention_processors(unet, processors):
            yield controller
    finally:
        handle.remove()
