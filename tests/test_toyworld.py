"""The toy world: deterministic rendering, exact ground truth, the oracle, the editeval-toy split."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from editeval.core.samples import TASKS
from editeval.data import load_dataset
from editeval.toyworld.oracle import attribute_accuracy, parse, score_edit
from editeval.toyworld.pairs import sample_pair
from editeval.toyworld.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    STYLES,
    TEXTURES,
    Scene,
    ToyObject,
    attributes,
    render,
    sample_scene,
)

SCENE = Scene("sand", 7, (
    ToyObject("circle", "red", "striped", "large", "left", 0.5),
    ToyObject("square", "blue", "plain", "small", "middle", 0.4),
    ToyObject("triangle", "green", "dotted", "large", "right", 0.6, "down"),
), "night")
DIGEST = "e4267d966134a5b0"  # sha256 of render(SCENE) in toy world version 2


def test_world_size():
    assert len(BACKGROUNDS) >= 5 and len(SHAPES) >= 5 and len(COLOURS) >= 6
    assert len(TEXTURES) >= 3 and len(STYLES) >= 3


def test_caption_is_plain_english():
    assert SCENE.caption() == (
        "a large red striped circle on the left, a small blue square in the middle and a large "
        "green dotted triangle pointing down on the right, on sand, at night")


def test_rendering_is_deterministic_and_versioned():
    first, again = render(SCENE), render(SCENE)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    # changing this digest means the world changed: bump SPLIT_VERSION and retrain the toy models
    assert hashlib.sha256(first.tobytes()).hexdigest()[:16] == DIGEST
    assert render(SCENE, 128).shape == (128, 128, 3)
    with pytest.raises(ValueError, match="multiples of 32"):
        render(SCENE, 50)


@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_is_identical_outside_the_mask(task):
    rng = np.random.default_rng(123)
    for _ in range(15):
        pair = sample_pair(rng, task)
        changed = (pair.source_image != pair.target_image).any(-1)
        assert changed.any(), pair.instruction
        if task == "style_change":
            assert pair.mask.all()
        else:
            assert not (changed & ~pair.mask).any(), pair.instruction
            assert not pair.mask.all()
        assert attributes(pair.source) != attributes(pair.target)


def test_oracle_recovers_attributes_of_clean_renders():
    rng = np.random.default_rng(99)
    accuracy = np.mean([attribute_accuracy(render(s), s) for s in
                        (sample_scene(rng) for _ in range(120))])
    assert accuracy >= 0.99


def test_oracle_reads_a_known_scene():
    parsed = parse(render(SCENE))
    assert (parsed.style, parsed.background) == ("night", "sand")
    left, middle, right = (parsed.objects[s] for s in ("left", "middle", "right"))
    assert (left.shape, left.colour, left.texture, left.size) == ("circle", "red", "striped", "large")
    assert (middle.shape, middle.colour, middle.texture, middle.size) == ("square", "blue", "plain",
                                                                           "small")
    assert (right.shape, right.pose, right.texture) == ("triangle", "down", "dotted")


def test_oracle_scores_perfect_and_no_op_edits():
    rng = np.random.default_rng(5)
    for task in TASKS:
        pair = sample_pair(rng, task)
        perfect = score_edit(pair.target_image, pair.source_image, pair.source, pair.target,
                             pair.mask)
        assert perfect.success and perfect.accuracy == 10, pair.instruction
        if task != "style_change":
            assert perfect.preservation == 10  # identical outside the mask
        nothing = score_edit(pair.source_image, pair.source_image, pair.source, pair.target,
                             pair.mask)
        assert not nothing.success and nothing.accuracy < perfect.accuracy
        assert perfect.overall > nothing.overall


def test_oracle_preservation_follows_psnr():
    rng = np.random.default_rng(8)
    pair = sample_pair(rng, "texture_change")
    noisy = np.clip(pair.target_image + rng.normal(0, 8, pair.target_image.shape), 0, 255)
    score = score_edit(noisy.astype(np.uint8), pair.source_image, pair.source, pair.target,
                       pair.mask)
    assert 29 < score.unedited_psnr < 31  # sigma 8 noise: 20 log10(255 / 8) = 30.07 dB
    assert score.preservation == round(1 + 9 * (score.unedited_psnr - 10) / 25)


def test_editeval_toy_split(tmp_path):
    dataset = load_dataset("editeval-toy", tmp_path)
    assert len(dataset) == 210
    assert {t: len(dataset.select([t])) for t in TASKS} == {t: 30 for t in TASKS}
    sample = dataset.select(["object_removal"])[0]
    assert sample.instruction.startswith("remove the ")
    assert sample.target_image_path.exists() and sample.mask_path.exists()
    again = load_dataset("editeval-toy", tmp_path)  # loads the built split, same content
    assert [s.instruction for s in again.samples] == [s.instruction for s in dataset.samples]


def test_judge_sample_against_ground_truth():
    from PIL import Image

    from editeval.toyworld.dataset import judge_sample

    samples = load_dataset("editeval-toy").select(per_task=2)
    assert [s.task for s in samples] == [t for t in TASKS for _ in range(2)]
    for sample in samples:
        perfect = judge_sample(sample, Image.open(sample.target_image_path))
        unchanged = judge_sample(sample, Image.open(sample.image_path))
        assert perfect.score.success, sample.id
        assert not unchanged.score.success, sample.id
        if sample.task == "style_change":  # the mask is the whole image
            assert np.isnan(perfect.unedited_psnr_vs_target)
        else:  # ground truth equals the source outside the mask
            assert perfect.unedited_psnr_vs_target == unchanged.unedited_psnr_vs_target == np.inf


def test_verify_table_for_one_method(tmp_path):
    from editeval.toylab.verify import markdown, verify

    report = verify(["sdedit"], per_task=1, out=tmp_path / "run", model="tiny",
                    params={"sdedit": {"num_inference_steps": 4}})
    row = report["sdedit"]
    assert row["n"] == 7 and row["failed"] == 0 and set(row["success"]) == set(TASKS)
    assert row["nfe"] == 2 * int(4 * 0.5)
    again = verify(["sdedit"], per_task=1, out=tmp_path / "run", model="tiny",
                   params={"sdedit": {"num_inference_steps": 4}})
    assert again == report  # resumed: nothing rerun, the same judgements
    lines = markdown(report).splitlines()
    assert lines[0].startswith("| method | paper | add | replace |") and len(lines) == 3
    assert lines[2].startswith("| sdedit | ICLR 2022 |")


def test_verify_write_keeps_what_follows_the_table():
    from editeval.toylab.verify import _after_table

    document = ("# Methods\n\nProduced by `x` on 2026-01-01.\n\n"
                "| method | paper |\n|---|---|\n| sdedit | ICLR 2022 |\n\n"
                "## What the table says\n\nHand-written.\n")
    assert _after_table(document) == "\n## What the table says\n\nHand-written.\n"
    assert _after_table("# Methods\n\nNo table yet.\n") == ""
    assert _after_table("# Methods\n\n| method | paper |\n|---|---|\n") == ""  # table ends the file


def test_generation_accuracy_and_shape_confusion_count_by_slot():
    from editeval.toylab.evaluate import generation_accuracy, shape_confusion
    from editeval.toyworld.oracle import ParsedObject, ParsedScene

    clean = parse(render(SCENE))
    assert generation_accuracy([SCENE], [clean]) == {"background": 1.0, "shape": 1.0, "colour": 1.0}
    # the middle square read as a red circle, nothing on the right, grass for sand
    left = clean.objects["left"]
    wrong = ParsedScene("night", "grass", {
        "left": left,
        "middle": ParsedObject("middle", "circle", "red", "plain", "small", None, 40),
    })
    accuracy = generation_accuracy([SCENE, SCENE], [clean, wrong])
    assert accuracy == {"background": 0.5, "shape": 4 / 6, "colour": 4 / 6}
    confusion = shape_confusion([SCENE, SCENE], [clean, wrong])
    assert confusion == {"circle": {"circle": 2}, "square": {"square": 1, "circle": 1},
                         "triangle": {"triangle": 1, None: 1}}


def test_verify_psnr_mean_of_exact_copies_is_inf_not_nan():
    # a mean that dropped infinite values showed "nan" for a method that copies the unedited
    # region exactly (Blended Diffusion), as if it had no unedited region at all
    from editeval.toylab.verify import _mean_psnr

    assert _mean_psnr([float("inf"), float("inf")]) == float("inf")
    assert _mean_psnr([30.0, float("inf"), 32.0]) == 31.0  # the edits that differ
    assert np.isnan(_mean_psnr([]))
