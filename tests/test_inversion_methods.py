"""EDICT, AIDI and edit-friendly DDPM inversion on the tiny model: each method's defining property,
NFE against its card's formula, and reuse of its inversion through the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.editing import edit
from editeval.diffusion.ddim import ddim_invert, ddim_sample, ddim_scheduler, reconstruct
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import encode_image, encode_prompt
from editeval.methods.training_free.aidi import (
    aidi_invert,
    aidi_reconstruct,
    anderson_fixed_point,
    blended_guidance_sample,
)
from editeval.methods.training_free.ddpm_inversion import ddpm_invert, ddpm_sample
from editeval.methods.training_free.edict import edict_denoise, edict_invert, edict_reconstruct

SOURCE, TARGET = "a red circle on grass", "a blue circle on grass"


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth 64x64 RGB image (the tiny model's resolution)."""
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _relative_error(restored: torch.Tensor, latents: torch.Tensor) -> float:
    return float((restored.double() - latents.double()).norm() / latents.double().norm())


def _edit_twice(pipe, image, method: str, params: dict):
    """Two edits of one request sharing an inversion cache."""
    cache = InversionCache()
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params=params)
    return (edit(request, method, pipe=pipe, inversion_cache=cache),
            edit(request, method, pipe=pipe, inversion_cache=cache))


# --- EDICT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_edict_inverts_exactly_where_ddim_does_not(tiny_sd, image, guidance_scale):
    edict_error = edict_reconstruct(tiny_sd, image, SOURCE, 10, guidance_scale).latent_error
    ddim_error = reconstruct(tiny_sd, image, SOURCE, 10, guidance_scale).latent_error
    # measured: EDICT 6e-16 / 7e-16 (float64 rounding), DDIM 0.29 / 0.30 at 10 steps
    assert edict_error < 1e-12
    assert ddim_error > 0.2


def test_edict_partial_inversion_is_exact_and_moves_the_latents(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 10)
    latents = encode_image(tiny_sd, image)
    cond, uncond = encode_prompt(tiny_sd, SOURCE), encode_prompt(tiny_sd, "")
    pair = edict_invert(tiny_sd.unet, latents, scheduler, cond, uncond, 3.0, num_steps=8)
    restored = edict_denoise(tiny_sd.unet, pair, scheduler, cond, uncond, 3.0, num_steps=8)
    assert pair[0].dtype == torch.float64
    assert _relative_error(pair[0], latents) > 0.5  # 8 of 10 steps reach far into the noise
    assert max(_relative_error(r, latents) for r in restored) < 1e-12  # both latents come back


def test_edict_nfe_follows_its_formula_and_the_cache_halves_it(tiny_sd, image):
    # 8 * floor(10 * 0.8) = 64, of which the inversion is 32
    first, second = _edit_twice(tiny_sd, image, "edict", {"num_inference_steps": 10})
    assert (first.nfe, second.nfe) == (64, 32)
    assert first.intermediates["inversion_cached"] is False
    assert second.intermediates["inversion_cached"] is True
    assert np.array_equal(np.asarray(first.model_image), np.asarray(second.model_image))
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params={
        "num_inference_steps": 7, "init_image_strength": 0.5, "guidance_scale": 1.0})
    assert edit(request, "edict", pipe=tiny_sd).nfe == 4 * 3


# --- AIDI ----------------------------------------------------------------------------------------

def test_anderson_acceleration_solves_a_linear_fixed_point_in_few_evaluations():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([0.9, -0.8, 0.5], dtype=torch.float64)) @ q.T
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    solution = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - a, b)
    start = torch.zeros(3, dtype=torch.float64)
    accelerated = anderson_fixed_point(lambda z: a @ z + b, start, iterations=5, memory=3)
    plain = anderson_fixed_point(lambda z: a @ z + b, start, iterations=5, memory=0)
    # on a linear map in 3 dimensions, Anderson with memory 3 is exact after 4 evaluations
    assert float((accelerated - solution).norm()) < 1e-8
    assert float((plain - solution).norm()) > 0.3 * float(solution.norm())


def test_aidi_with_one_iteration_is_plain_ddim_inversion(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 10)
    latents, cond = encode_image(tiny_sd, image), encode_prompt(tiny_sd, SOURCE)
    aidi = aidi_invert(tiny_sd.unet, latents, scheduler, cond, num_fixed_point_iterations=1)
    ddim = ddim_invert(tiny_sd.unet, latents, scheduler, cond)
    assert all(torch.equal(a, d) for a, d in zip(aidi, ddim)) and len(aidi) == 11


def test_aidi_reconstructs_better_than_ddim_at_the_same_steps(tiny_sd, image):
    for steps in (10, 20):
        aidi_error = aidi_reconstruct(tiny_sd, image, SOURCE, steps).latent_error
        ddim_error = reconstruct(tiny_sd, image, SOURCE, steps).latent_error
        # measured: AIDI 4.7e-4 / 4.0e-5, DDIM 0.29 / 0.16 (10 / 20 steps, 5 evaluations, window 3)
        assert aidi_error < 2e-3 and ddim_error > 0.1
        assert aidi_error < ddim_error / 100


def test_blended_guidance_without_edited_words_is_plain_ddim_sampling(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 6)
    cond, uncond = encode_prompt(tiny_sd, SOURCE), encode_prompt(tiny_sd, "")
    noise = aidi_invert(tiny_sd.unet, encode_image(tiny_sd, image), scheduler, cond)[-1]
    blended, mask = blended_guidance_sample(tiny_sd.unet, noise, scheduler, uncond, cond, cond,
                                            ((), ()), 7.5, 0.3)
    plain = ddim_sample(tiny_sd.unet, noise, scheduler, cond)
    assert float(mask.sum()) == 0.0
    assert torch.allclose(blended, plain, atol=1e-5)


def test_aidi_nfe_follows_its_formula_and_the_cache_removes_the_inversion(tiny_sd, image):
    # 6 steps x 5 evaluations + 3 x 6 (uncond, source, target) = 48; the inversion is 30
    first, second = _edit_twice(tiny_sd, image, "aidi", {"num_inference_steps": 6})
    assert (first.nfe, second.nfe) == (48, 18)
    assert first.intermediates["inversion_cached"] is False
    assert second.intermediates["inversion_cached"] is True
    mask = first.intermediates["edit_region"]
    assert mask.shape == (8, 8) and float(mask.sum()) > 0  # "red" -> "blue" marks a region
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params={
        "num_inference_steps": 4, "num_fixed_point_iterations": 2, "guidance_scale": 1.0})
    assert edit(request, "aidi", pipe=tiny_sd).nfe == 4 * 2 + 2 * 4


# --- edit-friendly DDPM inversion ----------------------------------------------------------------

def test_ddpm_noise_maps_regenerate_the_source_exactly(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 20)
    latents = encode_image(tiny_sd, image)
    cond, uncond = encode_prompt(tiny_sd, SOURCE), encode_prompt(tiny_sd, "")
    noisy, noise_maps = ddpm_invert(tiny_sd.unet, latents, scheduler, cond, uncond, 3.5,
                                    generator=torch.Generator().manual_seed(0))
    assert len(noisy) == 21 and len(noise_maps) == 20
    restored = ddpm_sample(tiny_sd.unet, noisy[0], noise_maps, scheduler, cond, uncond, 3.5)
    assert torch.equal(restored, noisy[-1])  # bit for bit the stored clean level ...
    assert _relative_error(restored, latents) < 1e-6  # ... = the source to rounding (3e-8)
    # the noisy latents are drawn independently: a second seed gives other maps
    _, other = ddpm_invert(tiny_sd.unet, latents, scheduler, cond, uncond, 3.5,
                           generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other[0], noise_maps[0])


def test_ddpm_inversion_nfe_follows_its_formula_and_the_cache_keys_the_seed(tiny_sd, image):
    # 2 * 12 (inversion) + 2 * (12 - 4) (edit) = 40
    params = {"num_inference_steps": 12, "skip": 4}
    first, second = _edit_twice(tiny_sd, image, "ddpm-inversion", params)
    assert (first.nfe, second.nfe) == (40, 16)
    assert second.intermediates["inversion_cached"] is True
    assert np.array_equal(np.asarray(first.model_image), np.asarray(second.model_image))
    cache = InversionCache()
    for seed, cached in ((0, False), (1, False), (0, True)):
        request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, seed=seed,
                              params=params)
        result = edit(request, "ddpm-inversion", pipe=tiny_sd, inversion_cache=cache)
        assert result.intermediates["inversion_cached"] is cached
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params={
        "num_inference_steps": 10, "skip": 0, "source_guidance_scale": 1.0})
    assert edit(request, "ddpm-inversion", pipe=tiny_sd).nfe == 10 + 2 * 10


# --- cards and inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["edict", "aidi", "ddpm-inversion"])
def test_cards_place_the_papers_in_the_survey(method):
    card = get_method(method).card
    assert (card.strategy, card.subcategory) == ("training-free", "inversion-sampling-modification")
    assert card.inputs == ("source_prompt", "target_prompt")


@pytest.mark.parametrize("method", ["edict", "aidi", "ddpm-inversion"])
def test_instruction_models_are_refused_with_the_fix(tiny_ip2p, image, method):
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET)
    with pytest.raises(ValueError, match="needs a text-to-image model \\(4-channel denoiser\\), got "
                                         "a 8-channel one: use a suite name"):
        edit(request, method, pipe=tiny_ip2p)


@pytest.mark.parametrize("method, params, message", [
    ("edict", {"mix_weight": 0.0}, "mix_weight must be in \\(0, 1\\]"),
    ("edict", {"num_inference_steps": 2, "init_image_strength": 0.4}, "leaves no step"),
    ("aidi", {"num_fixed_point_iterations": 0}, "num_fixed_point_iterations must be >= 1"),
    ("ddpm-inversion", {"num_inference_steps": 10, "skip": 10}, "skip must be in \\[0, 10\\)"),
])
def test_bad_parameters_are_refused(tiny_sd, image, method, params, message):
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params=params)
    with pytest.raises(ValueError, match=message):
        edit(request, method, pipe=tiny_sd)


# --- what the cards say against what the code (and the official code) does ---------------------

def test_ddpm_inversion_lists_no_posterior_mean_deviation():
    # the official main_run.py encodes with latent_dist.mode(), the posterior mean, as we do
    card = get_method("ddpm-inversion").card
    assert "posterior" not in card.deviations
    assert "keeps the last step's noise map" in card.deviations


@pytest.mark.parametrize("guidance_scale, image_guidance_scale, per_step", [
    (7.5, 1.5, 3), (7.5, 1.0, 3), (1.0, 1.5, 1), (7.5, 0.5, 1), (0.5, 0.5, 1)])
def test_instructpix2pix_nfe_follows_its_formula(tiny_ip2p, image, guidance_scale,
                                                 image_guidance_scale, per_step):
    # diffusers guides (a batch of 3) only when guidance_scale > 1 and image_guidance_scale >= 1
    request = EditRequest(image, instruction="make it blue", params={
        "num_inference_steps": 3, "guidance_scale": guidance_scale,
        "image_guidance_scale": image_guidance_scale})
    assert edit(request, "instructpix2pix", pipe=tiny_ip2p).nfe == per_step * 3
    card = get_method("instructpix2pix").card
    assert card.nfe_formula.startswith("3 * num_inference_steps when guidance_scale > 1 and "
                                       "image_guidance_scale >= 1, else num_inference_steps")


def test_direct_inversion_nfe_and_the_saving_over_the_official_code(tiny_sd, image):
    # ours: steps (DDIM inversion) + 4 * steps (the edit); the official code adds a pass over the
    # trajectory with both prompts under guidance (a batch of 4: 4 * steps) before the edit
    first, second = _edit_twice(tiny_sd, image, "direct-inversion", {"num_inference_steps": 4})
    assert (first.nfe, second.nfe) == (4 + 4 * 4, 4 * 4)
    card = get_method("direct-inversion").card
    assert card.nfe_formula == "num_inference_steps (DDIM inversion; 0 when cached) + " \
                               "4 * num_inference_steps"
    assert "4 * num_inference_steps fewer NFE" in card.deviations
