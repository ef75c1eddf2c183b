"""Attention control on the tiny UNet: exactness, restoration, the step clock, recorded maps."""

from __future__ import annotations

import pytest
import torch

from editeval.diffusion.attention import AttentionCall, AttentionController, control_attention


class EveryLayer(AttentionController):
    """Takes the explicit-softmax path on every layer and logs the calls."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[AttentionCall] = []

    def wants(self, call: AttentionCall) -> bool:
        self.calls.append(call)
        return True


def _inputs(unet, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, generator=generator)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, text


@torch.no_grad()
def test_explicit_path_matches_the_stock_processors(tiny_sd):
    unet = tiny_sd.unet
    latents, text = _inputs(unet)
    stock = unet(latents, 500, encoder_hidden_states=text).sample
    with control_attention(unet, EveryLayer()) as controller:
        controlled = unet(latents, 500, encoder_hidden_states=text).sample
    assert controller.calls, "the controller saw no attention call"
    assert torch.allclose(stock, controlled, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_processors_are_restored_even_when_the_block_raises(tiny_sd):
    unet = tiny_sd.unet
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with control_attention(unet, EveryLayer()):
            raise RuntimeError("boom")
    after = {name: type(p) for name, p in unet.attn_processors.items()}
    assert after == before
    assert not unet._forward_pre_hooks


@torch.no_grad()
def test_calls_know_step_timestep_kind_and_resolution(tiny_sd):
    unet = tiny_sd.unet
    latents, text = _inputs(unet)
    with control_attention(unet, EveryLayer()) as controller:
        for t in (900, 900, 500):  # two calls at one timestep are one step
            unet(latents, t, encoder_hidden_states=text)
    assert {c.step: c.timestep for c in controller.calls} == {0: 900, 1: 500}
    assert {c.is_cross for c in controller.calls} == {True, False}
    assert {c.block for c in controller.calls} == {"down", "mid", "up"}
    size = unet.config.sample_size
    for call in controller.calls:
        factor = size // call.height
        assert call.height == call.width == size // factor
        assert call.layer.endswith("attn2.processor") == call.is_cross


@torch.no_grad()
def test_recorded_cross_attention_rows_are_distributions(tiny_sd):
    unet = tiny_sd.unet
    latents, text = _inputs(unet)
    size = unet.config.sample_size
    with control_attention(unet, AttentionController(record={"cross"})) as controller:
        unet(latents, 700, encoder_hidden_states=text)
    layers = controller.maps[0]
    assert layers and all(name.endswith("attn2.processor") for name in layers)
    for probs in layers.values():
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    averaged = controller.average_maps(size, size)
    assert averaged.shape == (2, size, size, 77)
    assert torch.allclose(averaged.sum(-1), torch.ones(()), atol=1e-5)
    with pytest.raises(ValueError, match="no self-attention maps"):
        controller.average_maps(size, size, is_cross=False)


@torch.no_grad()
def test_edit_probs_changes_the_output(tiny_sd):
    class Uniform(AttentionController):
        def wants(self, call):
            return call.is_cross

        def edit_probs(self, probs, call):
            return torch.full_like(probs, 1.0 / probs.shape[-1])

    unet = tiny_sd.unet
    latents, text = _inputs(unet)
    stock = unet(latents, 500, encoder_hidden_states=text).sample
    with control_attention(unet, Uniform()):
        uniform = unet(latents, 500, encoder_hidden_states=text).sample
    assert (stock - uniform).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_explicit_path_honours_upcast_attention_in_float16(upcast, cross):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from editeval.diffusion.attention import ControlledAttnProcessor, _Clock

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=16 if cross else None,
                     upcast_attention=upcast, upcast_softmax=upcast).half()
    hidden = (torch.randn(2, 4, 16) * 1000).half()  # scaled scores ~3e5: beyond float16's 65504
    context = hidden.flip(1) if cross else None
    clock = _Clock()
    clock.latent_size = (2, 2)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.processor" if cross else \
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    controlled = ControlledAttnProcessor(name, EveryLayer(), clock)(attn, hidden, context)
    stock = AttnProcessor()(attn, hidden, context)  # diffusers' explicit-softmax processor
    assert stock.isfinite().all() == upcast  # float16 scores overflow unless upcast
    torch.testing.assert_close(controlled, stock, equal_nan=True, rtol=1e-3, atol=1e-3)
