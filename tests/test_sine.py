"""SINE on the tiny model: its card's cost, its model-based guidance (by hand, and reducing to plain
text-to-image sampling where the formula says so), the fitted denoiser reused from the run's cache
and the shared pipeline left unchanged, also by an edit that fails half-way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest
from editeval.diffusion import finetuning
from editeval.diffusion.ddim import ddim_sample, ddim_scheduler
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.editing import edit
from editeval.methods.test_time_finetuning.sine import model_based_guidance

SOURCE, TARGET = "a red circle on grass", "a blue circle on grass"
# a fit that moves the tiny model (lr 1e-3, not the paper's 1e-6), few sampling steps
TINY = {"num_finetune_steps": 3, "learning_rate": 1e-3, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _request(image: Image.Image, **params) -> EditRequest:
    return EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, seed=3,
                       params={**TINY, **params})


def _state(pipe) -> dict:
    return {name: (tensor.detach().clone(), tensor.requires_grad)
            for module in (pipe.unet, pipe.vae, pipe.text_encoder)
            for name, tensor in module.named_parameters(prefix=type(module).__name__)}


def test_model_based_guidance_by_hand():
    u, c, f = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([5.0])
    # 1 + 2 * (0.25 * 5 + 0.75 * 3 - 1) = 6 (a wrong side for v, or guidance around the finetuned
    # prediction, gives another number)
    assert model_based_guidance(u, c, f, 2.0, 0.25).item() == pytest.approx(6.0)
    assert model_based_guidance(u, c, None, 2.0, 0.25).item() == pytest.approx(5.0)  # 1 + 2 * 2
    assert model_based_guidance(None, c, f, 2.0, 0.25).item() == pytest.approx(3.5)  # no CFG


@pytest.mark.parametrize("params, timesteps, nfe", [
    # 3 fit passes + 2 x 4 pretrained + the finetuned model at t >= 500 (751, 501): 13
    ({"model_guidance_t_min": 500, "guidance_scale": 10.0}, [751, 501, 251, 1], 3 + 8 + 2),
    # no classifier-free guidance: 1 pretrained pass a step; every step model-guided
    ({"num_finetune_steps": 2, "num_inference_steps": 5, "model_guidance_t_min": 0,
      "guidance_scale": 1.0}, [801, 601, 401, 201, 1], 2 + 5 + 5),
])
def test_sine_nfe_and_backward_passes_follow_its_card(tiny_sd, image, params, timesteps, nfe):
    request = _request(image, **params)
    assert ddim_scheduler(tiny_sd, request.params["num_inference_steps"]).timesteps.tolist() \
        == timesteps
    result = edit(request, "sine", pipe=tiny_sd)
    steps = request.params["num_finetune_steps"]
    assert (result.nfe, result.uncached_nfe, result.backward_passes) == (nfe, nfe, steps)
    assert result.intermediates["model_guided_steps"] == nfe - steps - (
        2 if params["guidance_scale"] != 1.0 else 1) * len(timesteps)


def test_without_the_finetuned_model_sine_is_plain_text_to_image_sampling(tiny_sd, image):
    # v = 0 (all weight on the pretrained model) and K above every timestep both reduce the
    # formula to classifier-free guidance on the target prompt, from the same noise; an edit that
    # starts from the noised source, or mixes the other way round, fails this
    scheduler = ddim_scheduler(tiny_sd, TINY["num_inference_steps"])
    null, target = encode_prompt(tiny_sd, ""), encode_prompt(tiny_sd, TARGET)
    for params in ({"model_guidance_weight": 0.0}, {"model_guidance_t_min": 1000}):
        result = edit(_request(image, **params), "sine", pipe=tiny_sd)
        noise = result.intermediates["initial_latents"]
        plain = decode_latents(tiny_sd, ddim_sample(tiny_sd.unet, noise, scheduler, target, null,
                                                    10.0))
        assert np.array_equal(np.asarray(result.image), np.asarray(plain))
    mixed = edit(_request(image, model_guidance_weight=1.0), "sine", pipe=tiny_sd)
    assert torch.equal(mixed.intermediates["initial_latents"], noise)  # same noise, same seed
    assert np.abs(np.asarray(mixed.image, float) - np.asarray(plain, float)).mean() > 1.0


def test_the_fitted_denoiser_and_embedding_guide_the_sampling(tiny_sd, image):
    # v = 1, w = 1, every step guided: the finetuned model alone under the finetuning (source)
    # prompt. Without finetuning steps it is the pretrained model sampling the source prompt; with
    # them it is not (an edit that guides with the pretrained weights, or drops the fitted
    # embedding, fails the second assertion)
    alone = {"model_guidance_weight": 1.0, "guidance_scale": 1.0, "model_guidance_t_min": 0}
    unfitted = edit(_request(image, num_finetune_steps=0, **alone), "sine", pipe=tiny_sd)
    scheduler = ddim_scheduler(tiny_sd, TINY["num_inference_steps"])
    noise = unfitted.intermediates["initial_latents"]
    plain = decode_latents(tiny_sd, ddim_sample(tiny_sd.unet, noise, scheduler,
                                                encode_prompt(tiny_sd, SOURCE)))
    assert np.array_equal(np.asarray(unfitted.image), np.asarray(plain))
    fitted = edit(_request(image, **alone), "sine", pipe=tiny_sd)
    assert np.abs(np.asarray(fitted.image, float) - np.asarray(plain, float)).mean() > 1.0


def test_another_guidance_setting_reuses_the_fitted_denoiser(tiny_sd, image):
    cache = InversionCache()
    first = edit(_request(image), "sine", pipe=tiny_sd, inversion_cache=cache)
    again = edit(_request(image, model_guidance_weight=0.3), "sine", pipe=tiny_sd,
                 inversion_cache=cache)
    alone = edit(_request(image, model_guidance_weight=0.3), "sine", pipe=tiny_sd)
    full = 3 + 2 * 4 + 2
    assert not first.intermediates["finetune_cached"] and again.intermediates["finetune_cached"]
    assert (again.nfe, again.uncached_nfe, again.backward_passes) == (full - 3, full, 0)
    # the cached fit and the generator restored after it: the same edit as without a cache
    assert np.array_equal(np.asarray(again.image), np.asarray(alone.image))
    assert not np.array_equal(np.asarray(again.image), np.asarray(first.image))
    refit = edit(_request(image, learning_rate=2e-3), "sine", pipe=tiny_sd, inversion_cache=cache)
    assert not refit.intermediates["finetune_cached"] and refit.backward_passes == 3


def test_the_shared_pipeline_is_unchanged_also_when_the_fit_fails(tiny_sd, image, monkeypatch):
    sdedit = EditRequest(image, target_prompt=TARGET, params={"num_inference_steps": 4})
    before_state = _state(tiny_sd)
    before = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    edit(_request(image), "sine", pipe=tiny_sd)
    after_sine = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)

    calls = []
    loss = finetuning.denoising_loss

    def failing(*args, **kwargs):  # fails half-way: on the second finetuning step
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return loss(*args, **kwargs)

    monkeypatch.setattr(finetuning, "denoising_loss", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        edit(_request(image), "sine", pipe=tiny_sd)
    after_failure = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    assert np.array_equal(before, after_sine) and np.array_equal(before, after_failure)
    after_state = _state(tiny_sd)
    assert after_state.keys() == before_state.keys()
    for name, (tensor, requires_grad) in before_state.items():
        assert torch.equal(after_state[name][0], tensor) and after_state[name][1] == requires_grad
    assert all(p.grad is None for p in tiny_sd.unet.parameters())
    assert not tiny_sd.unet._forward_pre_hooks and not tiny_sd.unet._forward_hooks


@pytest.mark.parametrize("params, message", [
    ({"model_guidance_weight": 1.5}, "model_guidance_weight .* must be in \\[0, 1\\], got 1.5"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"model_guidance_t_min": -1}, "model_guidance_t_min .* must be >= 0"),
])
def test_out_of_range_parameters_are_refused_before_the_model_loads(image, params, message):
    with pytest.raises(ValueError, match=message):
        edit(_request(image, **params), "sine", model="no-such-model")
