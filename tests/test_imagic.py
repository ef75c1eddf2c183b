"""Imagic on the tiny model: its card's cost, the fit cached across etas, eta's two ends, the shared
pipeline left unchanged (also by a fit that fails half-way); on the toy model: at eta 0 the
finetuned model gives the source back, where plain DDIM inversion does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.diffusion import finetuning
from editeval.diffusion.inversion import invert_source, reconstruct_source
from editeval.diffusion.inversion_cache import InversionCache
from editeval.editing import edit
from editeval.toyworld.models import WEIGHTS

TARGET = "a blue circle on grass"
TINY = {"embedding_steps": 2, "finetune_steps": 3, "num_inference_steps": 3,
        "embedding_learning_rate": 1e-2, "finetune_learning_rate": 1e-3}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth 64x64 RGB image (the tiny model's resolution)."""
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _request(image: Image.Image, **params) -> EditRequest:
    return EditRequest(image, target_prompt=TARGET, seed=3, params={**TINY, **params})


@pytest.mark.parametrize("params, nfe, backward", [
    ({}, 2 + 3 + 2 * 3, 2 + 3),
    ({"embedding_steps": 4, "finetune_steps": 1, "num_inference_steps": 2,
      "guidance_scale": 1.0}, 4 + 1 + 2, 4 + 1),
])
def test_imagic_nfe_and_backward_passes_follow_its_card(tiny_sd, image, params, nfe, backward):
    result = edit(_request(image, **params), "imagic", pipe=tiny_sd)
    assert (result.nfe, result.uncached_nfe, result.backward_passes) == (nfe, nfe, backward)
    assert not result.intermediates["fit_cached"]
    assert result.intermediates["embedding_shift"] > 0  # stage A moved the embedding


def test_a_second_eta_reuses_the_fit_and_equals_an_uncached_edit(tiny_sd, image):
    cache = InversionCache()
    first = edit(_request(image, eta=0.5), "imagic", pipe=tiny_sd, inversion_cache=cache)
    again = edit(_request(image, eta=0.9), "imagic", pipe=tiny_sd, inversion_cache=cache)
    alone = edit(_request(image, eta=0.9), "imagic", pipe=tiny_sd)
    assert not first.intermediates["fit_cached"] and again.intermediates["fit_cached"]
    # the fit's 2 + 3 steps are skipped: only the guided sampling runs, no backward pass
    assert (again.nfe, again.uncached_nfe, again.backward_passes) == (2 * 3, 2 + 3 + 2 * 3, 0)
    # same seed: the cached weights, embedding and the generator after the fit give the same edit
    # (a key holding eta, or a hit that skips the fit's draws from the generator, fails this)
    assert np.array_equal(np.asarray(again.model_image), np.asarray(alone.model_image))
    assert not np.array_equal(np.asarray(first.model_image), np.asarray(alone.model_image))
    # a setting of the fit is in the key: another finetuning length fits again
    other = edit(_request(image, eta=0.9, finetune_steps=2), "imagic", pipe=tiny_sd,
                 inversion_cache=cache)
    assert not other.intermediates["fit_cached"] and other.backward_passes == 2 + 2


def test_eta_one_is_the_target_embedding_and_eta_zero_the_optimised_one(tiny_sd, image):
    # Without finetuning, the edit at eta 1 does not depend on the embedding's optimisation
    # (learning rate 1e-2 or 0: the generator draws the same timesteps and noises), at eta 0 it
    # does. Interpolating the wrong way round (eta * e_opt + (1 - eta) * e_tgt) fails this.
    def edited(eta: float, rate: float) -> np.ndarray:
        return np.asarray(edit(_request(image, eta=eta, finetune_steps=0,
                                        embedding_learning_rate=rate), "imagic",
                               pipe=tiny_sd).model_image)

    assert np.array_equal(edited(1.0, 1e-2), edited(1.0, 0.0))
    assert not np.array_equal(edited(0.0, 1e-2), edited(0.0, 0.0))


@pytest.mark.parametrize("params, message", [
    ({"eta": -0.1}, "eta must be >= 0"),
    ({"finetune_steps": -1}, "embedding_steps and finetune_steps must be >= 0"),
    ({"embedding_learning_rate": -1e-3}, "learning_rate must be >= 0"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
])
def test_imagic_refuses_bad_parameters_before_loading(params, message):
    with pytest.raises(ValueError, match=message):
        get_method("imagic").resolve_params(params)


def test_imagic_card_has_the_papers_stable_diffusion_settings():
    card = get_method("imagic").card
    assert (card.strategy, card.subcategory) == ("test-time-finetuning", "hybrid-finetuning")
    assert card.paper.arxiv_id == "2210.09276" and card.inputs == ("target_prompt",)
    # section 3.3: embedding 1000 Adam steps at 2e-3, model 1500 steps at 5e-7; eta in [0.6, 0.8]
    assert dict(card.defaults) == {"eta": 0.7, "embedding_steps": 1000,
                                   "embedding_learning_rate": 2e-3, "finetune_steps": 1500,
                                   "finetune_learning_rate": 5e-7, "num_inference_steps": 50,
                                   "guidance_scale": 7.5}


def _state(pipe) -> dict:
    return {name: (tensor.detach().clone(), tensor.requires_grad)
            for module in (pipe.unet, pipe.vae, pipe.text_encoder)
            for name, tensor in module.named_parameters(prefix=type(module).__name__)}


def test_the_shared_pipeline_is_unchanged_also_when_the_fit_fails(tiny_sd, image, monkeypatch):
    # fitting pipe.unet instead of the trainable copy (or loading the fit into it) fails this
    sdedit = EditRequest(image, target_prompt=TARGET, params={"num_inference_steps": 4})
    before_state = _state(tiny_sd)
    before = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    edit(_request(image), "imagic", pipe=tiny_sd)
    after_edit = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)

    calls = []
    loss = finetuning.denoising_loss

    def failing(*args, **kwargs):  # the 4th loss: the second step of the finetuning (stage B)
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return loss(*args, **kwargs)

    monkeypatch.setattr(finetuning, "denoising_loss", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        edit(_request(image), "imagic", pipe=tiny_sd)
    after_failure = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    assert np.array_equal(before, after_edit) and np.array_equal(before, after_failure)
    after_state = _state(tiny_sd)
    assert after_state.keys() == before_state.keys()
    for name, (tensor, requires_grad) in before_state.items():
        assert torch.equal(after_state[name][0], tensor) and after_state[name][1] == requires_grad
    assert all(p.grad is None for p in tiny_sd.unet.parameters())
    assert not tiny_sd.unet._forward_pre_hooks and not tiny_sd.unet._forward_hooks


def _psnr(image: Image.Image, reference: np.ndarray) -> float:
    error = np.mean((np.asarray(image, dtype=np.float64) - reference) ** 2)
    return float(10 * np.log10(255.0 ** 2 / error))


@pytest.mark.skipif(not (WEIGHTS / "sd" / "model_index.json").exists(),
                    reason=f"toy weights not exported to {WEIGHTS}")
def test_imagic_at_eta_zero_gives_the_source_back_better_than_ddim_inversion():
    # The finetuned model regenerates the source from random noise at e_opt under guidance 7.5,
    # where DDIM inversion under the same prompt, sampled back at 7.5, drifts. A short fit (10 +
    # 100 steps at a learning rate 60 x the paper's, 10 sampling steps) for the test's time;
    # measured on object_replacement/1, seed 0: Imagic 22.39 dB, DDIM 18.52 dB, Imagic without
    # stage B 17.28 dB (at the paper's 1000 + 1500 steps and 50 sampling steps: 28.88 dB, as
    # DDIM inversion under the source caption, 29.02 dB). Skipping the finetuning, fitting the
    # pipeline's UNet instead of the copy that samples, or sampling with the pretrained UNet
    # fails this.
    from editeval.data import load_dataset
    from editeval.models import load_pipeline

    pipe = load_pipeline("toy")
    sample = load_dataset("editeval-toy").select(tasks=["object_replacement"], limit=1)[0]
    image = Image.open(sample.image_path).convert("RGB")
    source = np.asarray(image, dtype=np.float64)
    fit = {"eta": 0.0, "embedding_steps": 10, "finetune_steps": 100,
           "finetune_learning_rate": 3e-5, "num_inference_steps": 10}

    def imagic_psnr(**params) -> float:
        request = EditRequest(image, target_prompt=sample.target_prompt, seed=0,
                              params={**fit, **params})
        return _psnr(edit(request, "imagic", pipe=pipe).model_image, source)

    inverted = invert_source(pipe, image, sample.target_prompt, "ddim", num_inference_steps=10,
                             guidance_scale=7.5)
    ddim = _psnr(reconstruct_source(pipe, inverted), source)
    imagic = imagic_psnr()
    assert imagic >= ddim + 2.0
    assert imagic >= imagic_psnr(finetune_steps=0) + 2.0
