"""Classic editing metrics: golden values against reference implementations, hand computations and
constructed cases; the toy CLIP's caption ranking; scoring a run directory (NaN counting, resume)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from editeval.run import Run, RunConfig
from editeval.cli import app
from editeval.data import load_dataset
from editeval.metrics import BackboneUnavailableError, metric_table, parse_metrics, score_metrics
from editeval.metrics import pixel
from editeval.metrics.backbones import load_clip
from editeval.metrics.clip_similarity import (
    clip_image_similarity,
    clip_score,
    directional_similarity,
)
from editeval.metrics.distribution import fid, kid, load_feature_extractor
from editeval.metrics.perceptual import load_lpips
from editeval.metrics.regions import keep, read_rgb, to_unit
from editeval.metrics.structure import load_structure_backbone


def _random_pair(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, shape), 0, 255).astype(np.uint8)
    return a, b


# --- golden values -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64, 3), (37, 52, 3)])
def test_psnr_ssim_mse_match_scikit_image(shape):
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

    a, b = _random_pair(1, shape)
    fa, fb = a / 255.0, b / 255.0
    assert pixel.mse(a, b) == pytest.approx(mean_squared_error(fa, fb), abs=1e-5)
    assert pixel.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(fa, fb, data_range=1.0),
                                             abs=1e-5)
    reference = structural_similarity(fa, fb, channel_axis=-1, data_range=1.0,
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert pixel.ssim(a, b) == pytest.approx(reference, abs=1e-5)
    assert 0.1 < pixel.ssim(a, b) < 0.99  # a real comparison, not two identical images


def test_saturated_uint8_never_overflows():
    white = np.full((32, 32, 3), 255, np.uint8)
    black = np.zeros_like(white)
    assert to_unit(white).max().item() == 1.0  # (uint8 * 255 would wrap to 1 / 255)
    assert pixel.mse(white, white) == 0.0 and pixel.psnr(white, white) == math.inf
    assert pixel.mse(white, black) == 1.0 and pixel.psnr(white, black) == 0.0
    assert pixel.ssim(white, white) == pytest.approx(1.0)
    lpips = load_lpips("alex-random")
    same, inverted = lpips([white, white], [white, black])
    assert same == 0.0 and inverted > 0.01
    clip = load_clip("tiny")
    embedded = clip.image_embeddings([white])
    pixels = clip.processor(images=Image.fromarray(white), return_tensors="pt")["pixel_values"]
    processor = clip.processor.image_processor
    for channel, (mean, std) in enumerate(zip(processor.image_mean, processor.image_std)):
        white_level = torch.full_like(pixels[0, channel], (1 - mean) / std)
        torch.testing.assert_close(pixels[0, channel], white_level)  # white is read as 1.0
    by_hand = clip.model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(embedded, by_hand, rtol=1e-5, atol=1e-5)


def _torchvision_file(net: str) -> str:
    """The file name under which the installed torchvision caches ``net``'s ImageNet weights (the
    name of its download URL: it changes when torchvision publishes new weights)."""
    from urllib.parse import urlparse

    import torchvision

    weights = {"alex": torchvision.models.AlexNet_Weights,
               "squeeze": torchvision.models.SqueezeNet1_1_Weights}[net].IMAGENET1K_V1
    return urlparse(weights.url).path.rsplit("/", 1)[-1]


def _save_random_torchvision_weights(directory, net: str) -> None:
    """A random torchvision backbone saved where torchvision looks for its ImageNet weights."""
    import torchvision

    torch.manual_seed(7)
    builder = {"alex": torchvision.models.alexnet, "squeeze": torchvision.models.squeezenet1_1}
    checkpoints = directory / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(builder[net](weights=None).state_dict(), checkpoints / _torchvision_file(net))


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_lpips_matches_the_lpips_package_on_the_same_weights(net, tmp_path, monkeypatch):
    import lpips as lpips_package

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _save_random_torchvision_weights(tmp_path, net)
    ours = load_lpips(net)
    reference = lpips_package.LPIPS(net=net, verbose=False).eval()
    pairs = [_random_pair(seed, (64, 64, 3)) for seed in range(3)]
    values = ours([a for a, _ in pairs], [b for _, b in pairs])
    with torch.no_grad():
        expected = [reference(to_unit(a, torch.float32), to_unit(b, torch.float32),
                              normalize=True).item() for a, b in pairs]
    assert ours.name == f"lpips-{net}"
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
    assert min(values) > 0


def test_lpips_stand_in_is_the_lpips_package_with_a_seeded_random_backbone():
    import lpips as lpips_package

    torch.manual_seed(0)
    reference = lpips_package.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    a, b = _random_pair(3, (64, 64, 3))
    ours = load_lpips("alex-random")
    with torch.no_grad():
        expected = reference(to_unit(a, torch.float32), to_unit(b, torch.float32),
                             normalize=True).item()
    assert ours.name == "lpips-alex-random-seed0"
    assert ours([a], [b])[0] == pytest.approx(expected, rel=1e-5)


def test_lpips_without_weights_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; the download is refused below

    def no_download(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.AlexNet_Weights.IMAGENET1K_V1, "get_state_dict",
                        no_download)
    # the file the message names is the one torchvision looks for (alexnet-owt-7be5be79.pth)
    with pytest.raises(BackboneUnavailableError,
                       match=re.escape(_torchvision_file("alex")) + ".*alex-random"):
        load_lpips("alex")
    with pytest.raises(ValueError, match="unknown LPIPS network 'resnet'"):
        load_lpips("resnet")


def test_clip_score_equals_the_hand_computation_from_embeddings():
    clip = load_clip("tiny")
    images = [_random_pair(seed, (40, 48, 3))[0] for seed in range(4)]
    captions = ["a red circle", "a small blue square on sand", "two green triangles", "night"]
    scores = clip_score(clip, images, captions)
    with torch.no_grad():
        pixels = clip.processor(images=[Image.fromarray(i) for i in images],
                                return_tensors="pt")["pixel_values"]
        image_emb = clip.model.model.get_image_features(pixel_values=pixels).pooler_output
        tokens = clip.processor(text=captions, return_tensors="pt", padding=True)
        text_emb = clip.model.model.get_text_features(**tokens).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb).double().numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cosine, 0), rtol=1e-4, atol=1e-4)
    assert np.any(cosine != 0)
    same = clip_image_similarity(image_emb[:1], image_emb[:1])
    assert same[0] == pytest.approx(1.0)
    expected = torch.nn.functional.cosine_similarity(image_emb[:1], image_emb[1:2]).item()
    assert clip_image_similarity(image_emb[:1], image_emb[1:2])[0] == pytest.approx(expected,
                                                                                   rel=1e-6)


def test_directional_similarity_on_constructed_embeddings():
    x, y, z = torch.eye(3, dtype=torch.float64)
    diagonal = (x + y) / math.sqrt(2)
    # image moves x -> y; text moves x -> y, y -> x, z -> (x + y) / sqrt(2)
    rows = directional_similarity(torch.stack([x, x, x, 3 * x]), torch.stack([y, y, y, 5 * y]),
                                  torch.stack([x, y, z, 2 * x]), torch.stack([y, x, diagonal, y]))
    np.testing.assert_allclose(rows, [1.0, -1.0, 0.0, 1.0], atol=1e-12)  # last: scale-invariant
    # a hand case: unit(edit) - unit(source) = (-1, 1, 0); text change (1, 0, 1) -> cos 1/2
    case = directional_similarity(x[None], y[None], torch.zeros(1, 3, dtype=torch.float64) + z,
                                  (x + 2 * z)[None] / math.sqrt(5))
    t = (x + 2 * z) / math.sqrt(5) - z
    expected = float(torch.dot(y - x, t) / (torch.norm(y - x) * torch.norm(t)))
    assert case[0] == pytest.approx(expected)
    unchanged = directional_similarity(x[None], x[None], x[None], y[None])
    assert np.isnan(unchanged[0])


def test_structure_distance_zero_positive_symmetric():
    vit = load_structure_backbone("tiny")
    a, b = _random_pair(5, (48, 48, 3))
    c = np.ascontiguousarray(a[::-1])  # the same pixels, upside down: another layout
    d = vit.distance([a, a, b, a, c], [a, b, a, c, a])
    assert d[0] == 0.0
    assert d[1] > 0 and d[3] > 0
    # symmetric up to float32 rounding (the ViT runs in float32; with several torch threads a
    # batch position can round differently: measured 7e-9 relative on 2 threads)
    assert d[1] == pytest.approx(d[2], rel=1e-6) and d[3] == pytest.approx(d[4], rel=1e-6)
    assert vit.name == "tiny-dino"
    tokens = (vit.vit.config.image_size // vit.vit.config.patch_size) ** 2 + 1
    assert vit.self_similarity([a]).shape == (1, tokens, tokens)


def test_fid_and_kid_on_clip_features():
    extractor = load_feature_extractor("tiny")
    images = [_random_pair(seed, (32, 32, 3))[0] for seed in range(6)]
    others = [np.full((32, 32, 3), 40 * k, np.uint8) for k in range(6)]
    assert extractor.name == "clip-image:tiny-clip"
    assert fid(extractor, images, images) == pytest.approx(0.0, abs=1e-6)
    assert fid(extractor, images, others) > 0.1
    mean, std = kid(extractor, images, others)
    assert mean > 0 and std < 1e-5 * mean  # 6 < 1000: every subset is all 6 (float32 noise)
    with pytest.raises(ValueError, match="at least 2"):
        fid(extractor, images[:1], others[:1])


def test_region_zeroing_keeps_only_the_region():
    image = np.full((4, 4, 3), 200, np.uint8)
    kept = np.zeros((4, 4), bool)
    kept[1:3, 1:3] = True
    out = keep(image, kept)
    assert out.dtype == np.uint8 and out[kept].min() == 200 and out[~kept].max() == 0
    with pytest.raises(ValueError, match="does not match"):
        keep(image, kept[:3])


def test_metric_names_are_checked():
    assert parse_metrics("psnr, clip_t,psnr") == ["psnr", "clip_t"]
    with pytest.raises(ValueError, match="unknown metric.*clipscore.*known: clip_t"):
        parse_metrics("clipscore")


# --- the toy CLIP ----------------------------------------------------------------------------------

def test_toy_clip_ranks_the_target_caption_first():
    """On the ground-truth target image of every other editeval-toy sample (15 of each task), the
    toy CLIP's CLIPScore must prefer the target prompt to a wrong caption: another sample's target
    prompt (measured: 105 of 105; 210 of 210 on all samples), and, harder, the source prompt,
    which differs only in the edited attributes (measured: 101 of 105; 199 of 210)."""
    samples = load_dataset("editeval-toy").samples[::2]
    clip = load_clip("toy")
    images = [read_rgb(s.target_image_path) for s in samples]
    right = clip_score(clip, images, [s.target_prompt for s in samples])
    other = clip_score(clip, images, [samples[i - 1].target_prompt for i in range(len(samples))])
    source = clip_score(clip, images, [s.source_prompt for s in samples])
    assert np.mean(right > other) >= 0.9
    assert np.mean(right > source) >= 0.85


# --- scoring a run directory -------------------------------------------------------------------------

@pytest.fixture
def toy_run(tmp_path):
    """A run of the tiny model over three editeval-toy samples: method ``truth`` returns the
    ground-truth target, ``blurred`` a box-blurred copy of it. style_change/1's mask is full."""
    samples = {s.id: s for s in load_dataset("editeval-toy").samples}
    with Run.for_config(RunConfig(dataset="editeval-toy", methods=["truth", "blurred"],
                                  model="tiny", out=tmp_path / "run")) as run:
        run.save_config()
        for sample_id in ("object_addition/1", "style_change/1", "texture_change/2"):
            sample = samples[sample_id]
            target = Image.open(sample.target_image_path).convert("RGB")
            blurred = target.resize((16, 16), Image.Resampling.BOX).resize(target.size)
            for method, image in (("truth", target), ("blurred", blurred)):
                run.store.record_done(job_id=f"{method}/{sample_id}/seed0", method=method,
                                      sample_id=sample_id, task=sample.task, seed=0, image=image,
                                      nfe=0, uncached_nfe=0, wall_seconds=0.0, model="tiny",
                                      params={})
    return run.path


ALL = ["clip_t", "clip_t_edited", "clip_i", "clip_dir", "lpips", "psnr", "ssim", "mse",
       "dino_struct", "fid", "kid"]


def test_scoring_counts_nans_and_resumes(toy_run):
    first = score_metrics(Run.open(toy_run), ALL)
    assert first.backbones["clip_t"] == "tiny-clip" and first.backbones["psnr"] == "pixels"
    assert first.backbones["dino_struct"] == "tiny-dino"
    assert first.backbones["fid"] == "clip-image:tiny-clip"
    assert all(first.computed[m] == 6 for m in ALL[:9])
    assert first.computed["fid"] == 2 * 4  # (truth, blurred) x (3 tasks + all)
    again = score_metrics(Run.open(toy_run), ALL)
    assert sum(again.computed.values()) == 0
    assert all(again.skipped[m] == 6 for m in ALL[:9]) and again.skipped["kid"] == 8

    per_image, sets = metric_table(Run.open(toy_run))
    psnr = per_image[(per_image.metric == "psnr") & (per_image.task == "all")].set_index("method")
    assert psnr.loc["truth", "nan"] == 1 and psnr.loc["truth", "n"] == 2  # style: full mask
    # the ground truth equals the source outside the mask: every pixel of the region is equal
    assert psnr.loc["truth", "mean"] == math.inf
    assert psnr.loc["blurred", "mean"] < 40
    style = per_image[(per_image.task == "style_change") & (per_image.metric == "mse")]
    assert set(style["nan"]) == {1} and set(style["n"]) == {0} and style["mean"].isna().all()
    with Run.open(toy_run) as run:
        store = run.store
        rows = [r for r in store.metric_values() if r["metric"] == "ssim"]
    values = {r["job_id"]: r for r in rows}
    assert math.isnan(values["truth/style_change/1/seed0"]["value"])
    assert "whole image" in values["truth/style_change/1/seed0"]["note"]
    assert values["truth/object_addition/1/seed0"]["region"] == "unedited"
    # the mean drops the NaN: it is the mean of the two stored values
    ssim = per_image[(per_image.metric == "ssim") & (per_image.task == "all")
                     & (per_image.method == "blurred")].iloc[0]
    finite = [r["value"] for r in rows if r["job_id"].startswith("blurred/")
              and not math.isnan(r["value"])]
    assert ssim["mean"] == pytest.approx(np.mean(finite)) and ssim["nan"] == 1
    fid_all = sets[(sets.metric == "fid") & (sets.task == "all")]
    assert list(fid_all["n"]) == [3, 3]


def test_rescoring_after_a_new_edit_computes_only_it(toy_run):
    score_metrics(Run.open(toy_run), ["psnr", "fid"])
    samples = {s.id: s for s in load_dataset("editeval-toy").samples}
    sample = samples["object_removal/1"]
    with Run.open(toy_run) as run:
        store = run.store
        store.record_done(job_id="truth/object_removal/1/seed0", method="truth",
                          sample_id=sample.id, task=sample.task, seed=0,
                          image=Image.open(sample.image_path).convert("RGB"), nfe=0,
                          uncached_nfe=0, wall_seconds=0.0, model="tiny", params={})
    again = score_metrics(Run.open(toy_run), ["psnr", "fid"])
    assert again.computed["psnr"] == 1 and again.skipped["psnr"] == 6
    # the new task's set, and truth's "all" set (its edits changed); the rest is kept
    assert again.computed["fid"] == 2 and again.skipped["fid"] == 7  # of 9 sets now


def test_score_command_prints_the_method_by_task_table(toy_run):
    result = CliRunner().invoke(app, ["score", str(toy_run), "--metrics", "psnr,mse,kid"])
    assert result.exit_code == 0, result.output
    assert "| method | task | region | mean | std | n | NaN dropped |" in result.output
    assert "| truth | style_change | unedited | - | - | 0 | 1 |" in result.output
    assert "### kid (lower is better; features `clip-image:tiny-clip`" in result.output
    assert "judged" not in result.output  # metrics only: no LMM judge ran
    again = CliRunner().invoke(app, ["score", str(toy_run), "--metrics", "psnr,mse,kid"])
    assert "computed now: none" in again.output
    bad = CliRunner().invoke(app, ["score", str(toy_run), "--metrics", "psnr,bleu"])
    assert bad.exit_code == 2 and "unknown metric(s) bleu" in bad.output
    both = CliRunner().invoke(app, ["score", str(toy_run), "--judge", "oracle", "--metrics",
                                    "ssim"])
    assert both.exit_code == 0, both.output
    assert "# Leaderboard" in both.output and "### ssim (higher is better" in both.output
    config = json.loads((toy_run / "config.json").read_text())
    assert config["model"] == "tiny"


# --- correlation with the toy world's ground truth -------------------------------------------------

def test_correlation_table_on_constructed_values():
    from editeval.metrics.correlation import correlation_table

    success = np.array([0, 0, 1, 1, 1, 0], float)
    psnr_truth = np.array([10, 12, 30, 31, 29, np.nan])
    edits = pd.DataFrame({
        "task": ["a", "a", "a", "b", "b", "b"], "success": success, "edited_correct": success, "unedited_psnr": psnr_truth,
        "oracle_s_all": np.nan,
        "psnr@pixels": [9.0, 13, 31, 30, 28, 5],  # follows the truth but for one swap
        "lpips@x": [0.9, 0.8, 0.1, 0.2, 0.3, np.nan],  # lower is better
    })
    table = correlation_table(edits, ("success", "unedited_psnr")).set_index(
        ["metric", "truth"])
    assert table.loc[("psnr", "success"), "auc"] == 1.0
    assert table.loc[("lpips", "success"), "auc"] == 1.0  # oriented: low LPIPS = success
    assert table.loc[("lpips", "success"), "n"] == 5  # the NaN pair is dropped
    assert table.loc[("psnr", "unedited_psnr"), "spearman"] == pytest.approx(0.9)  # 1 - 6*2/120
    expected = stats.pearsonr([9.0, 13, 31, 30, 28], [10, 12, 30, 31, 29]).statistic
    assert table.loc[("psnr", "unedited_psnr"), "pearson"] == pytest.approx(expected)
    assert table.loc[("lpips", "success"), "pearson"] < -0.9
    # within task a the order is exact; task b has only 2 finite pairs and is left out
    assert table.loc[("psnr", "unedited_psnr"), "spearman_within_task"] == pytest.approx(1.0)


def test_edit_table_joins_ground_truth_and_metrics(toy_run):
    from editeval.metrics.correlation import edit_table

    score_metrics(Run.open(toy_run), ["psnr"])
    edits = edit_table([Run.open(toy_run)]).set_index("job_id")
    assert len(edits) == 6 and set(edits["setting"]) == {"run:truth", "run:blurred"}
    truth = edits[edits["setting"] == "run:truth"]
    assert (truth["success"] == 1.0).all()  # the ground-truth target is a successful edit
    assert truth.loc["truth/object_addition/1/seed0", "unedited_psnr"] == math.inf
    assert np.isnan(truth.loc["truth/style_change/1/seed0", "unedited_psnr"])  # full mask
    assert truth["oracle_s_all"].isna().all()  # not judged
    assert edits.loc["blurred/texture_change/2/seed0", "psnr@pixels"] < 40
