"""DiffusionDisentanglement on the tiny model: its card's cost, zero mixing weights giving the
neutral generation, the fit cached, the shared pipeline unchanged (also when the fit fails), and
the image losses it optimises."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.diffusion.inversion_cache import InversionCache
from editeval.editing import edit
from editeval.methods.test_time_finetuning import diffusion_disentanglement as module
from editeval.models.image_losses import (
    load_clip_guide,
    load_vgg_perceptual,
    offline_suite,
)

METHOD = "diffusion-disentanglement"
SOURCE, TARGET = "a red circle on grass", "a blue square on sand"
TINY = {"num_inference_steps": 2, "free_steps": 1, "lambda_t_star": 1}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth 64x64 RGB image (the tiny model's resolution)."""
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _request(image: Image.Image, params: dict) -> EditRequest:
    return EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params=params)


@pytest.mark.parametrize("params, per_pass", [
    ({**TINY, "optimisation_steps": 2}, 2 * 2),  # guidance 7.5: a batch of 2 a step
    ({"num_inference_steps": 3, "free_steps": 2, "lambda_t_star": 0, "optimisation_steps": 1,
      "guidance_scale": 1.0, "perceptual_weight": 0.0}, 3),
])
def test_nfe_and_backward_passes_follow_the_card(tiny_sd, image, params, per_pass):
    result = edit(_request(image, params), METHOD, pipe=tiny_sd)
    steps, fits = params["num_inference_steps"], params["optimisation_steps"]
    # inversion + neutral generation + one chain per optimisation step + the edit
    assert result.nfe == result.uncached_nfe == per_pass * (fits + 3)
    assert result.backward_passes == steps * fits  # one per denoiser call of each chain
    assert len(result.intermediates["mixing_weights"]) == steps
    assert len(result.intermediates["losses"]) == fits


def test_zero_mixing_weights_reproduce_the_neutral_generation(tiny_sd, image):
    # lambda_i weights the target (attribute) embedding: at 0 the edit is the neutral generation,
    # bit for bit (an implementation mixing the other way round samples the target prompt here)
    zero = edit(_request(image, {**TINY, "optimisation_steps": 0, "lambda_late": 0.0}), METHOD,
                pipe=tiny_sd)
    assert zero.intermediates["mixing_weights"] == [0.0, 0.0]
    neutral = np.asarray(zero.intermediates["neutral_generation"])
    assert np.array_equal(np.asarray(zero.model_image), neutral)
    # the tiny model tells the prompts apart: weights of 1 give another image
    attribute = edit(_request(image, {**TINY, "optimisation_steps": 0, "lambda_early": 1.0}),
                     METHOD, pipe=tiny_sd)
    assert np.array_equal(np.asarray(attribute.intermediates["neutral_generation"]), neutral)
    difference = np.abs(np.asarray(attribute.model_image).astype(int) - neutral).mean()
    assert difference > 5


def test_a_second_edit_reuses_the_cached_fit(tiny_sd, image):
    params = {**TINY, "optimisation_steps": 2, "perceptual_weight": 0.0}
    cache = InversionCache()
    first = edit(_request(image, params), METHOD, pipe=tiny_sd, inversion_cache=cache)
    # gradient checkpointing recomputes blocks, not the result: the same cache key
    again = edit(_request(image, {**params, "gradient_checkpointing": True}), METHOD,
                 pipe=tiny_sd, inversion_cache=cache)
    assert not first.intermediates["fit_cached"]
    assert (first.nfe, first.backward_passes) == (2 * 2 * (2 + 3), 4)
    assert again.intermediates["fit_cached"] and again.intermediates["inversion_cached"]
    assert (again.nfe, again.uncached_nfe, again.backward_passes) == (2 * 2, first.nfe, 0)
    assert again.intermediates["mixing_weights"] == first.intermediates["mixing_weights"]
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
    assert first.intermediates["mixing_weights"] != [0.0, 1.0]  # the fit moved the weights


def test_gradient_checkpointing_gives_the_same_fit(tiny_sd, image):
    params = {**TINY, "optimisation_steps": 2, "perceptual_weight": 0.0}
    plain = edit(_request(image, params), METHOD, pipe=tiny_sd)
    saving = edit(_request(image, {**params, "gradient_checkpointing": True}), METHOD,
                  pipe=tiny_sd)
    assert (saving.nfe, saving.backward_passes) == (plain.nfe, plain.backward_passes)
    assert saving.intermediates["mixing_weights"] == pytest.approx(
        plain.intermediates["mixing_weights"], abs=1e-5)
    assert not tiny_sd.unet.is_gradient_checkpointing  # only the copy had it


def _state(pipe) -> dict:
    return {name: tensor.detach().clone()
            for part in (pipe.unet, pipe.vae, pipe.text_encoder)
            for name, tensor in part.state_dict(prefix=type(part).__name__).items()}


def test_the_shared_pipeline_is_unchanged_also_when_the_fit_fails(tiny_sd, image, monkeypatch):
    sdedit = EditRequest(image, target_prompt=TARGET, params={"num_inference_steps": 4})
    before_state = _state(tiny_sd)
    before = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    edit(_request(image, {**TINY, "optimisation_steps": 1, "perceptual_weight": 0.0}), METHOD,
         pipe=tiny_sd)
    after_edit = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)

    sample, calls = module.MixingChain.sample, []

    def failing(self, *args, **kwargs):  # fails half-way: in the second optimisation step
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(module.MixingChain, "sample", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        edit(_request(image, {**TINY, "optimisation_steps": 3, "perceptual_weight": 0.0}),
             METHOD, pipe=tiny_sd)
    assert len(calls) == 2
    after_failure = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    assert np.array_equal(before, after_edit) and np.array_equal(before, after_failure)
    after_state = _state(tiny_sd)
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[name], tensor) for name, tensor in before_state.items())
    assert all(p.grad is None for p in tiny_sd.unet.parameters())
    assert not tiny_sd.unet._forward_pre_hooks and not tiny_sd.unet._forward_hooks


@pytest.mark.parametrize("params, message", [
    ({"lambda_t_star": 51}, r"lambda_t_star must be in \[0, num_inference_steps = 50\]"),
    ({"num_inference_steps": 20, "free_steps": 21},
     r"free_steps must be in \[0, num_inference_steps = 20\]"),
    ({"optimisation_steps": -1}, "optimisation_steps must be >= 0"),
    ({"perceptual_net": "alex"}, "perceptual_net must be one of auto, vgg16, vgg16-random"),
])
def test_bad_parameters_are_refused_before_loading(params, message):
    with pytest.raises(ValueError, match=message):
        get_method(METHOD).resolve_params(params)


def test_the_card_is_the_papers():
    card = get_method(METHOD).card
    assert (card.strategy, card.subcategory) == ("test-time-finetuning", "embeddings-finetuning")
    assert card.paper.arxiv_id == "2212.08698"
    defaults = dict(card.defaults)
    assert (defaults["optimisation_steps"], defaults["learning_rate"],
            defaults["perceptual_weight"], defaults["num_inference_steps"]) == (10, 0.05, 0.05, 50)
    assert (defaults["lambda_t_star"], defaults["lambda_early"], defaults["lambda_late"],
            defaults["free_steps"]) == (20, 0.0, 1.0, 17)


def test_offline_suites_are_recognised(tiny_sd):
    assert offline_suite(tiny_sd) == "tiny"
    assert offline_suite(SimpleNamespace(name_or_path="openai/clip-vit-base-patch32")) is None


def test_the_directional_loss_by_hand():
    clip = load_clip_guide("toy")
    texts = clip.text_features([SOURCE, TARGET])
    source = torch.zeros(1, 3, 64, 64)
    edited = torch.ones(1, 3, 64, 64).requires_grad_(True)
    loss = clip.directional_loss(source, edited, texts[:1], texts[1:])
    with torch.no_grad():
        change = clip.image_features(edited) - clip.image_features(source)
    direction = texts[1:] - texts[:1]
    expected = 1 - float((change * direction).sum() / (change.norm() * direction.norm()))
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    (grad,) = torch.autograd.grad(loss, [edited])
    assert float(grad.abs().sum()) > 0  # gradients reach the image
    # no change of the image: cosine 0, loss 1
    assert float(clip.directional_loss(source, source, texts[:1], texts[1:])) == 1.0


def test_the_perceptual_stand_in_is_fixed_and_zero_on_equal_images():
    vgg = load_vgg_perceptual("vgg16-random")
    again = load_vgg_perceptual.__wrapped__("vgg16-random")
    assert all(torch.equal(a, b) for a, b in zip(vgg.state_dict().values(),
                                                 again.state_dict().values()))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert float(vgg(images, images)) == 0.0
    assert float(vgg(images, images.flip(-1))) > 0
