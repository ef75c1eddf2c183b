"""Prompt-to-Prompt: the aligner, the controller, the edit's properties, NFE and the cards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core import EditRequest, list_methods
from editeval.editing import edit
from editeval.diffusion.attention import AttentionCall
from editeval.diffusion.ddim import ddim_scheduler
from editeval.diffusion.dual_branch import BranchGuidance, sample_branches
from editeval.diffusion.inversion import ddim_trajectory
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import decode_latents, encode_prompt
from editeval.diffusion.p2p_align import align_prompts, global_alignment, parse_equalizer
from editeval.methods.training_free.prompt_to_prompt import PromptToPromptController
from editeval.toyworld.models import WEIGHTS
from editeval.toylab.p2p_quality import word_swap_pairs, word_swap_quality

P2P_FAMILY = ("p2p", "null-text", "negative-prompt-inversion", "proxedit", "direct-inversion")
STEPS = 5


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    return tiny_sd.tokenizer


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 3, y * 3, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


# ------------------------------------------------------------------------------------------------
# The aligner
# ------------------------------------------------------------------------------------------------


def test_global_alignment_by_hand():
    assert global_alignment("abcd", "acd") == [(0, 0), (1, None), (2, 1), (3, 2)]
    assert global_alignment("ab", "xb") == [(None, 0), (0, None), (1, 1)]  # gaps beat mismatches
    # a repeated token pairs with the occurrence next to the rest of the matched run
    assert global_alignment("axab", "ab") == [(0, None), (1, None), (2, 0), (3, 1)]


def test_equal_token_counts_give_a_word_swap(tokenizer):
    alignment = align_prompts(tokenizer, "a red circle on the left", "a blue circle on the left")
    assert alignment.kind == "replace"
    assert torch.equal(alignment.mapper, torch.eye(77)) and torch.equal(alignment.alphas,
                                                                        torch.ones(77))
    assert alignment.blend_words == (("red",), ("blue",))
    assert alignment.source_blend == alignment.target_blend == (2,)  # after the start token


def test_free_form_prompts_give_a_refinement(tokenizer):
    alignment = align_prompts(tokenizer, "A wooden bench in front of a lush green hill with trees",
                              "A lush green hill with trees")
    assert alignment.kind == "refine"
    assert alignment.blend_words == (("a", "wooden", "bench", "in", "front", "of"), ())
    # target tokens: <start> a lush green hill with trees <end>; the source's <start> is token 0,
    # its second "a" token 7, so target token j > 0 takes source token j + 6
    pairs = alignment.mapper.nonzero().tolist()
    assert pairs[:8] == [[0, 0]] + [[j + 6, j] for j in range(1, 8)]
    assert [14, 8] in pairs and [76, 76] in pairs  # padding takes the source's padding
    assert alignment.mapper.sum(0).tolist() == [1.0] * 77 and alignment.alphas.min() == 1


def test_refinement_keeps_new_words_own_attention(tokenizer):
    alignment = align_prompts(tokenizer, "a cat", "a black cat")
    assert alignment.kind == "refine" and alignment.blend_words == ((), ("black",))
    assert alignment.alphas[2] == 0 and alignment.alphas[[0, 1, 3, 4]].tolist() == [1] * 4
    source = torch.softmax(torch.randn(2, 5, 77), -1)
    target = torch.softmax(torch.randn(2, 5, 77), -1)
    edited = alignment.apply(source, target)
    assert torch.equal(edited[..., 2], target[..., 2])  # "black" keeps its own attention
    assert torch.equal(edited[..., 3], source[..., 2])  # "cat" takes the source's "cat"
    assert torch.equal(edited[..., :2], source[..., :2])


def test_equalizer_scales_the_named_words(tokenizer):
    scales = parse_equalizer(tokenizer, "a red circle and a red square", "red:2, square:0.5")
    expected = torch.ones(77)
    expected[[2, 6]], expected[7] = 2.0, 0.5
    assert torch.equal(scales, expected)
    with pytest.raises(ValueError, match="'blue' is not in the target prompt"):
        parse_equalizer(tokenizer, "a red circle", "blue:2")
    with pytest.raises(ValueError, match="not 'word:scale'"):
        parse_equalizer(tokenizer, "a red circle", "red=2")


def test_prompts_longer_than_the_text_encoder_are_refused(tokenizer):
    with pytest.raises(ValueError, match="more than the text encoder's 77"):
        align_prompts(tokenizer, "a " * 100, "a cat")


# ------------------------------------------------------------------------------------------------
# The controller
# ------------------------------------------------------------------------------------------------


def _call(step: int, is_cross: bool, side: int = 4) -> AttentionCall:
    return AttentionCall("x", is_cross, "up", step, 500, side, side)


def test_controller_edits_only_the_conditional_target_in_its_windows(tokenizer):
    alignment = align_prompts(tokenizer, "a red circle", "a blue circle")
    controller = PromptToPromptController(alignment, num_inference_steps=10,
                                          cross_replace_steps=0.8, self_replace_steps=0.4)
    assert (controller.cross_end, controller.self_end) == (8, 4)  # int(0.8 * 11), int(0.4 * 10)
    probs = torch.softmax(torch.randn(4, 2, 16, 77), -1)
    for step, replaced in ((0, True), (7, True), (8, False)):
        out = controller.edit_probs(probs.clone(), _call(step, True))
        assert torch.equal(out[:3], probs[:3])  # u_src, u_tgt, c_src untouched
        assert torch.equal(out[3], probs[2] if replaced else probs[3])
    self_probs = torch.softmax(torch.randn(4, 2, 16, 16), -1)
    assert controller.wants(_call(3, False)) and not controller.wants(_call(4, False))
    assert torch.equal(controller.edit_probs(self_probs.clone(), _call(3, False))[3],
                       self_probs[2])
    assert not controller.wants(_call(0, False, side=32))  # 32 x 32 > P2P's 16 x 16 bound


def test_local_blend_mask_by_hand(tokenizer):
    alignment = align_prompts(tokenizer, "a red circle", "a blue circle")
    controller = PromptToPromptController(alignment, 10, 0.8, 0.4, blend_threshold=0.3)
    maps = torch.zeros(2, 36, 77)
    maps[0, 7, 2] = 1.0  # "red" at (1, 1) of a 6 x 6 map, source branch
    maps[1, 28, 2] = 0.2  # "blue" at (4, 4), target branch
    maps[1, 0, 3] = 5.0  # "circle" is not a blend word
    controller.blend_maps[(6, 6)] = maps
    mask = controller.blend_mask((6, 6))
    source_region = torch.zeros(6, 6)
    source_region[0:3, 0:3] = 1  # 3 x 3 max-pool around (1, 1)
    target_region = torch.zeros(6, 6)
    target_region[3:6, 3:6] = 1
    assert torch.equal(mask[0, 0], source_region)
    assert torch.equal(mask[1, 0], torch.maximum(source_region, target_region))
    latents = torch.stack([torch.zeros(4, 6, 6), torch.ones(4, 6, 6)])
    blended = controller.blend(5, torch.tensor(500), latents)
    assert torch.equal(blended[1, 0], mask[1, 0]) and torch.equal(blended[0], latents[0])


# ------------------------------------------------------------------------------------------------
# The edit on the tiny model
# ------------------------------------------------------------------------------------------------


def _request(photo, source="a red house", target="a blue house", **params) -> EditRequest:
    return EditRequest(photo, source_prompt=source, target_prompt=target,
                       params={"num_inference_steps": STEPS, **params})


def test_identical_prompts_reproduce_the_plain_reconstruction(tiny_sd, photo):
    result = edit(_request(photo, "a red house", "a red house"), "p2p", pipe=tiny_sd)
    trajectory, _ = ddim_trajectory(tiny_sd, photo, "a red house", STEPS)
    plain = sample_branches(tiny_sd.unet, trajectory[-1], ddim_scheduler(tiny_sd, STEPS),
                            encode_prompt(tiny_sd, "a red house"),
                            BranchGuidance(encode_prompt(tiny_sd, ""), 7.5))
    difference = np.abs(np.asarray(result.image, dtype=int)
                        - np.asarray(decode_latents(tiny_sd, plain), dtype=int))
    assert difference.max() <= 1
    assert result.intermediates["blend_words"] == [[], []]


@pytest.mark.parametrize("method", P2P_FAMILY)
def test_nfe_follows_the_card_and_processors_are_restored(tiny_sd, photo, method):
    before = dict(tiny_sd.unet.attn_processors)
    extra = {"null_text_inner_steps": 2, "early_stop_epsilon": 0.0} if method == "null-text" else {}
    result = edit(_request(photo, **extra), method, pipe=tiny_sd)
    optimisation = STEPS * (3 + 2) if method == "null-text" else 0
    assert result.nfe == STEPS + optimisation + 4 * STEPS
    assert result.intermediates["null_text_iterations"] == (STEPS * 2 if optimisation else 0)
    # one backward pass through the UNet per null-text iteration (card), none for the others
    assert result.backward_passes == (STEPS * 2 if optimisation else 0)
    assert result.intermediates["inversion_cached"] is False
    after = tiny_sd.unet.attn_processors
    assert all(after[name] is processor for name, processor in before.items())
    assert not tiny_sd.unet._forward_pre_hooks and not tiny_sd.unet._forward_hooks


def test_a_second_method_reuses_the_cached_inversion(tiny_sd, photo):
    cache = InversionCache()
    first = edit(_request(photo), "p2p", pipe=tiny_sd, inversion_cache=cache)
    again = edit(_request(photo), "p2p", pipe=tiny_sd, inversion_cache=cache)
    assert (first.nfe, again.nfe) == (5 * STEPS, 4 * STEPS)  # the inversion's STEPS NFE saved
    assert again.intermediates["inversion_cached"] is True
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    for method in ("negative-prompt-inversion", "proxedit", "direct-inversion"):
        result = edit(_request(photo), method, pipe=tiny_sd, inversion_cache=cache)
        assert result.nfe == 4 * STEPS and result.intermediates["inversion_cached"] is True
    params = {"null_text_inner_steps": 2, "early_stop_epsilon": 0.0}
    null_text = edit(_request(photo, **params), "null-text", pipe=tiny_sd, inversion_cache=cache)
    assert null_text.nfe == STEPS * (3 + 2) + 4 * STEPS  # the DDIM pivot came from the cache
    assert null_text.intermediates["inversion_cached"] is False  # its embeddings did not
    cached = edit(_request(photo, **params), "null-text", pipe=tiny_sd, inversion_cache=cache)
    assert cached.nfe == 4 * STEPS and cached.intermediates["inversion_cached"] is True


def test_bad_parameters_name_the_fix(tiny_sd, tiny_ip2p, photo):
    with pytest.raises(ValueError, match="inversion must be one of ddim, null-text"):
        edit(_request(photo, inversion="edict"), "p2p", pipe=tiny_sd)
    with pytest.raises(ValueError, match="cross_replace_steps is a fraction"):
        edit(_request(photo, cross_replace_steps=1.5), "p2p", pipe=tiny_sd)
    with pytest.raises(ValueError, match="blend_threshold must be in"):
        edit(_request(photo, blend_threshold=0.0), "proxedit", pipe=tiny_sd)
    with pytest.raises(ValueError, match="'green' is not in the target prompt"):
        edit(_request(photo, equalizer="green:2"), "p2p", pipe=tiny_sd)
    with pytest.raises(ValueError, match="4-channel denoiser"):
        edit(_request(photo), "p2p", pipe=tiny_ip2p)


def test_cards():
    cards = {card.name: card for card in list_methods()}
    papers = {name: cards[name].paper.arxiv_id for name in P2P_FAMILY}
    assert papers == {"p2p": "2208.01626", "null-text": "2211.09794",
                      "negative-prompt-inversion": "2305.16807", "proxedit": "2306.05414",
                      "direct-inversion": "2310.01506"}
    assert cards["null-text"].subcategory == "embeddings-finetuning"
    assert cards["p2p"].subcategory == "attention-modification"
    assert cards["p2p"].defaults["inversion"] == "ddim"
    for name in P2P_FAMILY:
        defaults = cards[name].defaults
        assert (defaults["num_inference_steps"], defaults["guidance_scale"],
                defaults["blend_threshold"]) == (50, 7.5, 0.3)
    assert (cards["p2p"].defaults["cross_replace_steps"],
            cards["p2p"].defaults["self_replace_steps"]) == (0.8, 0.4)
    assert (cards["null-text"].defaults["null_text_inner_steps"],
            cards["null-text"].defaults["early_stop_epsilon"]) == (10, 1e-5)
    assert cards["proxedit"].defaults["proximal_quantile"] == 0.7


# ------------------------------------------------------------------------------------------------
# The toy model: word swaps
# ------------------------------------------------------------------------------------------------

toy_only = pytest.mark.skipif(not (WEIGHTS / "sd" / "model_index.json").exists(),
                              reason=f"toy weights not exported to {WEIGHTS}")


@pytest.fixture(scope="module")
def toy():
    from editeval.models import load_pipeline

    return load_pipeline("toy")


@toy_only
def test_word_swap_really_changes_the_target_branch(toy):
    """The community P2P's replace edit had no effect (diffusers issue #12881): ours must."""
    pair = word_swap_pairs(1, seed=1)[0]  # a colour swap
    assert pair.attribute == "colour"
    cache = InversionCache()

    def run(target: str, **params) -> np.ndarray:
        request = EditRequest(Image.fromarray(pair.source_image), source_prompt=pair.source_prompt,
                              target_prompt=target, params={"local_blend": False,
                                                            "num_inference_steps": 20, **params})
        return np.asarray(edit(request, "p2p", pipe=toy, inversion_cache=cache).image, dtype=float)

    edited = run(pair.target_prompt)
    source = run(pair.source_prompt)  # identical prompts: the source reconstruction
    plain = run(pair.target_prompt, cross_replace_steps=0.0, self_replace_steps=0.0)
    inside = pair.mask
    # Measured mean absolute differences (grey levels), inside / outside the object's mask, at 20
    # steps: edited vs source 61.8 / 4.7, uncontrolled target sampling vs source 62.7 / 4.8,
    # edited vs uncontrolled 1.7 inside (at the default 50 steps: 65.3 / 5.0, 66.5 / 5.2 and
    # 2.0 / 1.2, up to 32 on one pixel). On this model the inverted noise plus the
    # target prompt already recolours the object and keeps the rest; the attention control
    # changes the object's pixels by 2 grey levels (12 before the seventh round's UNet, 2.9 before
    # the eighth). A control that does nothing, like the community implementation's replace
    # edit, gives exactly 0: both runs start from the same inverted noise with the same prompt.
    assert np.abs(edited - source)[inside].mean() > 25
    assert np.abs(edited - source)[~inside].mean() < 10
    assert np.abs(edited - plain)[inside].mean() > 1


@toy_only
def test_word_swap_quality_on_the_toy_model(toy):
    # Measured on these 6 pairs with the shipped weights at 20 steps: negative-prompt inversion +
    # P2P succeeds on 5, unedited-region PSNR 29.3 dB (the mean of 6 pairs, one of them at 17.6
    # dB; at the default 50 steps the same 5 succeed, 28.6 dB, 13.9 dB the lowest). The issue's
    # bar (70% with 25 dB, 50 steps) is measured by benchmarks/inversion.py: plain p2p 100% /
    # 29.2 dB on its 12 pairs (colour swaps 6/6, shape swaps 6/6).
    quality = word_swap_quality(toy, word_swap_pairs(6, seed=3), "negative-prompt-inversion",
                                params={"num_inference_steps": 20})
    assert quality["success"] >= 4 / 6
    assert quality["unedited_psnr"] >= 24.5
    assert quality["nfe"][0] == 20 + 4 * 20
