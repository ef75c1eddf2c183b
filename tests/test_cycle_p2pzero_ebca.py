"""CycleDiffusion, Pix2Pix-Zero and Energy-Based Cross Attention on the tiny model: each method's
defining property, NFE (and backward passes) against its card, and the UNet left as it was found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.diffusion.attention import control_attention
from editeval.diffusion.ddim import (
    ddim_invert,
    ddim_sample,
    ddim_scheduler,
    model_noise,
)
from editeval.diffusion.ddpm import ddpm_sample, dpm_encode
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.diffusion.regularised_inversion import (
    auto_correlation_loss,
    kl_divergence,
    regularise_noise,
    regularised_ddim_invert,
    regularised_inversion,
)
from editeval.editing import EditInputWarning, edit
from editeval.methods.training_free.ebca import (
    bayesian_context_update,
    editorial_prompts,
    step_schedule,
)
from editeval.methods.training_free.pix2pix_zero import (
    CrossAttentionGuide,
    edit_direction,
    guide_latents,
    sentence_sets,
)

# the prompts, the smooth 64x64 source (a pytest fixture) and the latent error of the inversion tests
from test_inversion_methods import SOURCE, TARGET, _relative_error, image  # noqa: E402, F401


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _request(image: Image.Image, params: dict, target: str = TARGET, seed: int = 0) -> EditRequest:
    return EditRequest(image, source_prompt=SOURCE, target_prompt=target, seed=seed, params=params)


# --- CycleDiffusion ------------------------------------------------------------------------------

@pytest.mark.parametrize("eta, skip", [(0.1, 0), (0.1, 3), (1.0, 2)])
def test_dpm_encoder_code_decodes_to_the_source_under_its_prompt(tiny_sd, image, eta, skip):
    scheduler = ddim_scheduler(tiny_sd, 12)
    latents = encode_image(tiny_sd, image)
    cond, uncond = encode_prompt(tiny_sd, SOURCE), encode_prompt(tiny_sd, "")
    start, maps = dpm_encode(tiny_sd.unet, latents, scheduler, cond, uncond, 3.0, eta=eta,
                             skip=skip, generator=torch.Generator().manual_seed(0))
    assert len(maps) == 12 - skip
    restored = ddpm_sample(tiny_sd.unet, start, maps, scheduler, cond, uncond, 3.0, skip=skip,
                           eta=eta)
    # measured 2e-8 (float32 rounding); a step mean or sigma that differs between encoder and
    # decoder (e.g. eta 1 in one of them) leaves errors of order 1
    assert _relative_error(restored, latents) < 1e-6
    wrong_eta = ddpm_sample(tiny_sd.unet, start, maps, scheduler, cond, uncond, 3.0, skip=skip,
                            eta=0.5 if eta != 0.5 else 1.0)
    assert _relative_error(wrong_eta, latents) > 1e-2


def test_dpm_encoder_starts_on_the_forward_marginal_and_the_seed_draws_the_code(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 10)
    latents = encode_image(tiny_sd, image)
    cond = encode_prompt(tiny_sd, SOURCE)
    start, _ = dpm_encode(tiny_sd.unet, latents, scheduler, cond, eta=0.1, skip=0,
                          generator=torch.Generator().manual_seed(0))
    alpha = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    noise = (start - alpha.sqrt() * latents) / (1 - alpha).sqrt()
    # x_T = sqrt(a) x_0 + sqrt(1 - a) n with n standard normal (256 draws)
    assert abs(float(noise.mean())) < 0.2 and abs(float(noise.std()) - 1) < 0.15
    again, _ = dpm_encode(tiny_sd.unet, latents, scheduler, cond, eta=0.1, skip=0,
                          generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(again, start)


def test_cyclediffusion_with_the_source_prompt_reconstructs_as_well_as_ddpm_inversion(tiny_sd,
                                                                                        image):
    vae_round_trip = decode_latents(tiny_sd, encode_image(tiny_sd, image))
    same = {"num_inference_steps": 10, "skip": 2, "guidance_scale": 1.0}
    with pytest.warns(EditInputWarning, match="nothing to edit"):
        cycle = edit(_request(image, same, target=SOURCE), "cyclediffusion", pipe=tiny_sd)
    with pytest.warns(EditInputWarning, match="nothing to edit"):
        ddpm = edit(_request(image, {"num_inference_steps": 10, "skip": 2, "guidance_scale": 3.5},
                             target=SOURCE), "ddpm-inversion", pipe=tiny_sd)
    cycle_psnr = _psnr(cycle.model_image, vae_round_trip)
    ddpm_psnr = _psnr(ddpm.model_image, vae_round_trip)
    # both codes regenerate the source latents to float32 rounding, so the decoded images equal the
    # VAE's round trip (measured: inf / inf dB)
    assert cycle_psnr >= 50 and ddpm_psnr >= 50
    assert cycle_psnr >= ddpm_psnr - 1
    edited = edit(_request(image, same), "cyclediffusion", pipe=tiny_sd)
    assert _psnr(edited.model_image, vae_round_trip) < 30  # another prompt edits (measured 19 dB)


def test_cyclediffusion_nfe_follows_its_card_and_the_cache_keeps_the_code(tiny_sd, image):
    # defaults but 10 steps, skip 3: (10 - 3) * 1 (encoder at guidance 1) + (10 - 3) * 2 = 21
    params = {"num_inference_steps": 10, "skip": 3}
    cache = InversionCache()
    first = edit(_request(image, params), "cyclediffusion", pipe=tiny_sd, inversion_cache=cache)
    second = edit(_request(image, params), "cyclediffusion", pipe=tiny_sd, inversion_cache=cache)
    assert (first.nfe, second.nfe, second.uncached_nfe) == (21, 14, 21)
    assert second.intermediates["inversion_cached"] is True
    assert np.array_equal(np.asarray(first.model_image), np.asarray(second.model_image))
    other_seed = edit(_request(image, params, seed=1), "cyclediffusion", pipe=tiny_sd,
                      inversion_cache=cache)
    assert other_seed.intermediates["inversion_cached"] is False
    # 6 steps, skip 0, encoder guidance 3 (x2), decoder guidance 1 (x1): 12 + 6 = 18
    result = edit(_request(image, {"num_inference_steps": 6, "skip": 0,
                                   "source_guidance_scale": 3.0, "guidance_scale": 1.0}),
                  "cyclediffusion", pipe=tiny_sd)
    assert result.nfe == 18


@pytest.mark.parametrize("params, message", [
    ({"eta": 0.0}, "eta must be in \\(0, 1\\]"),
    ({"num_inference_steps": 10, "skip": 10}, "skip must be in \\[0, 10\\)"),
])
def test_cyclediffusion_refuses_parameters_out_of_range(image, params, message):
    with pytest.raises(ValueError, match=message):
        get_method("cyclediffusion").resolve_params(params)


# --- Pix2Pix-Zero: regularised inversion ---------------------------------------------------------

def _smooth_noise(seed: int = 0) -> torch.Tensor:
    """(1, 4, 32, 32) unit-variance noise with strong spatial correlation (2x2-pooled, upsampled)."""
    coarse = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, scale_factor=4, mode="bilinear")


def test_regularisation_moves_correlated_noise_towards_white_noise():
    noise = _smooth_noise() * 0.5 + 0.3  # correlated, off-centre, too narrow

    def losses(x: torch.Tensor) -> tuple[float, float]:
        return (float(auto_correlation_loss(x, torch.Generator().manual_seed(1))),
                float(kl_divergence(x)))

    pairwise, kl = losses(noise)
    # measured: pairwise 0.249 -> 0.098, KL 1.43 -> 0.92 (defaults: 5 rounds, lambdas 20); a step
    # up either gradient would raise its loss
    assert losses(regularise_noise(noise, torch.Generator().manual_seed(2))) < (
        0.5 * pairwise, 0.7 * kl)
    only_pairwise = losses(regularise_noise(noise, torch.Generator().manual_seed(2),
                                            lambda_kl=0.0))
    assert only_pairwise[0] < 0.5 * pairwise and only_pairwise[1] > 0.99 * kl
    untouched = regularise_noise(noise, torch.Generator(), lambda_ac=0.0, lambda_kl=0.0)
    assert torch.equal(untouched, noise)


def test_regularised_inversion_without_regularisation_is_ddim_inversion(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd, 6)
    latents, cond = encode_image(tiny_sd, image), encode_prompt(tiny_sd, SOURCE)
    plain = ddim_invert(tiny_sd.unet, latents, scheduler, cond)[-1]
    regularised = regularised_ddim_invert(tiny_sd.unet, latents, scheduler, cond,
                                          torch.Generator().manual_seed(0), lambda_ac=0.0,
                                          lambda_kl=0.0)
    assert torch.equal(plain, regularised)
    moved = regularised_ddim_invert(tiny_sd.unet, latents, scheduler, cond,
                                    torch.Generator().manual_seed(0), lambda_kl=0.0)
    assert not torch.allclose(plain, moved)


def test_a_diverging_regularised_inversion_is_refused_with_the_fix(tiny_sd, image):
    # the tiny model's noise predictions have a variance near 0.003: the KL step throws them to a
    # variance of 8, where the pairwise steps (which scale with the variance squared over 8 x 8
    # latent pixels) overshoot
    with pytest.raises(ValueError, match="diverged .* lower lambda_ac and lambda_kl"):
        edit(_request(image, {"num_inference_steps": 4}), "pix2pix-zero", pipe=tiny_sd)


# --- Pix2Pix-Zero: edit direction and cross-attention guidance -----------------------------------

TINY_P2PZ = {"num_inference_steps": 4, "lambda_kl": 0.0}  # the tiny model's stable regularisation


def test_pix2pix_zero_with_an_empty_direction_reproduces_its_reconstruction(tiny_sd, image,
                                                                            tmp_path):
    with pytest.warns(EditInputWarning, match="nothing to edit"):
        same = edit(_request(image, TINY_P2PZ, target=SOURCE), "pix2pix-zero", pipe=tiny_sd)
    assert same.intermediates["edit_direction_norm"] == 0.0
    # the cross-attention loss stays 0, so the edit retraces the reference pass; only the UNet's
    # batch of 2 against 1 rounds differently (measured 86 dB)
    assert _psnr(same.model_image, same.intermediates["reconstruction"]) > 60
    sentences = tmp_path / "cats.txt"
    sentences.write_text("a cat\n\na photo of a cat\n", encoding="utf-8")
    files = {**TINY_P2PZ, "source_sentences": str(sentences), "target_sentences": str(sentences)}
    from_files = edit(_request(image, files), "pix2pix-zero", pipe=tiny_sd)
    assert from_files.intermediates["sentences"] == [2, 2]
    assert _psnr(from_files.model_image, from_files.intermediates["reconstruction"]) > 60
    edited = edit(_request(image, TINY_P2PZ), "pix2pix-zero", pipe=tiny_sd)
    assert edited.intermediates["edit_direction_norm"] > 1  # measured 6.6
    assert _psnr(edited.model_image, edited.intermediates["reconstruction"]) < 30  # measured 15


def test_the_edit_direction_is_the_difference_of_mean_embeddings(tiny_sd):
    source, target = ["a cat", "a photo of a cat"], ["a dog", "a photo of a dog", "a dog, sitting"]
    direction = edit_direction(tiny_sd, source, target)
    means = [torch.cat([encode_prompt(tiny_sd, s) for s in group]).mean(0, keepdim=True)
             for group in (source, target)]
    assert direction.shape == (1, 77, tiny_sd.text_encoder.config.hidden_size)
    assert torch.allclose(direction, means[1] - means[0], atol=1e-5)
    assert sentence_sets(SOURCE, TARGET)[0][1] == f"a photo of {SOURCE}"


def test_cross_attention_guidance_lowers_the_attention_loss(tiny_sd):
    scheduler = ddim_scheduler(tiny_sd, 4)
    t = scheduler.timesteps[1]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    source = encode_prompt(tiny_sd, SOURCE)
    texts = torch.cat([source, encode_prompt(tiny_sd, "a yellow dog in the sky")])
    guide = CrossAttentionGuide()
    with control_attention(tiny_sd.unet, guide):
        guide.mode = "record"
        model_noise(tiny_sd.unet, scheduler, latents, t, source)
        copies = latents.expand(2, -1, -1, -1)
        moved, before = guide_latents(tiny_sd.unet, scheduler, copies, t, texts, guide, 0.5)
        _, after = guide_latents(tiny_sd.unet, scheduler, moved, t, texts, guide, 0.0)
        wrong_way = (2 * copies - moved)  # a step up the gradient
        _, worse = guide_latents(tiny_sd.unet, scheduler, wrong_way, t, texts, guide, 0.0)
    assert float(before) > 0
    assert float(after) < float(before) < float(worse)
    assert set(guide.reference) == {int(t)}  # one reference per timestep
    cross = {name for name in tiny_sd.unet.attn_processors if name.endswith("attn2.processor")}
    assert set(guide.reference[int(t)]) == cross  # every cross-attention layer (7), none other


def test_pix2pix_zero_nfe_and_backward_passes_follow_its_card(tiny_sd, image):
    # 4 steps: 4 (inversion) + 4 (reference) + 4 * 4 (guided pass and prediction, batches of 2)
    first = edit(_request(image, TINY_P2PZ), "pix2pix-zero", pipe=tiny_sd)
    assert (first.nfe, first.backward_passes) == (24, 4)
    # 3 steps without guidance: 3 + 3 + 2 * 3 (batches of 1), still 3 backward passes
    plain = edit(_request(image, {**TINY_P2PZ, "num_inference_steps": 3, "guidance_scale": 1.0}),
                 "pix2pix-zero", pipe=tiny_sd)
    assert (plain.nfe, plain.backward_passes) == (12, 3)
    unguided = edit(_request(image, {**TINY_P2PZ, "num_inference_steps": 3, "xa_guidance": 0.0}),
                    "pix2pix-zero", pipe=tiny_sd)
    assert (unguided.nfe, unguided.backward_passes) == (3 + 3 + 2 * 3, 0)


@pytest.mark.parametrize("params, message", [
    ({"source_sentences": "cats.txt"}, "give both source_sentences and target_sentences"),
    ({"source_sentences": "missing.txt", "target_sentences": "missing.txt"},
     "source_sentences='missing.txt': cannot read the file \\(not found\\)"),
    ({"source_sentences": "empty.txt", "target_sentences": "empty.txt"}, "holds no sentence"),
    ({"xa_guidance": -0.1}, "xa_guidance must be >= 0"),
])
def test_pix2pix_zero_refuses_bad_parameters_before_loading(tmp_path, monkeypatch, params,
                                                           message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        get_method("pix2pix-zero").resolve_params(params)


# --- Energy-Based Cross Attention ----------------------------------------------------------------

def test_bayesian_context_update_is_the_gradient_of_the_energy():
    generator = torch.Generator().manual_seed(0)
    batch, heads, queries, tokens, dim, width = 2, 3, 10, 5, 4, 6
    query = torch.randn(batch, heads, queries, dim, generator=generator, dtype=torch.float64)
    context = torch.randn(batch, tokens, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(heads * dim, width, generator=generator, dtype=torch.float64)
    scale, gamma_attn, gamma_norm = 0.5, 0.3, 0.2

    def keys(c: torch.Tensor) -> torch.Tensor:
        return (c @ weight.T).view(batch, tokens, heads, dim).transpose(1, 2)

    variable = context.clone().requires_grad_(True)
    key = keys(variable)
    attention = (scale * query @ key.transpose(-1, -2)).logsumexp(dim=2).sum() / scale
    norm = key.transpose(1, 2).reshape(batch, tokens, -1).pow(2).sum(-1).logsumexp(-1).sum() / 2
    (gradient,) = torch.autograd.grad(gamma_attn * attention - gamma_norm * norm, variable)
    update = bayesian_context_update(query, keys(context), scale, weight, gamma_attn, gamma_norm)
    # a softmax over the wrong axis (the tokens), a per-head norm term or a flipped sign fails
    assert torch.allclose(update.double(), gradient, atol=1e-5)


def test_editorial_prompts_are_the_words_each_prompt_lacks(tiny_sd):
    assert editorial_prompts(tiny_sd.tokenizer, SOURCE, TARGET) == ("blue", "red")
    assert editorial_prompts(tiny_sd.tokenizer, "a cat on grass",
                             "a cat and a dotted dog on grass") == ("and a dotted dog", "")
    assert editorial_prompts(tiny_sd.tokenizer, SOURCE, TARGET, "prompts") == (TARGET, SOURCE)
    assert step_schedule(0.5, 0.5, 5) == [0.0, 0.0, 0.5, 0.5, 0.5]


TINY_EBCA = {"num_inference_steps": 4, "lambda_kl": 0.0}


def test_ebca_with_its_steps_and_weights_at_zero_is_the_plain_sampler(tiny_sd, image):
    off = {**TINY_EBCA, "conjunction_alpha": 0.0, "negation_alpha": 0.0,
           "conjunction_gamma": 0.0, "negation_gamma": 0.0, "alpha_tau": 0.0, "gamma_tau": 0.0}
    result = edit(_request(image, off), "ebca", pipe=tiny_sd)
    noise, _ = regularised_inversion(tiny_sd, image, SOURCE, 4, torch.Generator().manual_seed(0),
                                     lambda_ac=20.0, lambda_kl=0.0, num_reg_steps=5,
                                     num_ac_rolls=5)
    caption = encode_prompt(tiny_sd, SOURCE)
    plain = decode_latents(tiny_sd, ddim_sample(tiny_sd.unet, noise, ddim_scheduler(tiny_sd, 4),
                                                caption, caption, 7.5))
    assert np.array_equal(np.asarray(result.model_image), np.asarray(plain))
    # each part on its own changes the edit: the composition, the editorial updates (which act
    # through the composition), the main context's update
    composed = edit(_request(image, {**off, "conjunction_alpha": 0.75}), "ebca", pipe=tiny_sd)
    updated = edit(_request(image, {**off, "conjunction_alpha": 0.75, "conjunction_gamma": 0.5}),
                   "ebca", pipe=tiny_sd)
    main = edit(_request(image, {**off, "gamma_attn": 0.05, "gamma_norm": 0.05}), "ebca",
                pipe=tiny_sd)
    images = [np.asarray(r.model_image) for r in (result, composed, updated, main)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])


def test_ebca_nfe_follows_its_card_and_shares_pix2pix_zeros_inversion(tiny_sd, image):
    cache = InversionCache()
    p2pz = edit(_request(image, TINY_P2PZ), "pix2pix-zero", pipe=tiny_sd, inversion_cache=cache)
    shared = edit(_request(image, TINY_EBCA), "ebca", pipe=tiny_sd, inversion_cache=cache)
    assert p2pz.intermediates["inversion_cached"] is False
    assert shared.intermediates["inversion_cached"] is True
    assert (shared.nfe, shared.uncached_nfe) == (2 * 4, 4 + 2 * 4)
    assert edit(_request(image, {**TINY_EBCA, "num_inference_steps": 6}), "ebca",
                pipe=tiny_sd).nfe == 6 + 2 * 6


@pytest.mark.parametrize("params, message", [
    ({"guidance_scale": 1.0}, "guidance_scale must be > 1"),
    ({"negation_alpha": 1.0}, "negation_alpha must be in \\[0, 1\\)"),
    ({"alpha_tau": 1.5}, "alpha_tau is a fraction of the steps"),
    ({"editorial": "sentences"}, "editorial must be one of words, prompts, got 'sentences'"),
])
def test_ebca_refuses_parameters_out_of_range(params, message):
    with pytest.raises(ValueError, match=message):
        get_method("ebca").resolve_params(params)


# --- every method leaves the UNet as it found it -------------------------------------------------

def _unet_state(unet: torch.nn.Module) -> tuple:
    processors = unet.attn_processors
    return ({name: id(p) for name, p in processors.items()}, len(unet._forward_pre_hooks),
            len(unet._forward_hooks), [p.requires_grad for p in unet.parameters()],
            [p.grad is None for p in unet.parameters()], unet.training, unet.dtype)


@pytest.mark.parametrize("method, params, fail_at, swaps", [
    ("cyclediffusion", {"num_inference_steps": 4, "skip": 1}, 5, False),
    ("pix2pix-zero", TINY_P2PZ, 6, True),  # in the reference pass
    ("pix2pix-zero", TINY_P2PZ, 10, True),  # in the guided edit
    ("ebca", {**TINY_EBCA, "alpha_tau": 0.0, "gamma_tau": 0.0}, 6, True),
])
def test_the_unet_is_restored_after_the_edit_and_when_it_raises(tiny_sd, image, method, params,
                                                                fail_at, swaps):
    before = _unet_state(tiny_sd.unet)
    edit(_request(image, params), method, pipe=tiny_sd)
    assert _unet_state(tiny_sd.unet) == before
    calls, swapped = [], []

    def fail(module, args, kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            swapped.append(any(id(p) != before[0][name]
                               for name, p in module.attn_processors.items()))
            raise RuntimeError("injected failure")

    handle = tiny_sd.unet.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            edit(_request(image, params), method, pipe=tiny_sd)
    finally:
        handle.remove()
    assert swapped == [swaps]  # the failure hit while the method's processors were installed
    assert _unet_state(tiny_sd.unet) == before
