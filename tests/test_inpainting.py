"""Stable Diffusion inpainting and outpainting on the tiny inpainting pipeline: NFE against the
cards, the pixels each promises to keep, masks as the input policy treats them, the canvas."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from editeval import EditRequest, edit
from editeval.data.images import MaskError
from editeval.editing import EditInputWarning
from editeval.models import load_pipeline

RNG = np.random.default_rng(0)
SOURCE = Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
BOX = (16, 8, 40, 48)  # left, top, right, bottom of the region to redraw


def _box_mask(size=(64, 64), box=BOX, mode="L") -> Image.Image:
    mask = Image.new(mode, size, 0)
    mask.paste((255,) * len(mode), box)
    return mask


@pytest.fixture(scope="module")
def tiny_inpaint():
    """The tiny inpainting pipeline, loaded through ``load_pipeline`` as a user would."""
    return load_pipeline("tiny", "inpainting")


@pytest.fixture
def unet_inputs(tiny_inpaint):
    """The inputs of every UNet call during the test, (B, 9, h, w) each."""
    seen: list[torch.Tensor] = []
    handle = tiny_inpaint.unet.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    yield seen
    handle.remove()


def _inpaint(pipe, mask=None, image=SOURCE, **params):
    params = {"num_inference_steps": 2, **params}
    request = EditRequest(image, target_prompt="a red square", seed=0,
                          mask=_box_mask() if mask is None else mask, params=params)
    return edit(request, "sd-inpainting", pipe=pipe)


@pytest.mark.parametrize("steps, strength, guidance, nfe", [
    (10, 1.0, 7.5, 2 * 10),
    (7, 0.5, 7.5, 2 * 3),  # floor(7 * 0.5) = 3 steps of noise to take off
    (6, 1.0, 1.0, 6),  # no guidance: one pass a step
])
def test_sd_inpainting_nfe_follows_its_card(tiny_inpaint, steps, strength, guidance, nfe):
    result = _inpaint(tiny_inpaint, num_inference_steps=steps, strength=strength,
                      guidance_scale=guidance)
    assert result.nfe == result.uncached_nfe == nfe


def test_paste_source_keeps_every_pixel_outside_the_mask(tiny_inpaint):
    outside = np.asarray(_box_mask()) == 0
    source = np.asarray(SOURCE)
    redrawn = np.asarray(_inpaint(tiny_inpaint).image)
    pasted = np.asarray(_inpaint(tiny_inpaint, paste_source=True).image)
    assert np.array_equal(pasted[outside], source[outside])
    assert np.array_equal(pasted[~outside], redrawn[~outside])  # inside: the same sample
    # diffusers' pipeline redraws the whole image: the option is what keeps the source
    assert np.abs(redrawn[outside].astype(int) - source[outside]).mean() > 10


def test_the_unet_sees_what_the_toy_inpainting_model_was_trained_on(tiny_inpaint, unet_inputs):
    """The mask at latent size (nearest) and the latents of the source with the box mid-grey,
    exactly as the toy inpainting stage builds them (``inpainting_condition``): a method passing
    the mask inverted or the unmasked source, or a training stage that fed the model anything
    else than the pipeline does, fails."""
    from editeval.toylab.training import _pixels, inpainting_condition

    _inpaint(tiny_inpaint, guidance_scale=1.0)
    left, top, right, bottom = (v // 8 for v in BOX)
    expected = torch.zeros(8, 8)
    expected[top:bottom, left:right] = 1
    first = unet_inputs[0][0]
    assert torch.equal(first[4], expected)
    # the generator of seed 0 drew the initial noise, then the masked image's posterior sample
    torch.manual_seed(0)
    torch.randn(1, 4, 8, 8)
    mask = torch.from_numpy(np.asarray(_box_mask()) / 255.0)[None, None].float()
    condition = inpainting_condition(tiny_inpaint.vae, _pixels(np.array(SOURCE)[None]), mask,
                                     tiny_inpaint.vae.config.scaling_factor)
    assert torch.equal(condition[0][0, 0], expected)
    assert torch.allclose(first[5:], condition[1][0], atol=1e-5)


def test_a_mask_of_another_size_is_resized_and_a_soft_or_rgb_one_binarised(tiny_inpaint,
                                                                           unet_inputs):
    reference = np.asarray(_inpaint(tiny_inpaint).image)
    small = _box_mask((32, 32), tuple(v // 2 for v in BOX))  # same aspect: nearest resize
    for mask in (small, _box_mask(mode="RGB")):
        assert np.array_equal(np.asarray(_inpaint(tiny_inpaint, mask=mask).image), reference)
    soft = io.BytesIO()
    _box_mask(box=(13, 9, 42, 45)).save(soft, format="JPEG", quality=30)  # grey ringing
    grey = np.asarray(Image.open(io.BytesIO(soft.getvalue())))
    assert len(np.unique(grey)) > 10
    binary = Image.fromarray(np.where(grey >= 128, 255, 0).astype(np.uint8))
    assert np.array_equal(np.asarray(_inpaint(tiny_inpaint, mask=soft.getvalue()).image),
                          np.asarray(_inpaint(tiny_inpaint, mask=binary).image))
    assert all(set(torch.unique(x[:, 4]).tolist()) == {0.0, 1.0} for x in unet_inputs)


@pytest.mark.parametrize("mask, message", [
    (_box_mask((64, 32), (8, 8, 24, 24)), "aspect.*--resize-mask"),
    (Image.new("L", (64, 64), 255), "all white.*needs black where the image must be kept"),
    (Image.new("L", (64, 64), 0), "all black.*paint the region to edit white"),
])
def test_an_unusable_mask_is_refused_naming_the_fix(tiny_inpaint, mask, message):
    with pytest.raises(MaskError, match=message):
        _inpaint(tiny_inpaint, mask=mask)


def test_sd_inpainting_needs_a_mask_and_an_inpainting_model(tiny_inpaint, tiny_sd):
    from editeval.editing import EditInputError

    with pytest.raises(EditInputError, match=r"needs mask \(--mask FILE\)"):
        edit(EditRequest(SOURCE, target_prompt="a red square"), "sd-inpainting",
             pipe=tiny_inpaint)
    with pytest.raises(EditInputError, match="9-channel denoiser.*inpainting checkpoint"):
        _inpaint(tiny_sd)
    with pytest.raises(ValueError, match="strength must be in"):
        _inpaint(tiny_inpaint, strength=0.0)


def _outpaint(pipe, image, **params):
    params = {"num_inference_steps": 2, **params}
    return edit(EditRequest(image, target_prompt="a red square on sand", seed=0,
                            params=params), "outpainting", pipe=pipe)


def test_outpainting_keeps_the_source_pixels_exactly_on_a_larger_canvas(tiny_inpaint):
    source = Image.fromarray(RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # 48x40
    result = _outpaint(tiny_inpaint, source, amount=8, unit="px", sides="left,top")
    assert result.image.size == (56, 48)
    out = np.asarray(result.image)
    assert np.array_equal(out[8:, 8:], np.asarray(source))
    assert result.nfe == 2 * 2
    # the new area is drawn, not left grey: the model's output, resized to the canvas
    assert np.abs(out[:8].astype(int) - 128).mean() > 5
    fraction = _outpaint(tiny_inpaint, source)  # 0.25 of each side, on all four
    assert fraction.image.size == (48 + 2 * 12, 40 + 2 * 10)
    assert np.array_equal(np.asarray(fraction.image)[10:50, 12:60], np.asarray(source))


def test_outpainting_masks_exactly_the_new_area(tiny_inpaint, unet_inputs):
    source = Image.fromarray(RNG.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    _outpaint(tiny_inpaint, source, amount=8, unit="px", guidance_scale=1.0)  # canvas 64 px
    expected = torch.ones(8, 8)
    expected[1:7, 1:7] = 0  # the source: the centre 48 px, 6 latent cells
    assert all(torch.equal(x[0, 4], expected) for x in unet_inputs)


@pytest.mark.parametrize("params, message", [
    ({"sides": "left,middle"}, "sides must be"),
    ({"sides": "left,left"}, "sides must be"),
    ({"unit": "inch"}, "unit must be one of fraction, px"),
    ({"amount": 2.5, "unit": "px"}, "whole number of pixels"),
    ({"amount": 5.0}, r"amount must be in \(0, 4\]"),
    ({"amount": 0.01}, "less than a pixel"),  # 0.01 of 48 px
])
def test_outpainting_refuses_a_bad_canvas(tiny_inpaint, params, message):
    with pytest.raises(ValueError, match=message):
        _outpaint(tiny_inpaint, Image.new("RGB", (48, 48)), **params)


def test_outpainting_ignores_a_given_mask_with_a_warning(tiny_inpaint):
    request = EditRequest(SOURCE, target_prompt="a red square", mask=_box_mask(), seed=0,
                          params={"num_inference_steps": 1, "amount": 8, "unit": "px"})
    with pytest.warns(EditInputWarning, match="does not use the mask"):
        result = edit(request, "outpainting", pipe=tiny_inpaint)
    assert result.image.size == (80, 80)


def test_the_toy_evaluations_run_the_methods_and_keep_the_outpainted_centre(tiny_inpaint):
    """The toy world's inpainting and outpainting measures, on the tiny model (noise: only the
    plumbing, the exact centre and the VAE's PSNR by hand are checked)."""
    from editeval.toylab.evaluate import _vae_round_trip, inpainting_quality, outpainting_quality
    from editeval.toyworld.oracle import psnr
    from editeval.toyworld.pairs import _objects_mask
    from editeval.toyworld.scenes import render, sample_scene

    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(2)]
    outpainted = outpainting_quality(tiny_inpaint, scenes, steps=1)
    assert outpainted["kept"] == 1.0 and outpainted["crossing_count"] >= 1
    inpainted = inpainting_quality(tiny_inpaint, scenes[:1], steps=1, seed=4)
    obj = scenes[0].objects[int(np.random.default_rng(4).integers(0, len(scenes[0].objects)))]
    image, mask = render(scenes[0]), _objects_mask([obj], 64)
    assert inpainted["vae_unmasked_psnr"] == psnr(_vae_round_trip(tiny_inpaint, image), image,
                                                  ~mask)
    assert 0 < inpainted["unmasked_psnr"] < 40 and inpainted["restored"] in (0.0, 1.0)


def test_a_benchmark_refuses_outpainting_before_anything_runs(tmp_path):
    from editeval.bench import PlanError, run_bench
    from editeval.run import RunConfig

    config = RunConfig(dataset="editeval-toy", methods=["sd-inpainting", "outpainting"],
                       model="tiny", out=tmp_path / "run")
    with pytest.raises(PlanError, match="'outpainting' extends the image"):
        run_bench(config)
    assert not (tmp_path / "run").exists()
