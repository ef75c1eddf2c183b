"""Blended Diffusion on the tiny model: its NFE and backward-pass formulas, the guided step
(the mean moved by minus the step's variance times the loss gradient, taken through the denoiser
and the decoder), the known region outside the mask, and the pipeline and global state left as
they were. The toy verify run measures whether it edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.core.types import EditInputs
from editeval.diffusion import masked_blending
from editeval.diffusion.ddim import ddim_scheduler, model_noise
from editeval.diffusion.ddpm import step_levels, stochastic_step_mean
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.editing import edit
from editeval.methods.training_free import blended_diffusion as bd
from editeval.models.image_losses import load_clip_guide

TARGET = "a blue square"
FAST = {"num_inference_steps": 4, "skip_timesteps": 1, "aug_num": 2}


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


def _direct(pipe, image, mask, seed=0, **params):
    """The method's function itself with the card's defaults updated by FAST and ``params``."""
    registered = get_method("blended-diffusion")
    return registered.fn(pipe, EditInputs(image, target_prompt=TARGET, mask=mask),
                         torch.Generator().manual_seed(seed),
                         **registered.resolve_params({**FAST, **params}))


def _final_latents(monkeypatch) -> list[torch.Tensor]:
    """The latents the method decodes, recorded."""
    decoded: list[torch.Tensor] = []
    monkeypatch.setattr(bd, "decode_latents",
                        lambda pipe, latents: decoded.append(latents) or decode_latents(pipe,
                                                                                        latents))
    return decoded


@pytest.mark.parametrize("params, nfe, backward", [
    ({"num_inference_steps": 5, "skip_timesteps": 2}, 3, 3),
    ({"num_inference_steps": 4, "skip_timesteps": 1, "guidance_scale": 7.5}, 2 * 3, 3),
    ({"num_inference_steps": 4, "skip_timesteps": 0, "guidance_scale": 1.0,
      "clip_guidance_lambda": 0.0, "range_lambda": 0.0}, 4, 0),
])
def test_nfe_and_backward_passes_follow_the_card(tiny_sd, image, mask, params, nfe, backward):
    # NFE = steps - skip (x2 with classifier-free guidance); one backward pass through the denoiser
    # a step (the gradient reaches z_t through its x0 estimate), none when no loss is on
    result = edit(EditRequest(image, target_prompt=TARGET, mask=mask,
                              params={"aug_num": 2, **params}), "blended-diffusion", pipe=tiny_sd)
    assert (result.nfe, result.uncached_nfe, result.backward_passes) == (nfe, nfe, backward)
    assert len(result.intermediates["clip_distances"]) == (backward if backward else 0)


def test_the_step_moves_the_mean_by_minus_the_variance_times_the_loss_gradient(tiny_sd, image,
                                                                               mask,
                                                                               monkeypatch):
    # One step (the last: no noise draw), one unaugmented CLIP view. The guided latents minus the
    # unguided ones are -sigma^2 grad L inside the mask, with L = lambda d(E_I(x0 m), E_T) on the
    # decoded x0 estimate, its gradient taken through the denoiser. A wrong sign, sigma instead
    # of sigma^2, or eps detached from z_t (no gradient through the denoiser) fails.
    lam, seed = 1000.0, 3
    decoded = _final_latents(monkeypatch)
    params = {"num_inference_steps": 2, "skip_timesteps": 1, "aug_num": 1, "range_lambda": 0.0}
    _direct(tiny_sd, image, mask, seed, clip_guidance_lambda=lam, **params)
    _direct(tiny_sd, image, mask, seed, clip_guidance_lambda=0.0, **params)
    guided, plain = decoded

    scheduler = ddim_scheduler(tiny_sd, 2)
    scheduler.timesteps = scheduler.timesteps[1:]
    ((t, alpha_t, alpha_prev),) = step_levels(scheduler)
    known = masked_blending.known_region(tiny_sd, image, mask, torch.Generator().manual_seed(seed))
    start = known.noised(alpha_t).requires_grad_(True)
    clip = load_clip_guide("toy")
    inside = torch.from_numpy(np.asarray(mask) >= 128).float()[None, None]
    with torch.enable_grad():
        eps = model_noise(tiny_sd.unet, scheduler, start, t, encode_prompt(tiny_sd, ""))
        x0 = tiny_sd.vae.decode(((start - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt())
                                / tiny_sd.vae.config.scaling_factor).sample
        views = bd.augmented_views(x0 * inside, clip.size, 1, torch.Generator())
        loss = lam * bd.spherical_distance(clip.image_features((views + 1) / 2),
                                           clip.text_features([TARGET])).mean()
        (gradient,) = torch.autograd.grad(loss, start)
    _, sigma = stochastic_step_mean(start.detach(), eps.detach(), alpha_t, alpha_prev, 1.0)
    expected = -sigma ** 2 * gradient * known.mask
    assert float(expected.abs().max()) > 1e-3  # the guidance moves the latents visibly
    torch.testing.assert_close(guided - plain, expected, atol=2e-6, rtol=1e-3)


def test_spherical_distance_golden_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # parallel: 0; orthogonal: 2 arcsin(sqrt(2) / 2)^2 = pi^2 / 8; opposite: 2 (pi / 2)^2
    expected = torch.tensor([0.0, np.pi ** 2 / 8, np.pi ** 2 / 2])
    torch.testing.assert_close(bd.spherical_distance(a, b), expected)


def test_outside_the_mask_the_denoiser_sees_the_noised_source_and_the_edit_keeps_it(
        tiny_sd, image, mask, monkeypatch):
    # At every call, outside the latent mask, z_t - sqrt(a_t) z_src has standard deviation
    # sqrt(1 - a_t) (the source forward-noised to the step's level); the decoded latents are the
    # source's there, bit for bit, and new inside; the returned pixels are the source's outside
    # the pixel mask (enforce_background). The mask inverted fails all three.
    source = encode_image(tiny_sd, image)
    keep = masked_blending.latent_mask(mask, source).expand_as(source) == 0
    alphas = ddim_scheduler(tiny_sd).alphas_cumprod
    ratios = []

    def record(module, args, kwargs):
        latents, t = args[0].detach(), int(args[1])
        residual = latents - alphas[t].sqrt() * source
        ratios.append(float(residual[keep].std() / (1 - alphas[t]).sqrt()))

    decoded = _final_latents(monkeypatch)
    handle = tiny_sd.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = _direct(tiny_sd, image, mask, num_inference_steps=8, aug_num=1)
    finally:
        handle.remove()
    assert len(ratios) == 7 and all(0.75 < ratio < 1.25 for ratio in ratios), ratios
    (final,) = decoded
    assert torch.equal(final[keep], source[keep]) and not torch.equal(final[~keep], source[~keep])
    edited, original = np.asarray(result.image), np.asarray(image)
    outside = np.asarray(mask) == 0
    assert np.array_equal(edited[outside], original[outside])
    assert not np.array_equal(edited[~outside], original[~outside])


def test_without_enforce_background_the_result_is_the_decoded_latents(tiny_sd, image, mask,
                                                                      monkeypatch):
    decoded = _final_latents(monkeypatch)
    result = _direct(tiny_sd, image, mask, enforce_background=False)
    assert np.array_equal(np.asarray(result.image),
                          np.asarray(decode_latents(tiny_sd, decoded[0])))


def test_the_background_loss_adds_its_gradient(tiny_sd, image, mask, monkeypatch):
    # With only the background loss on (LPIPS stood in by an L1 distance: the real network is
    # too slow to build in a test), there is still one backward pass a step, and it changes the
    # edit; with its weights at 0 it is off.
    loaded = []
    monkeypatch.setattr(bd, "load_lpips_loss", lambda name, device: loaded.append(name) or (
        lambda a, b: (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)))
    decoded = _final_latents(monkeypatch)
    off = {"clip_guidance_lambda": 0.0, "range_lambda": 0.0}
    result = edit(EditRequest(image, target_prompt=TARGET, mask=mask,
                              params={**FAST, **off, "background_preservation_loss": True}),
                  "blended-diffusion", pipe=tiny_sd)
    assert result.backward_passes == 3 and loaded == ["vgg-random"]  # offline: the stand-in
    _direct(tiny_sd, image, mask, **off, background_preservation_loss=True, lpips_sim_lambda=0.0,
            l2_sim_lambda=0.0)
    _direct(tiny_sd, image, mask, **off)
    assert torch.equal(decoded[1], decoded[2]) and not torch.equal(decoded[0], decoded[1])


def test_the_pipeline_and_global_random_state_are_left_as_they_were(tiny_sd, image, mask):
    # the gradient is taken w.r.t. the latents only: no weight gradients, no flags or hooks left,
    # and the augmentations draw from the edit's generator, not torch's global one
    modules = (tiny_sd.unet, tiny_sd.vae)
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    hooks = [sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())
             for m in modules]
    weights = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    rng = torch.get_rng_state()
    first = _direct(tiny_sd, image, mask, seed=5).image
    assert torch.equal(torch.get_rng_state(), rng)
    assert [[p.requires_grad for p in m.parameters()] for m in modules] == flags
    assert all(p.grad is None for m in modules for p in m.parameters())
    assert [sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())
            for m in modules] == hooks
    assert all(torch.equal(v, weights[k]) for k, v in tiny_sd.unet.state_dict().items())
    again = _direct(tiny_sd, image, mask, seed=5).image  # equal seeds, equal edits
    assert np.array_equal(np.asarray(first), np.asarray(again))


@pytest.mark.parametrize("params, message", [
    ({"skip_timesteps": 100}, r"skip_timesteps must be in \[0, num_inference_steps = 100\)"),
    ({"aug_num": 0}, "aug_num must be >= 1"),
    ({"clip_guidance_lambda": -1.0}, "clip_guidance_lambda must be >= 0"),
    ({"guidance_scale": -2.0}, "guidance_scale must be >= 0"),
    ({"clip_model": "./no/such/clip"}, "clip_model must be 'auto', 'toy', a hub id or an existing"),
])
def test_bad_parameters_are_refused_before_loading(params, message):
    with pytest.raises(ValueError, match=message):
        get_method("blended-diffusion").resolve_params(params)
