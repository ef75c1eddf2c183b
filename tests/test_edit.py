"""The core API on the tiny pipelines: NFE accounting, determinism, parameters, and the one input
policy of every method (masks, prompts, every input checked before a model loads)."""

from __future__ import annotations

import numpy as np
import warnings

import pytest
from PIL import Image
from typer.testing import CliRunner

from editeval.cli import app
from editeval.core import EditRequest, get_method, list_methods
from editeval.data import ImageLoadError, MaskError
from editeval.editing import EditInputError, EditInputWarning, edit


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 120x90 smooth RGB test image (not square, not a multiple of 8)."""
    y, x = np.mgrid[0:90, 0:120]
    rgb = np.stack([x * 2, y * 2, (x + y)], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize(
    "strength, steps, expected",
    [(0.5, 50, 50), (0.3, 10, 6), (0.75, 20, 30), (1.0, 8, 16), (0.29, 100, 56)],
)
def test_sdedit_nfe_follows_its_formula(tiny_sd, photo, strength, steps, expected):
    # formula: 2 * floor(num_inference_steps * strength); 0.29 * 100 is 28.999... in floats
    request = EditRequest(photo, target_prompt="a dog", params={
        "strength": strength, "num_inference_steps": steps})
    assert edit(request, "sdedit", pipe=tiny_sd).nfe == expected == 2 * int(steps * strength)


def test_sdedit_without_guidance_counts_one_pass_per_step(tiny_sd, photo):
    request = EditRequest(photo, target_prompt="a dog", params={
        "strength": 0.5, "num_inference_steps": 20, "guidance_scale": 1.0})
    assert edit(request, "sdedit", pipe=tiny_sd).nfe == 10


def test_instructpix2pix_nfe_is_three_per_step(tiny_ip2p, photo):
    request = EditRequest(photo, instruction="make it snow", params={"num_inference_steps": 7})
    result = edit(request, "instructpix2pix", pipe=tiny_ip2p)
    assert result.nfe == 21
    assert result.params == {"num_inference_steps": 7, "guidance_scale": 7.5,
                             "image_guidance_scale": 1.5}


@pytest.mark.parametrize("method, field", [("sdedit", "target_prompt"),
                                           ("instructpix2pix", "instruction")])
def test_equal_seeds_give_bit_identical_edits(tiny_sd, tiny_ip2p, photo, method, field):
    pipe = tiny_sd if method == "sdedit" else tiny_ip2p

    def run(seed: int) -> np.ndarray:
        request = EditRequest(photo, seed=seed, params={"num_inference_steps": 10},
                              **{field: "a snowy street"})
        return np.asarray(edit(request, method, pipe=pipe).model_image)

    first, again, other = run(1), run(1), run(2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_result_geometry_and_metadata(tiny_sd, photo):
    result = edit(EditRequest(photo, target_prompt="a dog", params={"num_inference_steps": 4}),
                  "sdedit", pipe=tiny_sd)
    assert result.image.size == (120, 90)  # back at the source size
    assert result.model_image.size == (64, 48)  # long side 64, sides multiples of 8
    assert result.method == "sdedit" and result.seed == 0 and result.wall_seconds > 0
    assert result.model.endswith("sd")


def test_unknown_parameter_lists_the_valid_ones(tiny_sd, photo):
    with pytest.raises(ValueError, match="no parameter strenght.*strength=0.5"):
        edit(EditRequest(photo, target_prompt="x", params={"strenght": 0.3}), "sdedit",
             pipe=tiny_sd)
    with pytest.raises(ValueError, match="not a float"):
        edit(EditRequest(photo, target_prompt="x", params={"strength": "high"}), "sdedit",
             pipe=tiny_sd)


def test_missing_input_names_the_flag(tiny_ip2p, photo):
    with pytest.raises(EditInputError, match="needs instruction \\(--instruction TEXT\\)"):
        edit(EditRequest(photo, target_prompt="a dog"), "instructpix2pix", pipe=tiny_ip2p)


def test_instructpix2pix_refuses_a_text_to_image_unet(tiny_sd, photo):
    with pytest.raises(ValueError, match="8-channel"):
        edit(EditRequest(photo, instruction="x"), "instructpix2pix", pipe=tiny_sd)


def test_unknown_method_lists_the_registry():
    with pytest.raises(KeyError, match="sdedit"):
        get_method("p2p-typo")


def test_cards_cite_papers_and_defaults():
    cards = {card.name: card for card in list_methods()}
    assert cards["sdedit"].paper.arxiv_id == "2108.01073"
    assert cards["sdedit"].defaults["strength"] == 0.5
    assert cards["instructpix2pix"].paper.arxiv_id == "2211.09800"
    assert cards["instructpix2pix"].defaults == {
        "num_inference_steps": 100, "guidance_scale": 7.5, "image_guidance_scale": 1.5}


# --- one input policy for every method (masks, prompts, checks before any model loads) ---------

FAST = {"num_inference_steps": 2}
LONG = " ".join(["a"] * 117)  # 117 word tokens + start and end: 119 CLIP tokens


def _mask(tmp_path, name: str, size: tuple[int, int], fill: int = 0,
          box: tuple[int, int, int, int] | None = None, value: int = 255):
    """A mask file: ``fill`` everywhere, ``value`` (white) inside ``box``."""
    mask = Image.new("L", size, fill)
    if box:
        mask.paste(value, box)
    mask.save(tmp_path / name)
    return tmp_path / name


@pytest.fixture
def no_model(monkeypatch):
    """Make loading any model a test failure; returns the list of attempted loads."""
    import editeval.models

    calls = []

    def load_pipeline(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"a model was loaded before the inputs were checked: {args}")

    monkeypatch.setattr(editeval.models, "load_pipeline", load_pipeline)
    return calls


def test_a_method_warns_about_the_inputs_it_ignores_and_notes_them(tiny_sd, photo, tmp_path):
    mask = _mask(tmp_path, "m.png", (120, 90), box=(60, 0, 120, 90))
    request = EditRequest(photo, target_prompt="a dog", instruction="make it a dog", mask=mask,
                          params=FAST)
    with pytest.warns(EditInputWarning) as caught:
        result = edit(request, "sdedit", pipe=tiny_sd)
    note = ("sdedit does not use the instruction (--instruction TEXT) or the mask (--mask FILE); "
            "ignored")
    assert [str(w.message) for w in caught if w.category is EditInputWarning] == [note]
    assert result.warnings == [note] and result.intermediates["warnings"] == [note]
    # inputs the method uses give no note
    plain = edit(EditRequest(photo, target_prompt="a dog", params=FAST), "sdedit", pipe=tiny_sd)
    assert plain.warnings == [] and "warnings" not in plain.intermediates


@pytest.mark.parametrize("fill, what", [(0, "all black"), (255, "all white")])
def test_an_unusable_mask_is_refused_naming_the_file(tiny_sd, photo, tmp_path, fill, what):
    mask = _mask(tmp_path, "flat.png", (120, 90), fill=fill)
    with pytest.raises(MaskError, match=f"mask '{mask}' is {what}"):
        edit(EditRequest(photo, target_prompt="a dog", mask=mask, params=FAST), "masactrl",
             pipe=tiny_sd)


def test_a_dim_mask_is_refused_saying_where_masks_are_binarised(tiny_sd, photo, tmp_path):
    # a grey-100 region is binarised to keep (below 128): the message must say why "all black"
    mask = _mask(tmp_path, "dim.png", (120, 90), fill=0, box=(10, 10, 60, 60), value=100)
    with pytest.raises(MaskError, match="all black: no pixel is at grey level 128 or more"):
        edit(EditRequest(photo, target_prompt="a dog", mask=mask, params=FAST), "masactrl",
             pipe=tiny_sd)


def test_a_full_mask_from_a_dataset_means_no_mask(tiny_sd, photo, tmp_path):
    mask = _mask(tmp_path, "style.png", (120, 90), fill=255)
    request = EditRequest(photo, target_prompt="a dog", mask=mask, from_dataset=True,
                          params=FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole-image edit is normal in a benchmark: no warning
        result = edit(request, "masactrl", pipe=tiny_sd)
    assert result.intermediates["mask_guided"] is False and result.warnings == []
    # an empty mask from a dataset is still refused: it marks nothing to edit
    black = _mask(tmp_path, "black.png", (120, 90))
    with pytest.raises(MaskError, match="all black"):
        edit(EditRequest(photo, target_prompt="a dog", mask=black, from_dataset=True,
                         params=FAST), "masactrl", pipe=tiny_sd)


def test_a_mask_of_another_aspect_ratio_is_refused_unless_resized(tiny_sd, photo, tmp_path):
    square = _mask(tmp_path, "square.png", (100, 100), box=(50, 0, 100, 100))
    with pytest.raises(MaskError, match=f"mask '{square}' is 100x100 .*the image is 120x90.*"
                                        "--resize-mask"):
        edit(EditRequest(photo, target_prompt="a dog", mask=square, params=FAST), "masactrl",
             pipe=tiny_sd)
    stretched = edit(EditRequest(photo, target_prompt="a dog", mask=square, resize_mask=True,
                                 params=FAST), "masactrl", pipe=tiny_sd)
    assert stretched.intermediates["mask_guided"] is True
    # the same aspect ratio at another resolution (within a pixel of rounding) needs no flag
    half = _mask(tmp_path, "half.png", (61, 45), box=(30, 0, 61, 45))
    scaled = edit(EditRequest(photo, target_prompt="a dog", mask=half, params=FAST), "masactrl",
                  pipe=tiny_sd)
    assert scaled.intermediates["mask_guided"] is True


def test_an_unreadable_mask_is_reported_as_a_mask(photo, tmp_path, no_model):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    for source in (broken, tmp_path / "absent.png"):
        with pytest.raises(ImageLoadError, match=f"cannot load mask '{source}': "):
            edit(EditRequest(photo, target_prompt="a dog", mask=source), "masactrl",
                 model="tiny")
    assert no_model == []


@pytest.mark.parametrize("method, fields, flag", [
    ("sdedit", {"target_prompt": " \t "}, "target prompt \\(--target-prompt TEXT\\)"),
    ("p2p", {"source_prompt": "a cat", "target_prompt": "   "},
     "target prompt \\(--target-prompt TEXT\\)"),
    ("instructpix2pix", {"instruction": "\n"}, "instruction \\(--instruction TEXT\\)"),
])
def test_a_whitespace_only_prompt_is_empty(photo, no_model, method, fields, flag):
    with pytest.raises(EditInputError, match=f"method '{method}' needs {flag}"):
        edit(EditRequest(photo, **fields), method, model="tiny")


@pytest.mark.parametrize("method, fields", [
    ("sdedit", {"target_prompt": LONG}),
    ("p2p", {"source_prompt": "a cat", "target_prompt": LONG}),
    ("pnp", {"target_prompt": LONG}),
])
def test_an_over_long_prompt_is_refused_with_its_token_count(tiny_sd, photo, method, fields):
    with pytest.raises(EditInputError, match="target prompt \\(--target-prompt TEXT\\) has 119 "
                                             "tokens, more than the text encoder's 77.*"
                                             "--truncate-prompts"):
        edit(EditRequest(photo, params=FAST, **fields), method, pipe=tiny_sd)


def test_an_over_long_prompt_is_truncated_only_when_asked(tiny_sd, photo):
    from editeval.models.tokenizer import count_tokens, truncate_prompt

    kept = truncate_prompt(tiny_sd.tokenizer, LONG)
    assert kept == " ".join(["a"] * 75) and count_tokens(tiny_sd.tokenizer, kept) == 77
    # cut at a word boundary, never inside a word
    assert truncate_prompt(tiny_sd.tokenizer, "photograph " * 100).split()[-1] == "photograph"
    request = EditRequest(photo, target_prompt=LONG, truncate_prompts=True, params=FAST)
    with pytest.warns(EditInputWarning, match="truncated"):
        result = edit(request, "sdedit", pipe=tiny_sd)
    note = f"target prompt truncated from 119 to 77 tokens (the text encoder's limit): {kept!r}"
    assert result.warnings == [note]
    untruncated = edit(EditRequest(photo, target_prompt=kept, params=FAST), "sdedit",
                       pipe=tiny_sd)
    assert np.array_equal(np.asarray(result.image), np.asarray(untruncated.image))


def test_identical_prompts_warn_for_a_prompt_pair_method(tiny_sd, photo):
    request = EditRequest(photo, source_prompt="A cat  on a sofa", target_prompt="a cat on a sofa",
                          params=FAST)
    with pytest.warns(EditInputWarning, match="source and target prompts are identical"):
        result = edit(request, "p2p", pipe=tiny_sd)
    assert len(result.warnings) == 1 and "nothing to edit" in result.warnings[0]


@pytest.mark.parametrize("fields, error, message", [
    ({"image": "absent.png"}, ImageLoadError, "cannot load image 'absent.png': file not found"),
    ({"mask": "absent-mask.png"}, ImageLoadError, "cannot load mask 'absent-mask.png'"),
    ({"target_prompt": " "}, EditInputError, "needs target prompt"),
    ({"params": {"strenght": 0.4}}, ValueError, "no parameter strenght"),
    ({"params": {"num_inference_steps": "many"}}, ValueError, "not a int"),
])
def test_every_input_is_checked_before_the_model_loads(photo, no_model, fields, error, message):
    request = EditRequest(**{"image": photo, "target_prompt": "a dog", **fields})
    with pytest.raises(error, match=message):
        edit(request, "masactrl", model="tiny")
    assert no_model == []


# one value out of range per method with a range check: the check must run before the model
# loads (a method that checked inside its body, after load_pipeline, fails with no_model != [])
@pytest.mark.parametrize("method, params, message", [
    ("sdedit", {"strength": 2.0}, r"strength must be in \(0, 1\], got 2.0"),
    ("sdedit", {"strength": 0.01, "num_inference_steps": 10}, "leaves no denoising step"),
    ("pnp", {"feature_injection": 1.5}, r"feature_injection is a fraction .* got 1.5"),
    ("p2p", {"inversion": "ddpm"}, "inversion must be one of ddim, null-text"),
    ("null-text", {"blend_threshold": 1.0}, r"null-text: blend_threshold must be in \(0, 1\)"),
    ("direct-inversion", {"cross_replace_steps": -0.1}, "cross_replace_steps is a fraction"),
    ("ddpm-inversion", {"skip": 100}, r"skip must be in \[0, 100\)"),
    ("edict", {"mix_weight": 0.0}, r"mix_weight must be in \(0, 1\]"),
    ("masactrl", {"start_layer": 16}, "0..15; got 16"),
    ("aidi", {"anderson_memory": -1}, "anderson_memory must be >= 0"),
])
def test_a_parameter_out_of_range_is_refused_before_the_model_loads(photo, no_model, method,
                                                                    params, message):
    request = EditRequest(photo, source_prompt="a cat", target_prompt="a dog", params=params)
    with pytest.raises(ValueError, match=message):
        edit(request, method, model="tiny")
    assert no_model == []


def test_a_black_mask_is_refused_before_the_model_loads(photo, tmp_path, no_model):
    black = _mask(tmp_path, "black.png", (120, 90))
    with pytest.raises(MaskError, match="all black"):
        edit(EditRequest(photo, target_prompt="a dog", mask=black), "masactrl", model="tiny")
    assert no_model == []


cli = CliRunner()


def test_cli_reports_a_missing_image_before_loading_a_model(tmp_path, no_model):
    result = cli.invoke(app, ["edit", str(tmp_path / "absent.jpg"), "--method", "sdedit",
                              "--target-prompt", "a dog", "--model", "tiny"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: cannot load image '{tmp_path / 'absent.jpg'}': "
                                     "file not found; check the path")
    assert no_model == []


def test_cli_prints_input_warnings_as_one_line_and_passes_the_policy_flags(photo, tmp_path):
    source = tmp_path / "photo.png"
    photo.save(source)
    mask = _mask(tmp_path, "m.png", (120, 90), box=(60, 0, 120, 90))
    out = tmp_path / "out.png"
    result = cli.invoke(app, ["edit", str(source), "--method", "sdedit", "--target-prompt", LONG,
                              "--mask", str(mask), "--model", "tiny", "-p",
                              "num_inference_steps=2", "-o", str(out), "--truncate-prompts"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "warning: sdedit does not use the mask (--mask FILE); ignored" in lines
    assert any(line.startswith("warning: target prompt truncated from 119 to 77 tokens")
               for line in lines)
    assert "warnings.warn" not in result.output and "EditInputWarning" not in result.output
    square = _mask(tmp_path, "square.png", (90, 90), box=(45, 0, 90, 90))
    args = ["edit", str(source), "--method", "masactrl", "--target-prompt", "a dog", "--mask",
            str(square), "--model", "tiny", "-p", "num_inference_steps=2", "-o", str(out)]
    refused = cli.invoke(app, args)
    assert refused.exit_code == 2 and "--resize-mask" in refused.output
    assert cli.invoke(app, [*args, "--resize-mask"]).exit_code == 0
