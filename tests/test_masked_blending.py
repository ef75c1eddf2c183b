"""Blended Latent Diffusion and RePaint on the tiny model: the known region they keep (the source,
forward-noised to each step's level, outside the latent mask), their NFE formulas, RePaint's
resampling schedule against the official code's, and the pipeline left unchanged.

The tiny model's random VAE reconstructs nothing (its latents have a standard deviation of 0.05
and its decoder's attention spreads every latent cell over the whole image), so pixel-level
claims are checked where they are exact (the VAE round trip of an unchanged latent, the pasted
source) and the known region at the latent level, bit for bit; the toy verify run measures the
unedited region's PSNR on a trained VAE.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.core.types import EditInputs
from editeval.data.images import MaskError
from editeval.diffusion import masked_blending
from editeval.diffusion.ddim import ddim_sample, ddim_scheduler
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.editing import edit
from editeval.methods.training_free import blended_latent_diffusion as bld_module
from editeval.methods.training_free import repaint as repaint_module
from editeval.methods.training_free.repaint import resampling_schedule

TARGET = "a blue square"
FAST = {"blended-latent-diffusion": {"num_inference_steps": 8},
        "repaint": {"num_inference_steps": 6, "jump_length": 2, "jump_n_sample": 2}}
MODULES = {"blended-latent-diffusion": bld_module, "repaint": repaint_module}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth 64x64 RGB image (the tiny model's resolution)."""
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    """A 24x24 square: latent cells 2..4 of the 8x8 latents (by their centre pixels)."""
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[16:40, 16:40] = 255
    return Image.fromarray(pixels, "L")


def _direct(pipe, method: str, image: Image.Image, mask: Image.Image, **params):
    """The method's function itself, below ``edit()``'s input policy (which refuses an all-black
    mask from a user), with the card's defaults updated by ``params``."""
    registered = get_method(method)
    return registered.fn(pipe, EditInputs(image, target_prompt=TARGET, mask=mask),
                         torch.Generator().manual_seed(0),
                         **registered.resolve_params({**FAST[method], **params}))


def test_a_ddim_sample_callback_replaces_the_latents(tiny_sd):
    # the per-step blend of Blended Latent Diffusion returns new latents; ddim_sample once took
    # them with `callback(...) or latents`, which raises for a tensor of several values
    scheduler = ddim_scheduler(tiny_sd, 3)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def record_then_zero(i, t, latents):
        seen.append(latents)
        return torch.zeros_like(latents)

    result = ddim_sample(tiny_sd.unet, noise, scheduler, encode_prompt(tiny_sd, TARGET),
                         callback=record_then_zero)
    assert len(seen) == 3 and torch.equal(result, torch.zeros_like(noise))


def test_latent_mask_takes_each_cells_centre_pixel(mask):
    latents = torch.zeros(1, 4, 8, 8)
    small = masked_blending.latent_mask(mask, latents)
    expected = torch.zeros(8, 8)
    expected[2:5, 2:5] = 1  # cells whose centre pixel (8 i + 4) lies in rows/columns 16..39
    assert small.shape == (1, 1, 8, 8) and torch.equal(small[0, 0], expected)


def test_diffuse_has_the_forward_process_moments():
    latents = torch.full((1, 4, 64, 64), 2.0)
    draw = masked_blending.diffuse(latents, 0.36, torch.Generator().manual_seed(0), 0.64)
    # r = 0.36 / 0.64: mean sqrt(r) * 2 = 1.5, standard deviation sqrt(1 - r) = sqrt(0.4375)
    assert abs(float(draw.mean()) - 1.5) < 0.02 and abs(float(draw.std()) - 0.4375 ** 0.5) < 0.02
    assert torch.equal(masked_blending.diffuse(latents, 1.0, torch.Generator()), latents)
    with pytest.raises(ValueError, match="not in"):
        masked_blending.diffuse(latents, 0.9, torch.Generator(), 0.5)


@pytest.mark.parametrize("method", ["blended-latent-diffusion", "repaint"])
def test_an_empty_mask_returns_the_vae_round_trip_of_the_source(tiny_sd, image, method):
    # edit() refuses an all-black mask from a user; the method itself keeps every latent cell, so
    # its result is the source's VAE round trip bit for bit. An implementation that regenerates
    # the masked-out region (the mask inverted) fails.
    black = Image.new("L", image.size, 0)
    result = _direct(tiny_sd, method, image, black).image
    round_trip = decode_latents(tiny_sd, encode_image(tiny_sd, image))
    assert np.array_equal(np.asarray(result), np.asarray(round_trip))


@pytest.mark.parametrize("method", ["blended-latent-diffusion", "repaint"])
def test_the_known_region_is_the_source_noised_to_each_level(tiny_sd, image, mask, method,
                                                             monkeypatch):
    # What the denoiser sees outside the mask at timestep t is sqrt(a_t) z_src + sqrt(1 - a_t) eps:
    # the residual x - sqrt(a_t) z_src there has standard deviation sqrt(1 - a_t) at every call.
    # Blending the un-noised source gives the residual (1 - sqrt(a_t)) z_src instead, 0.05 times
    # that or less here, and fails. The final latents are the source's outside the mask, bit for
    # bit, and new inside it (the mask inverted fails both).
    source = encode_image(tiny_sd, image)
    keep = masked_blending.latent_mask(mask, source).expand_as(source) == 0
    alphas = ddim_scheduler(tiny_sd).alphas_cumprod
    ratios = []

    def record(module, args, kwargs):
        latents, t = args[0][:1], int(args[1])
        residual = latents - alphas[t].sqrt() * source
        ratios.append(float(residual[keep].std().detach() / (1 - alphas[t]).sqrt()))

    decoded = []
    module = MODULES[method]
    monkeypatch.setattr(module, "decode_latents",
                        lambda pipe, latents: decoded.append(latents) or decode_latents(pipe,
                                                                                        latents))
    handle = tiny_sd.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _direct(tiny_sd, method, image, mask)
    finally:
        handle.remove()
    assert len(ratios) > 5 and all(0.75 < ratio < 1.25 for ratio in ratios), ratios
    (final,) = decoded
    assert torch.equal(final[keep], source[keep]) and not torch.equal(final[~keep], source[~keep])


@pytest.mark.parametrize("params, expected", [
    ({"num_inference_steps": 8}, 2 * (8 - 2)),
    ({"num_inference_steps": 10, "blending_start_percentage": 0.5, "guidance_scale": 1.0}, 5),
])
def test_blended_latent_diffusion_nfe_follows_its_card(tiny_sd, image, mask, params, expected):
    result = edit(EditRequest(image, target_prompt=TARGET, mask=mask, params=params),
                  "blended-latent-diffusion", pipe=tiny_sd)
    assert result.nfe == result.uncached_nfe == expected
    assert np.asarray(result.intermediates["latent_mask"]).sum() == 9 * 255


@pytest.mark.parametrize("params, expected", [
    # 2 * (N + (r - 1) * j * floor((N - 1) / j))
    ({"num_inference_steps": 12, "jump_length": 3, "jump_n_sample": 2}, 2 * (12 + 3 * 3)),
    ({"num_inference_steps": 7, "jump_length": 2, "jump_n_sample": 3, "guidance_scale": 1.0},
     7 + 2 * 2 * 3),
])
def test_repaint_nfe_follows_its_card(tiny_sd, image, mask, params, expected):
    result = edit(EditRequest(image, target_prompt=TARGET, mask=mask, params=params), "repaint",
                  pipe=tiny_sd)
    assert result.nfe == result.uncached_nfe == expected


def test_resampling_schedule_is_the_official_one():
    # the official get_schedule_jump(t_T=4, jump_length=2, jump_n_sample=2) visits
    # 3 2 1 0 1 2 1 0 -1 after its start at 3 (its time t is our level t + 1, from pure noise)
    assert resampling_schedule(4, 2, 2) == [4, 3, 2, 1, 2, 3, 2, 1, 0]
    walk = resampling_schedule(250, 10, 10)  # the paper's setting
    downs = sum(b < a for a, b in zip(walk, walk[1:]))
    assert (downs, len(walk) - 1 - downs, max(walk)) == (2410, 2160, 250)
    assert all(abs(a - b) == 1 for a, b in zip(walk, walk[1:])) and walk[-1] == 0
    assert resampling_schedule(5, 1, 1) == [5, 4, 3, 2, 1, 0]  # r = 1: no resampling


def test_paste_source_pixels_keeps_the_source_outside_the_mask(tiny_sd, image, mask):
    result = edit(EditRequest(image, target_prompt=TARGET, mask=mask,
                              params={"num_inference_steps": 4,
                                      "background": "paste-source-pixels"}),
                  "blended-latent-diffusion", pipe=tiny_sd)
    edited, source = np.asarray(result.model_image), np.asarray(image)
    keep = np.asarray(mask) == 0
    assert np.array_equal(edited[keep], source[keep]) and not np.array_equal(edited[~keep],
                                                                            source[~keep])


def test_the_decoder_finetuning_moves_the_background_to_the_source_on_a_copy(tiny_sd, image,
                                                                             mask):
    # the paper's background reconstruction fits a copy of the decoder; fitting the shared VAE
    # (or leaving gradients on it) fails the state check
    state = {k: v.clone() for k, v in tiny_sd.vae.state_dict().items()}
    trainable = [p.requires_grad for p in tiny_sd.vae.parameters()]
    outside = np.asarray(mask) == 0

    def background_error(background: str) -> float:
        result = edit(EditRequest(image, target_prompt=TARGET, mask=mask,
                                  params={"num_inference_steps": 4, "background": background,
                                          "decoder_steps": 10}),
                      "blended-latent-diffusion", pipe=tiny_sd)
        difference = np.asarray(result.model_image, float) - np.asarray(image, float)
        return float(np.abs(difference[outside]).mean())

    plain, fitted = background_error("none"), background_error("finetune-decoder")
    assert fitted < 0.9 * plain
    assert all(torch.equal(v, state[k]) for k, v in tiny_sd.vae.state_dict().items())
    assert [p.requires_grad for p in tiny_sd.vae.parameters()] == trainable
    assert all(p.grad is None for p in tiny_sd.vae.parameters())


def test_a_mask_thinner_than_a_latent_cell_is_refused(tiny_sd, image):
    line = np.zeros((64, 64), dtype=np.uint8)
    line[:, 1:3] = 255  # no cell's centre pixel (column 8 i + 4) is marked
    with pytest.raises(MaskError, match="marks no cell of the 8x8 latents.*widen"):
        edit(EditRequest(image, target_prompt=TARGET, mask=Image.fromarray(line, "L"),
                         params={"num_inference_steps": 2}), "repaint", pipe=tiny_sd)


@pytest.mark.parametrize("method, params, message", [
    ("blended-latent-diffusion", {"blending_start_percentage": 1.0}, r"must be in \[0, 1\)"),
    ("blended-latent-diffusion", {"background": "pixel"}, "background must be one of none, "
                                                          "finetune-decoder, paste-source-pixels"),
    ("repaint", {"jump_length": 0}, "jump_length must be >= 1"),
])
def test_bad_parameters_are_refused_before_loading(method, params, message):
    with pytest.raises(ValueError, match=message):
        get_method(method).resolve_params(params)
