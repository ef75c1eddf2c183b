"""Backward passes counted by the NFE counter, the shared latent-optimisation loop, DDS on the tiny
model (its card's cost, its zero-gradient property) and the shared pipeline left unchanged by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.core.nfe import count_nfe
from editeval.diffusion.ddim import ddim_scheduler, model_noise
from editeval.diffusion.latent_optimisation import (
    delta_denoising_score,
    optimise_latents,
    patch_nce_loss,
)
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.editing import edit
from editeval.methods.test_time_finetuning import cds as cds_module
from editeval.methods.test_time_finetuning import dds as dds_module

SOURCE, TARGET = "a red circle on grass", "a blue circle on grass"
TINY_DDS = {"num_iterations": 3}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth 64x64 RGB image (the tiny model's resolution)."""
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _request(image: Image.Image, params: dict, target: str = TARGET) -> EditRequest:
    return EditRequest(image, source_prompt=SOURCE, target_prompt=target, params=params)


# --- backward passes counted -------------------------------------------------------------------

def test_the_counter_counts_backward_passes_through_the_denoiser(tiny_sd, image):
    unet, scheduler = tiny_sd.unet, ddim_scheduler(tiny_sd, 4)
    latents = encode_image(tiny_sd, image)
    text = encode_prompt(tiny_sd, SOURCE)
    t = scheduler.timesteps[0]
    with count_nfe(unet) as counter:
        with torch.no_grad():  # no graph: nothing to count
            model_noise(unet, scheduler, latents, t, text)
        # gradients reach the sample: one backward pass, whatever the batch
        # (autograd.grad: the shared UNet's parameters gather no .grad)
        moving = latents.expand(2, -1, -1, -1).clone().requires_grad_(True)
        torch.autograd.grad(
            model_noise(unet, scheduler, moving, t, text.expand(2, -1, -1)).square().sum(), moving)
        # only the text requires gradients (as null-text inversion): counted on the output
        embedding = text.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model_noise(unet, scheduler, latents, t, embedding).sum(),
                                      embedding)
        # a forward with a graph that is never differentiated costs no backward pass
        model_noise(unet, scheduler, latents.clone().requires_grad_(True), t, text)
    assert (counter.nfe, counter.calls, counter.backward) == (1 + 2 + 1 + 1, 4, 2)
    assert float(grad.abs().sum()) > 0
    assert not unet._forward_pre_hooks and not unet._forward_hooks  # the hooks are removed


def test_counting_does_not_change_the_gradient(tiny_sd, image):
    # a wrong counter (one that scales or drops the gradient it passes on) fails this
    unet, scheduler = tiny_sd.unet, ddim_scheduler(tiny_sd, 4)
    latents, text = encode_image(tiny_sd, image), encode_prompt(tiny_sd, SOURCE)
    t = scheduler.timesteps[1]

    def gradient() -> torch.Tensor:
        moving = latents.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model_noise(unet, scheduler, moving, t, text).sum(), moving)
        return grad

    plain = gradient()
    with count_nfe(unet):
        counted = gradient()
    assert torch.equal(plain, counted)


def test_a_run_stores_the_backward_passes(tmp_path, tiny_sd, image):
    from types import SimpleNamespace

    from editeval.bench.execute import Outcome
    from editeval.bench.record import record
    from editeval.run import Run, RunConfig

    result = edit(_request(image, {"num_inference_steps": 2, "lambda_kl": 0.0}),
                  "pix2pix-zero", pipe=tiny_sd)
    assert result.backward_passes == 2  # one a step (pix2pix-zero's card)
    sample = SimpleNamespace(id="replacement/1", task="replacement")
    job = SimpleNamespace(job_id="pix2pix-zero/replacement/1/seed0", method="pix2pix-zero",
                          sample=sample, seed=0)
    config = RunConfig(dataset="editeval-toy", methods=["pix2pix-zero"], model="tiny",
                       out=tmp_path / "run")
    with Run.for_config(config) as run:
        record(run, Outcome(job, result))
        (row,) = run.rows()
    assert (row.nfe, row.backward_passes) == (result.nfe, 2)


# --- the shared loop ----------------------------------------------------------------------------

def test_optimise_latents_is_plain_sgd_in_float32():
    # loss ||z - c||^2: SGD of step lr gives z_k = c + (1 - 2 lr)^k (z_0 - c)
    start = torch.tensor([[1.0, -2.0]], dtype=torch.float16)
    centre = torch.tensor([[0.5, 0.5]])
    result = optimise_latents(start, lambda z, i: ((z - centre) ** 2).sum(), 3, 0.1)
    expected = centre + 0.8 ** 3 * (start.float() - centre)
    assert result.latents.dtype == torch.float32 and not result.latents.requires_grad
    assert torch.allclose(result.latents, expected, atol=1e-6)
    assert result.losses == pytest.approx([6.5, 6.5 * 0.64, 6.5 * 0.64 ** 2], rel=1e-5)
    assert start.tolist() == [[1.0, -2.0]]  # the start is not changed
    with pytest.raises(ValueError, match="learning_rate > 0"):
        optimise_latents(start, lambda z, i: z.sum(), 1, 0.0)


def test_delta_denoising_score_is_the_guided_difference(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd)
    source = encode_image(tiny_sd, image)
    null, src, tgt = (encode_prompt(tiny_sd, p) for p in ("", SOURCE, TARGET))
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(1))
    # equal latents and prompts: exactly zero (the DDS property)
    same = delta_denoising_score(tiny_sd.unet, scheduler, source, source, src, src, null, 500,
                                 noise, 7.5)
    assert torch.count_nonzero(same) == 0
    # by hand: guided predictions at the two noised latents (a wrong sign or a missing noise
    # level fails this)
    target = source + 0.3
    delta = delta_denoising_score(tiny_sd.unet, scheduler, source, target, src, tgt, null, 500,
                                  noise, 7.5)
    a = scheduler.alphas_cumprod[500]

    def guided(latents, text):
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        uncond = model_noise(tiny_sd.unet, scheduler, noisy, 500, null)
        return uncond + 7.5 * (model_noise(tiny_sd.unet, scheduler, noisy, 500, text) - uncond)

    with torch.no_grad():
        expected = guided(target, tgt) - guided(source, src)
    assert torch.allclose(delta, expected, atol=1e-4)


# --- DDS ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("iterations", [3, 5])
def test_dds_nfe_and_backward_passes_follow_its_card(tiny_sd, image, iterations):
    result = edit(_request(image, {"num_iterations": iterations}), "dds", pipe=tiny_sd)
    assert (result.nfe, result.uncached_nfe, result.backward_passes) == (4 * iterations,
                                                                         4 * iterations, 0)
    assert result.intermediates["optimisation_steps"] == iterations
    assert result.intermediates["latent_change"] > 0.01  # a different prompt moves the latent


def test_dds_with_the_source_prompt_as_target_leaves_the_latent_unchanged(tiny_sd, image):
    # zero gradient: the edit is the source's VAE reconstruction, bit for bit
    result = edit(_request(image, TINY_DDS, target=SOURCE), "dds", pipe=tiny_sd)
    assert result.intermediates["latent_change"] == 0.0
    reconstruction = decode_latents(tiny_sd, encode_image(tiny_sd, image))
    assert np.array_equal(np.asarray(result.model_image), np.asarray(reconstruction))


@pytest.mark.parametrize("params, message", [
    ({"num_iterations": 0}, "num_iterations must be >= 1"),
    ({"learning_rate": 0.0}, "learning_rate and loss_scale must be > 0"),
    ({"t_min": 900, "t_max": 800}, "give 0 <= t_min < t_max - 1"),
])
def test_dds_refuses_bad_parameters_before_loading(params, message):
    with pytest.raises(ValueError, match=message):
        get_method("dds").resolve_params(params)


def test_dds_card_is_the_surveys():
    card = get_method("dds").card
    assert (card.strategy, card.subcategory) == ("test-time-finetuning",
                                                 "latent-variable-optimization")
    assert card.paper.arxiv_id == "2304.07090"
    assert dict(card.defaults) == {"num_iterations": 200, "learning_rate": 0.1,
                                   "loss_scale": 2000.0, "guidance_scale": 7.5, "t_min": 50,
                                   "t_max": 950}


# --- CDS -----------------------------------------------------------------------------------------

def test_patch_nce_loss_by_hand():
    # 4 positions (2 x 2), unit features at angles 0, 2, 4, 6 degrees, equal maps: row i's
    # logits are [1 (positive), cos(a_i - a_j) for j != i, -10 for j = i (masked)] / 0.07
    angles = np.deg2rad([0.0, 2.0, 4.0, 6.0])
    features = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], -1)[None],
                            dtype=torch.float32)
    loss = patch_nce_loss(features, features, (1,), 256, torch.Generator().manual_seed(0))
    cosines = np.cos(angles[:, None] - angles[None, :])
    np.fill_diagonal(cosines, -10.0)
    logits = np.concatenate([np.ones((4, 1)), cosines], axis=1) / 0.07
    expected = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[:, 0])
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    # a map whose positions are swapped matches worse (a loss blind to position fails this)
    distinct = torch.eye(4)[None]  # orthonormal: ~0 when equal, > 10 when swapped
    same = patch_nce_loss(distinct, distinct, (1,), 256, torch.Generator().manual_seed(0))
    worse = patch_nce_loss(distinct, distinct[:, [1, 0, 3, 2]], (1,), 256,
                           torch.Generator().manual_seed(0))
    assert float(same) < 1e-5 and float(worse) > 10


@pytest.mark.parametrize("iterations", [2, 3])
def test_cds_nfe_and_backward_passes_follow_its_card(tiny_sd, image, iterations):
    result = edit(_request(image, {"num_iterations": iterations}), "cds", pipe=tiny_sd)
    assert (result.nfe, result.backward_passes) == (5 * iterations, iterations)
    plain = edit(_request(image, {"num_iterations": iterations, "w_cut": 0.0}), "cds",
                 pipe=tiny_sd)
    assert (plain.nfe, plain.backward_passes) == (4 * iterations, 0)
    # w_cut 0 is DDS, step for step
    dds = edit(_request(image, {"num_iterations": iterations}), "dds", pipe=tiny_sd)
    assert np.array_equal(np.asarray(plain.model_image), np.asarray(dds.model_image))


def test_cds_contrastive_term_changes_the_edit(tiny_sd, image):
    with_cut = edit(_request(image, TINY_DDS), "cds", pipe=tiny_sd)
    without = edit(_request(image, {**TINY_DDS, "w_cut": 0.0}), "cds", pipe=tiny_sd)
    assert with_cut.intermediates["latent_change"] != without.intermediates["latent_change"]


@pytest.mark.parametrize("params, message", [
    ({"patch_sizes": "1,x"}, "give comma-separated sizes >= 1"),
    ({"w_cut": -1.0}, "w_dds and w_cut must be >= 0"),
    ({"num_iterations": 0}, "num_iterations must be >= 1"),
])
def test_cds_refuses_bad_parameters_before_loading(params, message):
    with pytest.raises(ValueError, match=message):
        get_method("cds").resolve_params(params)


# --- the shared model never changes --------------------------------------------------------------

def _state(pipe) -> dict:
    return {name: (tensor.detach().clone(), tensor.requires_grad)
            for module in (pipe.unet, pipe.vae, pipe.text_encoder)
            for name, tensor in module.named_parameters(prefix=type(module).__name__)}


@pytest.mark.parametrize("method, module", [("dds", dds_module), ("cds", cds_module)])
def test_the_shared_pipeline_is_unchanged_also_when_the_edit_fails(tiny_sd, image, monkeypatch,
                                                                  method, module):
    sdedit = _request(image, {"num_inference_steps": 4})
    before_state = _state(tiny_sd)
    before = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    edit(_request(image, TINY_DDS), method, pipe=tiny_sd)
    after_dds = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)

    calls = []

    def failing(*args, **kwargs):  # fails half-way: on the second iteration
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return delta_denoising_score(*args, **kwargs)

    monkeypatch.setattr(module, "delta_denoising_score", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        edit(_request(image, TINY_DDS), method, pipe=tiny_sd)
    after_failure = np.asarray(edit(sdedit, "sdedit", pipe=tiny_sd).image)
    assert np.array_equal(before, after_dds) and np.array_equal(before, after_failure)
    after_state = _state(tiny_sd)
    assert after_state.keys() == before_state.keys()
    for name, (tensor, requires_grad) in before_state.items():
        assert torch.equal(after_state[name][0], tensor) and after_state[name][1] == requires_grad
    assert all(p.grad is None for p in tiny_sd.unet.parameters())
    assert not tiny_sd.unet._forward_pre_hooks and not tiny_sd.unet._forward_hooks
    assert not any(m._forward_hooks for m in tiny_sd.unet.modules())  # CDS's feature hooks
