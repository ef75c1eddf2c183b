"""Forgedit on the tiny model: its card's cost, the batched joint fit, the edit embeddings and
forgetting strategies by hand, the fit cached across editing parameters, and the shared pipeline
left unchanged by it (also when the fit fails half-way)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.diffusion import finetuning
from editeval.diffusion.ddim import ddim_scheduler
from editeval.diffusion.finetuning import denoising_loss, denoising_target
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import encode_image, encode_prompt
from editeval.editing import edit
from editeval.methods.test_time_finetuning.forgedit import (
    FORGETTING,
    edit_embedding,
    fitted,
    forgets,
)

SOURCE, TARGET = "a red circle on grass", "a blue circle on grass"
TINY = {"finetune_steps": 2, "batch_size": 3, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth 64x64 RGB image (the tiny model's resolution)."""
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _request(image: Image.Image, params: dict) -> EditRequest:
    return EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params={**TINY, **params})


@pytest.mark.parametrize("steps, batch, sampling, guidance, expected", [
    (2, 3, 3, 7.5, 2 * 3 + 2 * 3),
    (3, 2, 2, 1.0, 3 * 2 + 2),  # no guidance: one pass a sampling step
])
def test_nfe_and_backward_passes_follow_the_card(tiny_sd, image, steps, batch, sampling, guidance,
                                                 expected):
    result = edit(_request(image, {"finetune_steps": steps, "batch_size": batch,
                                   "num_inference_steps": sampling,
                                   "guidance_scale": guidance}), "forgedit", pipe=tiny_sd)
    assert (result.nfe, result.uncached_nfe, result.backward_passes) == (expected, expected, steps)
    assert result.intermediates["fit_cached"] is False
    assert result.intermediates["embedding_shift"] > 0  # the source embedding was fitted


def test_a_batched_loss_is_the_mean_of_its_samples(tiny_sd, image):
    # each copy has its own timestep and noise: a loss that used one timestep for the batch, or
    # broadcast the noise levels over the wrong axis, fails this
    scheduler = ddim_scheduler(tiny_sd)
    latents, text = encode_image(tiny_sd, image), encode_prompt(tiny_sd, SOURCE)
    with torch.no_grad():
        batched = denoising_loss(tiny_sd.unet, scheduler, latents, text,
                                 torch.Generator().manual_seed(3), batch_size=3)
        generator = torch.Generator().manual_seed(3)
        timesteps = torch.randint(0, 1000, (3,), generator=generator)
        noise = torch.randn((3, *latents.shape[1:]), generator=generator)
        assert len(set(timesteps.tolist())) == 3
        losses = []
        for t, eps in zip(timesteps.tolist(), noise):
            a = scheduler.alphas_cumprod[t]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * eps[None]
            output = tiny_sd.unet(noisy, t, encoder_hidden_states=text).sample
            target = denoising_target(scheduler, latents, eps[None], t)
            losses.append(float(((output - target) ** 2).mean()))
    assert float(batched) == pytest.approx(np.mean(losses), rel=1e-5)


def test_vector_subtraction_and_projection_by_hand():
    # two tokens of width 3; projection is per token (a projection of the whole 77 x D embedding
    # at once, or onto the target instead of the source, fails this)
    source = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    target = torch.tensor([[[3.0, 4.0, 0.0], [1.0, 1.0, 5.0]]])
    vs = edit_embedding(source, target, "vs", 0.25, 0.0, 0.0)
    assert torch.allclose(vs, 0.25 * target + 0.75 * source)
    vp = edit_embedding(source, target, "vp", 0.0, 0.8, 1.5)
    # token 1: perp = (0, 4, 0); token 2: target's part along (0, 1, 0) is (0, 1, 0): perp (1, 0, 5)
    expected = torch.tensor([[[0.8, 6.0, 0.0], [1.5, 1.6, 7.5]]])
    assert torch.allclose(vp, expected)
    assert torch.equal(edit_embedding(source, target, "vs", 0.0, 0.0, 0.0), source)
    with pytest.raises(ValueError, match="interpolation must be one of vs, vp"):
        edit_embedding(source, target, "vx", 1.0, 1.0, 1.0)


def test_forgetting_strategies_reset_the_official_parameter_sets(tiny_sd):
    names = [name for name, _ in tiny_sd.unet.named_parameters()]
    trained = {name for name in names if fitted(name)}
    # the first down and up block, the middle block and the input/output layers stay pretrained
    assert trained == {n for n in names if n.startswith(("down_blocks.1.", "up_blocks.1."))}
    encoder = {n for n in trained if n.startswith("down_blocks.")}
    decoder = trained - encoder

    def forgotten(strategy: str) -> set[str]:
        return {name for name in trained if forgets(name, strategy)}

    assert forgotten("none") == set()
    assert forgotten("noencoder") == encoder
    attention = {n for n in encoder if ".attn1." in n or ".attn2." in n}
    assert attention and forgotten("encoderattn") == encoder - attention
    assert forgotten("encoderattn+encoder1") == set()  # the tiny encoder's fitted block is block 1
    kv = {n for n in encoder if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert len(kv) == 2 and forgotten("encoderkv") == encoder - kv  # its one transformer block
    assert forgotten("decoderattn") == {n for n in decoder if ".attn" not in n}
    assert forgotten("decoderkv") == {n for n in decoder
                                      if ".attn2.to_k." not in n and ".attn2.to_v." not in n}
    # projections and norms around the attention layers are not attention: forgotten
    assert "up_blocks.1.attentions.0.proj_in.weight" in forgotten("decoderattn")
    assert set(FORGETTING) == {"none", "encoderattn", "encoderattn+encoder1", "encoderkv",
                               "noencoder", "decoderattn", "decoderattn+decoder2", "decoderkv"}


def test_the_fit_is_cached_across_editing_parameters(tiny_sd, image):
    # forgetting is applied after the fitted weights are loaded: a cache holding weights already
    # forgotten by the first edit's strategy gives the second edit another model, and fails this
    cache = InversionCache()
    first = edit(_request(image, {"forget": "noencoder"}), "forgedit", pipe=tiny_sd,
                 inversion_cache=cache)
    assert first.intermediates["forgotten_tensors"] == 38  # all of down_blocks.1
    other = {"gamma": 0.3, "forget": "none", "interpolation": "vp"}
    again = edit(_request(image, other), "forgedit", pipe=tiny_sd, inversion_cache=cache)
    alone = edit(_request(image, other), "forgedit", pipe=tiny_sd)
    assert again.intermediates["fit_cached"] and not alone.intermediates["fit_cached"]
    assert (again.nfe, again.uncached_nfe, again.backward_passes) == (6, 12, 0)
    assert np.array_equal(np.asarray(again.model_image), np.asarray(alone.model_image))
    assert not np.array_equal(np.asarray(again.model_image), np.asarray(first.model_image))
    # a fit setting is in the key: another learning rate fits again
    refit = edit(_request(image, {"unet_learning_rate": 1e-4}), "forgedit", pipe=tiny_sd,
                 inversion_cache=cache)
    assert not refit.intermediates["fit_cached"] and refit.backward_passes == 2


def _state(pipe) -> dict:
    return {name: (tensor.detach().clone(), tensor.requires_grad)
            for module in (pipe.unet, pipe.vae, pipe.text_encoder)
            for name, tensor in module.named_parameters(prefix=type(module).__name__)}


def test_the_shared_pipeline_is_unchanged_also_when_the_fit_fails(tiny_sd, image, monkeypatch):
    sdedit = EditRequest(image, target_prompt=TARGET, params={"num_inference_steps": 4})
    before_state = _state(tiny_sd)
    before = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    edit(_request(image, {"forget": "decoderattn"}), "forgedit", pipe=tiny_sd)
    after_edit = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)

    calls = []
    loss = finetuning.denoising_loss

    def failing(*args, **kwargs):  # fails half-way: on the second step, after one Adam step
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return loss(*args, **kwargs)

    monkeypatch.setattr(finetuning, "denoising_loss", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        edit(_request(image, {}), "forgedit", pipe=tiny_sd)
    after_failure = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    assert np.array_equal(before, after_edit) and np.array_equal(before, after_failure)
    after_state = _state(tiny_sd)
    assert after_state.keys() == before_state.keys()
    for name, (tensor, requires_grad) in before_state.items():
        assert torch.equal(after_state[name][0], tensor) and after_state[name][1] == requires_grad
    assert all(p.grad is None for p in tiny_sd.unet.parameters())
    assert not tiny_sd.unet._forward_pre_hooks and not tiny_sd.unet._forward_hooks


@pytest.mark.parametrize("params, message", [
    ({"interpolation": "vx"}, "interpolation must be vs"),
    ({"forget": "all"}, "forget must be one of none, encoderattn"),
    ({"gamma": -0.1}, "gamma, alpha and beta must be >= 0"),
    ({"batch_size": 0}, "batch_size >= 1"),
    ({"unet_learning_rate": -1.0}, "unet_learning_rate must be >= 0"),
])
def test_bad_parameters_are_refused_before_loading(params, message):
    with pytest.raises(ValueError, match=message):
        get_method("forgedit").resolve_params(params)


def test_the_card_is_the_official_codes():
    card = get_method("forgedit").card
    assert (card.strategy, card.subcategory, card.paper.arxiv_id) == (
        "test-time-finetuning", "hybrid-finetuning", "2309.10556")
    defaults = dict(card.defaults)
    # 400 samples in batches of 10, learning rates 1e-3 (text) and 6e-5 (UNet), no forgetting
    assert (defaults["finetune_steps"], defaults["batch_size"]) == (40, 10)
    assert (defaults["embedding_learning_rate"], defaults["unet_learning_rate"]) == (1e-3, 6e-5)
    assert (defaults["interpolation"], defaults["forget"]) == ("vs", "none")
