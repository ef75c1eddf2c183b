"""SEGA, LEDITS and LEDITS++: the edit concepts read off a prompt pair, semantic guidance and the
implicit masks computed by hand, each method's edit guidance 0 equal to its plain sampler bit for
bit, NFE against the cards, restored UNet state, and LEDITS++ at sizes where diffusers crashes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, get_method
from editeval.core.types import EditInputs
from editeval.diffusion.attention import control_attention
from editeval.diffusion.ddim import ddim_sample, ddim_scheduler, model_noise
from editeval.diffusion.dpm_solver_inversion import (
    dpm_solver_invert,
    dpm_solver_sample,
    dpm_solver_timesteps,
)
from editeval.diffusion.inversion import ddim_trajectory
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import decode_latents, encode_image, encode_prompt
from editeval.diffusion.semantic_guidance import (
    EditConcept,
    SemanticGuidance,
    derive_concepts,
    parse_concepts,
)
from editeval.editing import edit
from editeval.methods.training_free.ledits_pp import (
    ConceptAttention,
    attention_mask,
    noise_mask,
)

SOURCE, TARGET = "a large green diamond on grass", "a large red circle on grass"
CONCEPTS = ["+red circle", "-green diamond"]
FAST = {"sega": {"num_inference_steps": 5, "edit_warmup_steps": 1},
        "ledits": {"num_inference_steps": 8, "skip": 3},
        "ledits++": {"num_inference_steps": 5}}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth 64x64 RGB image (the tiny model's resolution)."""
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _edit(pipe, image, method, cache=None, seed=0, **params):
    request = EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, seed=seed,
                          params={**FAST[method], **params})
    return edit(request, method, pipe=pipe, inversion_cache=cache)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


# --- edit concepts -------------------------------------------------------------------------------

def test_concepts_are_the_runs_of_words_the_prompts_do_not_share(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    assert [str(c) for c in derive_concepts(tokenizer, SOURCE, TARGET)] == CONCEPTS
    # a refinement: runs split by a shared word are separate concepts
    assert [str(c) for c in derive_concepts(
        tokenizer, "a yellow dotted triangle pointing down on snow",
        "a red dotted square on snow")] == ["+red", "+square", "-yellow", "-triangle pointing down"]
    # removal: the dropped clause is one concept to remove, its comma stripped
    assert derive_concepts(tokenizer, "a red circle on the left, a blue square, on sand",
                           "a red circle on the left, on sand") == (EditConcept("a blue square",
                                                                                True),)
    assert derive_concepts(tokenizer, SOURCE, SOURCE) == ()


def test_concepts_written_by_hand():
    assert parse_concepts(" +red circle , -green diamond,blue ") == (
        EditConcept("red circle"), EditConcept("green diamond", True), EditConcept("blue"))
    assert parse_concepts("  ") == ()
    for bad in ("+red,,-blue", "+red, -", "+"):
        with pytest.raises(ValueError, match="names no concept"):
            parse_concepts(bad)


# --- semantic guidance by hand -------------------------------------------------------------------

class _ScalingUNet(torch.nn.Module):
    """A stand-in denoiser: the noise estimate of row b is its latents times the first value of
    its text embedding, so every prompt's estimate is known by hand."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=sample * encoder_hidden_states[:, :1, :1, None])


_EPSILON = SimpleNamespace(config=SimpleNamespace(prediction_type="epsilon"),
                           alphas_cumprod=torch.ones(1000))


def _text(value: float) -> torch.Tensor:
    return torch.full((1, 77, 4), value)


def _sega(concepts, values, **options) -> SemanticGuidance:
    # estimates: unconditional 1 x, prompt 2 x, concept i values[i] x
    settings = {"scale": 2.0, "threshold": 0.75, "warmup": 0, "momentum_scale": 0.0,
                "momentum_beta": 0.5, **options}
    return SemanticGuidance(_ScalingUNet(), _EPSILON, _text(2.0), _text(1.0), 7.5, concepts,
                            torch.cat([_text(v) for v in values]), **settings)


# two channels at different scales: a per-channel quantile keeps the top quarter of each
LATENTS = torch.stack([torch.arange(16.0), 10 * torch.arange(16.0)]).view(1, 2, 4, 4)
TOP_QUARTER = (torch.arange(16) >= 12).view(1, 1, 4, 4).expand(1, 2, 4, 4)


def test_semantic_guidance_thresholds_each_channel_and_reverses_removals():
    x = LATENTS
    eps = _sega([EditConcept("add"), EditConcept("remove", True)], [3.0, 0.0])(0, 0, x)
    # u + 7.5 (2x - x) + top quarter of 2 (3x - x) per channel - top quarter of 2 (0 - x)
    expected = x + 7.5 * x + torch.where(TOP_QUARTER, 4 * x, 0) + torch.where(TOP_QUARTER, 2 * x, 0)
    assert torch.allclose(eps, expected)  # a quantile over the whole latent would keep only
    # channel 1's values, a sign not flipped for the removal would give 4x - 2x


def test_semantic_guidance_builds_momentum_during_warmup_and_applies_it_after():
    x = LATENTS
    sega = _sega([EditConcept("add")], [3.0], threshold=0.0, warmup=1, momentum_scale=0.5,
                 momentum_beta=0.6)
    term = 2 * (3 * x - x)
    assert torch.allclose(sega(0, 0, x), x + 7.5 * x)  # warming up: guidance only
    # step 1: term + s_m v with v = (1 - beta) term from step 0
    assert torch.allclose(sega(1, 0, x), x + 7.5 * x + term + 0.5 * 0.4 * term)


def test_semantic_guidance_averages_the_warm_concepts_while_others_warm_up():
    x = LATENTS
    sega = _sega([EditConcept("a"), EditConcept("b")], [3.0, 5.0], threshold=0.0, warmup=[0, 3])
    assert torch.allclose(sega(0, 0, x), x + 7.5 * x + 2 * (3 * x - x))  # concept a's term / 1
    sega = _sega([EditConcept("a"), EditConcept("b")], [3.0, 5.0], threshold=0.0, warmup=[0, 0])
    assert torch.allclose(sega(0, 0, x), x + 7.5 * x + 2 * (3 * x - x) + 2 * (5 * x - x))
    with pytest.raises(ValueError, match="one value per edit concept"):
        _sega([EditConcept("a"), EditConcept("b")], [3.0, 5.0], warmup=[0, 1, 2])


# --- LEDITS++'s masks by hand --------------------------------------------------------------------

def test_attention_mask_sums_the_concepts_words_smooths_and_thresholds():
    maps = torch.zeros(4, 4, 77)
    maps[0, 0, 1] = 1.0  # the concept's word attends to the top-left corner
    maps[3, 3, 2] = 5.0  # the next token (padding for a one-word concept) elsewhere
    mask = attention_mask(maps, words=1, threshold=0.75, size=(8, 8))
    # smoothing spreads the corner over the top-left 2x2 attention cells, the only non-zero ones
    # above the 0.75-quantile; resized to 8x8 they are the top-left 4x4 block
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., :4, :4] = 1.0
    assert torch.equal(mask, expected)
    both = attention_mask(maps, words=2, threshold=0.75, size=(8, 8))
    assert both[..., 6:, 6:].sum() == 4  # with two words the other corner counts too


def test_noise_mask_sums_the_channels_before_the_quantile():
    mask = noise_mask(LATENTS, threshold=0.75)
    assert mask.shape == (1, 1, 4, 4)
    assert torch.equal(mask[0, 0].flatten().bool(), torch.arange(16) >= 12)


def _sd15_shaped_unet():
    """SD 1.5's UNet layout (cross-attention in down blocks 0-2, up blocks 1-3 and the mid
    block) with tiny channel widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)


@pytest.mark.parametrize("latent, mask_size", [((64, 64), (16, 16)), ((65, 97), (17, 25))])
def test_attention_masks_come_from_the_coarsest_down_and_up_maps_at_any_size(latent, mask_size):
    # SD 1.5 at 512 px: 16x16 maps, the paper's (the 8x8 mid block left out); at 776x520 px
    # diffusers looks for int(latent / 4) = 16x24 maps, which the UNet never makes
    unet = _sd15_shaped_unet()
    recorder = ConceptAttention()
    with torch.no_grad(), control_attention(unet, recorder):
        unet(torch.randn(2, 4, *latent), 500, encoder_hidden_states=torch.randn(2, 77, 32))
    maps = recorder.coarsest_maps()
    assert maps.shape == (2, *mask_size, 77)
    assert torch.allclose(maps.sum(-1), torch.ones(2, *mask_size))  # probabilities, averaged


# --- the samplers at edit guidance 0 -------------------------------------------------------------

def test_sega_without_edit_guidance_is_plain_ddim_sampling_from_the_inversion(tiny_sd, image):
    zero = _edit(tiny_sd, image, "sega", edit_guidance_scale=0.0, edit_warmup_steps=0)
    trajectory, _ = ddim_trajectory(tiny_sd, image, SOURCE, 5)
    plain = ddim_sample(tiny_sd.unet, trajectory[-1], ddim_scheduler(tiny_sd, 5),
                        encode_prompt(tiny_sd, SOURCE), encode_prompt(tiny_sd, ""), 7.5)
    assert np.array_equal(np.asarray(zero.image), np.asarray(decode_latents(tiny_sd, plain)))
    edited = _edit(tiny_sd, image, "sega", edit_warmup_steps=0)
    assert np.abs(_pixels(edited) - _pixels(zero)).mean() > 5  # measured 26 grey levels


def test_ledits_without_edit_guidance_is_the_ddpm_inversion_edit(tiny_sd, image):
    params = {"num_inference_steps": 8, "skip": 3}
    ddpm = edit(EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET, params=params),
                "ddpm-inversion", pipe=tiny_sd)
    zero = _edit(tiny_sd, image, "ledits", edit_guidance_scale=0.0)
    assert np.array_equal(np.asarray(zero.image), np.asarray(ddpm.image))
    edited = _edit(tiny_sd, image, "ledits")
    assert np.abs(_pixels(edited) - _pixels(zero)).mean() > 5  # measured 11 grey levels


def test_dpm_solver_noise_maps_regenerate_the_source_exactly(tiny_sd, image):
    scheduler = ddim_scheduler(tiny_sd)
    uncond = encode_prompt(tiny_sd, "")
    latents = encode_image(tiny_sd, image)

    def unconditional(step, t, x):
        return model_noise(tiny_sd.unet, scheduler, x, t, uncond)

    timesteps = dpm_solver_timesteps(1000, 7, 0.15)
    assert timesteps.tolist() == [849, 707, 566, 425, 283, 142, 1]  # official spacing
    noisy, maps = dpm_solver_invert(latents, timesteps, scheduler.alphas_cumprod, unconditional,
                                    generator=torch.Generator().manual_seed(0))
    restored = dpm_solver_sample(noisy[0], maps, timesteps, scheduler.alphas_cumprod,
                                 unconditional)
    assert torch.equal(restored, noisy[-1])
    assert float((restored - latents).norm() / latents.norm()) < 1e-5  # the source, to rounding
    # a sampler that stepped at first order only (or dropped to it at the end) would not return it
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        dpm_solver_timesteps(1000, 900, 0.15)


def test_dpm_solver_steps_are_diffusers_sde_dpm_solver_pp_2m():
    # diffusers' scheduler with the official code's timesteps, its last step to timestep 0
    # (final_sigmas_type="sigma_min") and no drop to first order at the end; a wrong D1
    # coefficient, a first-order-only solver or a noise term without sqrt(1 - e^-2h) would differ
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="sde-dpmsolver++", solver_order=2, lower_order_final=False,
        final_sigmas_type="sigma_min")
    timesteps = dpm_solver_timesteps(1000, 6, 0.15)
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1, 4, 8, 8, generator=generator)
    maps = [torch.randn(1, 4, 8, 8, generator=generator) for _ in timesteps]

    def predict(step, t, x):
        return 0.3 * x + 0.01 * float(t) ** 0.5

    theirs = start
    for t, z in zip(scheduler.timesteps, maps):
        theirs = scheduler.step(predict(0, t, theirs), t, theirs, variance_noise=z).prev_sample
    ours = dpm_solver_sample(start, maps, timesteps, scheduler.alphas_cumprod, predict)
    assert torch.allclose(ours, theirs, atol=1e-5)  # measured 3e-6 of values up to 6.7


def test_ledits_pp_without_edit_guidance_reconstructs_the_source(tiny_sd, image):
    zero = _edit(tiny_sd, image, "ledits++", seed=4, edit_guidance_scale=0.0)
    scheduler = ddim_scheduler(tiny_sd)
    uncond = encode_prompt(tiny_sd, "")
    noisy, _ = dpm_solver_invert(
        encode_image(tiny_sd, image), dpm_solver_timesteps(1000, 5, 0.15),
        scheduler.alphas_cumprod, lambda i, t, x: model_noise(tiny_sd.unet, scheduler, x, t, uncond),
        generator=torch.Generator().manual_seed(4))
    assert np.array_equal(np.asarray(zero.image), np.asarray(decode_latents(tiny_sd, noisy[-1])))
    edited = _edit(tiny_sd, image, "ledits++", seed=4)
    assert np.abs(_pixels(edited) - _pixels(zero)).mean() > 5  # measured 30 grey levels
    assert edited.intermediates["edit_concepts"] == CONCEPTS
    frequency = edited.intermediates["mask_frequency"]
    assert frequency.shape == (8, 8) and 0 < float(frequency.mean()) < 0.5  # masked, not global


# --- NFE and the inversion cache -----------------------------------------------------------------

@pytest.mark.parametrize("method, params, formula", [
    ("sega", {"num_inference_steps": 4}, lambda c: 4 + (2 + c) * 4),
    ("sega", {"num_inference_steps": 6}, lambda c: 6 + (2 + c) * 6),
    ("ledits", {"num_inference_steps": 8, "skip": 3}, lambda c: 2 * 8 + (2 + c) * 5),
    ("ledits", {"num_inference_steps": 10, "skip": 6, "source_guidance_scale": 1.0},
     lambda c: 10 + (2 + c) * 4),
    ("ledits++", {"num_inference_steps": 4}, lambda c: 4 + (1 + c) * 4),
    ("ledits++", {"num_inference_steps": 7, "edit_concepts": "+blue"}, lambda c: 7 + (1 + c) * 7),
])
def test_nfe_follows_the_cards_formula(tiny_sd, image, method, params, formula):
    result = _edit(tiny_sd, image, method, **params)
    concepts = result.intermediates["edit_concepts"]
    assert concepts == (["+blue"] if "edit_concepts" in params else CONCEPTS)
    assert result.nfe == result.uncached_nfe == formula(len(concepts))


def test_ledits_shares_the_ddpm_inversion_and_ledits_pp_reuses_its_own(tiny_sd, image):
    cache = InversionCache()
    edit(EditRequest(image, source_prompt=SOURCE, target_prompt=TARGET,
                     params={"num_inference_steps": 8, "skip": 3}),
         "ddpm-inversion", pipe=tiny_sd, inversion_cache=cache)
    ledits = _edit(tiny_sd, image, "ledits", cache)
    assert ledits.intermediates["inversion_cached"] and ledits.nfe == 4 * 5
    first, second = (_edit(tiny_sd, image, "ledits++", cache) for _ in range(2))
    assert not first.intermediates["inversion_cached"] and second.intermediates["inversion_cached"]
    assert first.nfe - second.nfe == 5
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))


# --- restored state, sizes, parameters -----------------------------------------------------------

def _unet_state(unet):
    return ({name: type(p) for name, p in unet.attn_processors.items()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()),
            unet.dtype, unet.training, [p.requires_grad for p in unet.parameters()][:3])


@pytest.mark.parametrize("method", ["sega", "ledits", "ledits++"])
def test_processors_and_unet_state_are_restored_even_when_the_unet_fails(tiny_sd, image, method):
    unet = tiny_sd.unet
    before = _unet_state(unet)
    _edit(tiny_sd, image, method)
    assert _unet_state(unet) == before
    calls = []
    inverted = {"sega": 5, "ledits": 8, "ledits++": 5}[method]  # UNet calls of the inversion

    def fail_in_the_second_sampling_step(module, args):  # ledits++: in the concepts' call
        calls.append(1)
        if len(calls) == inverted + 4:
            raise RuntimeError("UNet failure")

    handle = unet.register_forward_pre_hook(fail_in_the_second_sampling_step)
    try:
        with pytest.raises(RuntimeError, match="UNet failure"):
            _edit(tiny_sd, image, method, seed=len(calls))
    finally:
        handle.remove()
    assert _unet_state(unet) == before


@pytest.mark.parametrize("size", [(768, 256), (200, 120)])
def test_ledits_pp_edits_at_sizes_where_diffusers_crashes(tiny_sd, size):
    # 768 px and non-square: diffusers looks for attention maps at a quarter of the latent size
    # (24x8, 6x3), which the tiny UNet (maps at 1/1 and 1/2) never makes, and its store comes
    # back empty. Called directly: edit() would resize to the tiny model's 64 px. One step, one
    # concept: the 768 px UNet calls take a second each.
    y, x = np.mgrid[0:size[1], 0:size[0]]
    source = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    method = get_method("ledits++")
    inputs = EditInputs(source, source_prompt=SOURCE, target_prompt=TARGET,
                        inversion_cache=InversionCache())

    def run(**params):
        resolved = method.card.resolve_params({"num_inference_steps": 1,
                                               "edit_concepts": "+red circle", **params})
        return method.fn(tiny_sd, inputs, torch.Generator().manual_seed(0), **resolved)

    edited, zero = run(), run(edit_guidance_scale=0.0)
    assert edited.image.size == size
    frequency = edited.intermediates["mask_frequency"]
    assert frequency.shape == (size[1] // 8, size[0] // 8) and 0 < float(frequency.mean()) < 0.5
    assert np.abs(np.asarray(edited.image).astype(int) - np.asarray(zero.image)).mean() > 1


@pytest.mark.parametrize("method, params, message", [
    ("sega", {"edit_threshold": 1.5}, "edit_threshold"),
    ("sega", {"edit_concepts": "+red,,-blue"}, "names no concept"),
    ("sega", {"edit_mom_beta": 1.0}, "edit_mom_beta"),
    ("ledits", {"skip": 8}, "skip must be in"),
    ("ledits", {"edit_warmup_steps": -1}, "edit_warmup_steps"),
    ("ledits++", {"skip": 1.0}, "skip"),
    ("ledits++", {"masking": "both"}, "masking must be one of"),
])
def test_bad_parameters_are_clear_errors(tiny_sd, image, method, params, message):
    with pytest.raises(ValueError, match=message):
        _edit(tiny_sd, image, method, **params)


@pytest.mark.parametrize("method, subcategory", [("sega", "multi-noise-redirection"),
                                                 ("ledits", "multi-noise-redirection"),
                                                 ("ledits++", "inversion-sampling-modification")])
def test_cards_place_the_papers_in_the_survey(method, subcategory):
    card = get_method(method).card
    assert card.subcategory == subcategory and card.strategy == "training-free"
