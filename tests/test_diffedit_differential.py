"""DiffEdit and Differential Diffusion on the tiny model: each method's defining property, NFE
against its card at two settings, the UNet left as it was found, and how masks reach them (soft
masks only to a method that reads them; the bad masks the input policy refuses)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.data.images import MaskError
from editeval.diffusion.ddim import ddim_scheduler, model_noise, noise_level_terms, noise_levels
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.editing import (
    EditInputError,
    EditInputWarning,
    check_request,
    edit,
    prepare_inputs,
)
from editeval.methods.training_free.diffedit import noise_difference_map, rescale_map
from editeval.methods.training_free.differential_diffusion import differential_sample
from editeval.run.intermediates import store_intermediates

# the prompts and the smooth 64x64 source (a pytest fixture) of the inversion tests, and the UNet
# state that every method must leave as it found it
from test_cycle_p2pzero_ebca import _unet_state
from test_inversion_methods import SOURCE, TARGET, image  # noqa: F401

FAST_DIFFEDIT = {"num_inference_steps": 5, "num_masks": 2}


def _columns(values: list[int], size: int = 64) -> Image.Image:
    """A mode "L" mask of vertical bands, one grey level per band, left to right."""
    band = np.repeat(np.array(values, dtype=np.uint8), size // len(values))
    return Image.fromarray(np.tile(band, (size, 1)), "L")


# --- DiffEdit ------------------------------------------------------------------------------------

def test_diffedit_mask_is_empty_for_identical_prompts_and_the_edit_is_the_source(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 10)
    latents = encode_image(tiny_sd, image)
    text = encode_prompt(tiny_sd, SOURCE)
    noise = torch.randn((10, *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[5]
    same = noise_difference_map(tiny_sd.unet, scheduler, latents, text, text, noise, t)
    # one noisy latent seen under both prompts: the estimates agree to the bit, the map is zero,
    # and the mask is empty at the default threshold and even at threshold 0
    assert float(same.abs().max()) == 0.0
    assert float(rescale_map(same, 3.0).max()) == 0.0  # nothing exceeds 0.5, nor even 0
    # a wrong implementation that draws separate noise for the two prompts maps the draws'
    # disagreement: nonzero in every cell, so at threshold 0 its mask is the whole image (at 0.5
    # the relative threshold may hide it: the average over 10 draws is nearly flat, measured 0 to
    # 3 % of the cells above 1.5 x its mean)
    a, s = noise_level_terms(scheduler.alphas_cumprod[int(t)], latents)
    other = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps = [model_noise(tiny_sd.unet, scheduler, a * latents + s * n, t,
                           text.expand(10, -1, -1)) for n in (noise, other)]
    wrong = (eps[1] - eps[0]).abs().mean(dim=(0, 1))
    assert float(rescale_map(wrong, 3.0).min()) > 0.0

    with pytest.warns(EditInputWarning, match="nothing to edit"):
        result = edit(EditRequest(image, source_prompt=SOURCE, target_prompt=SOURCE,
                                  params=FAST_DIFFEDIT), "diffedit", pipe=tiny_sd)
    assert result.intermediates["edit_fraction"] == 0.0
    # an empty mask keeps the encoding's latent of every level, the last being the source's own
    # latents: the edit is the VAE's round trip bit for bit (a decoding that puts back the latent
    # one level noisier, as diffusers' pipeline does, ends one DDIM level away from it)
    round_trip = decode_latents(tiny_sd, encode_image(tiny_sd, image))
    assert np.array_equal(np.asarray(result.model_image), np.asarray(round_trip))


def test_diffedit_nfe_follows_its_card_and_the_cache_keeps_the_encoding(tiny_sd, image, tmp_path):
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params=FAST_DIFFEDIT)
    cache = InversionCache()
    first = edit(request, "diffedit", pipe=tiny_sd, inversion_cache=cache)
    second = edit(request, "diffedit", pipe=tiny_sd, inversion_cache=cache)
    # 2 * 2 (mask) + floor(5 * 0.8) = 4 (encoding) + 2 * 4 (guided decoding) = 16
    assert (first.nfe, second.nfe, second.uncached_nfe) == (16, 12, 16)
    assert second.intermediates["inversion_cached"] is True
    assert np.array_equal(np.asarray(first.model_image), np.asarray(second.model_image))
    # 2 * 3 + floor(7 * 0.5) = 3 + 3 (decoding at guidance 1) = 12
    other = edit(EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params={
        "num_inference_steps": 7, "encode_ratio": 0.5, "num_masks": 3, "guidance_scale": 1.0}),
        "diffedit", pipe=tiny_sd)
    assert other.nfe == 12
    # the inferred mask is stored as a 2-D map at latent size, which the report shows
    region = first.intermediates["edit_region"]
    assert region.shape == (8, 8) and set(region.unique().tolist()) <= {0.0, 1.0}
    stored = store_intermediates(first.intermediates, tmp_path, tmp_path.relative_to(tmp_path))
    assert stored["edit_region"]["type"] == "tensor" and stored["edit_region"]["shape"] == [8, 8]


def test_diffedit_ignores_a_given_mask(tiny_sd, image):
    with pytest.warns(EditInputWarning, match="diffedit does not use the mask"):
        result = edit(EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET,
                                  mask=_columns([0, 255]), params=FAST_DIFFEDIT), "diffedit",
                      pipe=tiny_sd)
    assert "edit_region" in result.intermediates


@pytest.mark.parametrize("params, message", [
    ({"num_inference_steps": 10, "encode_ratio": 0.05}, "encode_ratio must be in \\(0, 1\\]"),
    ({"mask_encode_strength": 1.5}, "mask_encode_strength must be in \\(0, 1\\]"),
    ({"num_masks": 0}, "num_masks must be >= 1"),
    ({"mask_threshold": 1.0}, "mask_threshold must be in \\[0, 1\\)"),
])
def test_diffedit_refuses_parameters_out_of_range(params, message):
    with pytest.raises(ValueError, match=message):
        get_method("diffedit").resolve_params(params)


# --- Differential Diffusion ----------------------------------------------------------------------

def test_each_pixel_is_held_to_the_noised_source_until_its_strength_is_reached(tiny_sd, image):
    steps = 8
    scheduler = ddim_scheduler(tiny_sd, steps)
    latents = encode_image(tiny_sd, image)
    # latent columns of strength 0, 0.25, 0.5 and 1 (two columns each)
    strength = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat_interleave(2).expand(1, 1, 8, 8)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0][:1]))
    try:
        differential_sample(tiny_sd.unet, scheduler, latents, strength, noise,
                            encode_prompt(tiny_sd, TARGET), encode_prompt(tiny_sd, ""), 3.0)
    finally:
        handle.remove()
    _, alphas = noise_levels(scheduler)
    held_steps = []
    for i, z in enumerate(seen):
        a, s = noise_level_terms(alphas[steps - i], latents)
        source = (z - (a * latents + s * noise)).abs().amax(dim=(0, 1, 2)) == 0  # per column
        held_steps.append(source[::2].tolist())
    # a pixel of strength s is reset to the noised source (one draw for all steps) before step i
    # while 1 - s > i / N: s = 0 always, 0.25 for 6 of 8 steps, 0.5 for 4, 1 only at the start.
    # The official map (white = keep) taken as editeval's strength would invert these rows;
    # a fresh draw per step would hold no pixel after the start.
    held = np.array(held_steps)
    assert held.sum(axis=0).tolist() == [8, 6, 4, 1]
    assert held[0].all() and held[1:, 3].sum() == 0


def test_differential_diffusion_nfe_follows_its_card(tiny_sd, image):
    mask = _columns([0, 128, 255, 0])
    for params, nfe in (({"num_inference_steps": 3}, 6),
                        ({"num_inference_steps": 5, "guidance_scale": 1.0}, 5)):
        result = edit(EditRequest(image, target_prompt=TARGET, mask=mask, params=params),
                      "differential-diffusion", pipe=tiny_sd)
        assert result.nfe == nfe
    strength = result.intermediates["strength"]
    assert strength.shape == (8, 8) and float(strength.max()) == pytest.approx(1.0)


# --- masks: soft ones reach only a method that reads them; bad ones -----------------------------

def test_a_soft_mask_reaches_differential_diffusion_and_is_binarised_for_others(tiny_sd, image):
    # a half-resolution grey-level mask, saved as a JPEG (compression noise included)
    buffer = io.BytesIO()
    _columns([0, 64, 128, 255], size=32).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    red = Image.new("RGB", (64, 64), (255, 0, 0))  # luminance 76 (ITU-R 601)
    red.paste((0, 0, 0), (0, 0, 32, 64))
    cases = {"differential-diffusion": {"target_prompt": TARGET},
             "masactrl": {"target_prompt": TARGET}}
    for method, prompts in cases.items():
        card = get_method(method).card
        checked = check_request(EditRequest(image, mask=jpeg, **prompts), card)
        inputs, _, _ = prepare_inputs(checked, card, EditRequest(image, mask=jpeg, **prompts),
                                      tiny_sd)
        values = np.asarray(inputs.mask)
        assert inputs.mask.size == (64, 64)
        red_request = EditRequest(image, mask=red, **prompts)
        if card.soft_mask:
            # grey levels kept through the JPEG and the bilinear resize (band centres)
            assert abs(float(values[:, 22:26].mean()) - 64) < 6
            assert abs(float(values[:, 38:42].mean()) - 128) < 6
            rgb = np.asarray(check_request(red_request, card).mask)
            assert set(np.unique(rgb).tolist()) == {0, 76}
        else:
            assert set(np.unique(values).tolist()) == {0, 255}
            with pytest.raises(MaskError, match="all black"):  # 76 < 128: nothing to edit
                check_request(red_request, card)


def test_differential_diffusion_mask_policy(tiny_sd, image, tmp_path):
    white, black = tmp_path / "white.png", tmp_path / "black.png"
    Image.new("L", (64, 64), 255).save(white)
    Image.new("L", (64, 64), 0).save(black)
    fast = {"num_inference_steps": 2}
    with pytest.raises(MaskError, match=f"mask '{white}' is all white: .*"
                                        "differential-diffusion needs black"):
        edit(EditRequest(image, target_prompt=TARGET, mask=white, params=fast),
             "differential-diffusion", pipe=tiny_sd)
    for from_dataset in (False, True):
        with pytest.raises(MaskError, match=f"mask '{black}' is all black"):
            edit(EditRequest(image, target_prompt=TARGET, mask=black, params=fast,
                             from_dataset=from_dataset), "differential-diffusion", pipe=tiny_sd)
    # a dataset's full mask is a whole-image edit (style change): strength 1 everywhere
    result = edit(EditRequest(image, target_prompt=TARGET, mask=white, params=fast,
                              from_dataset=True), "differential-diffusion", pipe=tiny_sd)
    assert float(result.intermediates["strength"].min()) == 1.0
    with pytest.raises(EditInputError, match="needs .*--mask FILE"):
        edit(EditRequest(image, target_prompt=TARGET, params=fast), "differential-diffusion",
             pipe=tiny_sd)


# --- both leave the UNet as they found it --------------------------------------------------------

@pytest.mark.parametrize("method, request_fields, fail_at", [
    ("diffedit", {"source_prompt": SOURCE, "params": FAST_DIFFEDIT}, 3),
    ("differential-diffusion", {"mask": _columns([0, 255]), "params": {"num_inference_steps": 4}},
     2),
])
def test_the_unet_is_restored_after_the_edit_and_when_it_raises(tiny_sd, image, method,
                                                                request_fields, fail_at):
    request = EditRequest(image, target_prompt=TARGET, **request_fields)
    before = _unet_state(tiny_sd.unet)
    edit(request, method, pipe=tiny_sd)
    assert _unet_state(tiny_sd.unet) == before
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")

    handle = tiny_sd.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            edit(request, method, pipe=tiny_sd)
    finally:
        handle.remove()
    assert _unet_state(tiny_sd.unet) == before
