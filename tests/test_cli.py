"""The command line: one edit end to end, errors without stack traces, listings."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from editeval.cli import app

runner = CliRunner()


def test_edit_writes_the_result_at_source_size(shared, tmp_path):
    out = tmp_path / "out.png"
    result = runner.invoke(app, [
        "edit", str(shared / "object_addition" / "1.jpg"), "--method", "sdedit", "--model", "tiny",
        "--target-prompt", "a cat on a bench", "-p", "num_inference_steps=10", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "NFE 10" in result.output
    with Image.open(out) as image:
        assert image.size == (1024, 1024) and image.mode == "RGB"


def test_the_toy_model_warns_on_a_photo_but_not_on_a_toy_scene(tmp_path):
    import numpy as np

    from editeval.toyworld.scenes import render, sample_scene

    scene = render(sample_scene(np.random.default_rng(0)))
    for size in (64, 96):
        source = tmp_path / f"source{size}.png"
        Image.fromarray(scene).resize((size, size)).save(source)
        result = runner.invoke(app, [
            "edit", str(source), "--method", "sdedit", "--model", "toy", "--target-prompt",
            "a red circle", "-p", "num_inference_steps=4", "-o", str(tmp_path / "out.png")])
        assert result.exit_code == 0, result.output
        assert ("the toy models learnt 64x64 rendered toy scenes" in result.output) == (size != 64)


@pytest.mark.parametrize("args, message", [
    (["--method", "instructpix2pix"], "needs instruction"),
    (["--method", "nope", "--target-prompt", "x"], "unknown method 'nope'"),
    (["--method", "sdedit", "--target-prompt", "x", "-p", "strength=2"], "strength must be in (0, 1]"),
])
def test_errors_are_one_line_without_traceback(shared, tmp_path, args, message):
    result = runner.invoke(app, ["edit", str(shared / "object_addition" / "1.jpg"), "--model",
                                 "tiny", "-o", str(tmp_path / "x.png"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    result = runner.invoke(app, ["edit", str(bad), "--method", "sdedit", "--target-prompt", "x",
                                 "--model", "tiny"])
    assert result.exit_code == 2 and "bad.jpg" in result.output


def test_missing_model_is_a_short_error(shared, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["edit", str(shared / "object_addition" / "1.jpg"), "--method",
                                 "sdedit", "--target-prompt", "x", "--model", "sd15"])
    assert result.exit_code == 2
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in result.output
    assert "Traceback" not in result.output


def test_bench_without_data_dir_explains(monkeypatch):
    monkeypatch.delenv("EDITEVAL_V1_DIR", raising=False)
    result = runner.invoke(app, ["bench", "--dataset", "editeval-v1", "--model", "tiny"])
    assert result.exit_code == 2 and "--data-dir" in result.output


def test_methods_lists_the_cards():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "sdedit" in result.output and "instructpix2pix" in result.output
    assert "2108.01073" in result.output
    only_free = runner.invoke(app, ["methods", "--strategy", "training-free"], env={"COLUMNS": "200"})
    assert "sdedit" in only_free.output and "instructpix2pix" not in only_free.output


def test_bad_output_extension_fails_before_editing(shared, tmp_path):
    result = runner.invoke(app, ["edit", str(shared / "object_addition" / "1.jpg"), "--method",
                                 "sdedit", "--target-prompt", "x", "--model", "tiny", "-o",
                                 str(tmp_path / "out.xyz")])
    assert result.exit_code == 2 and "unknown image extension .xyz" in result.output


def test_sdedit_refuses_an_instruction_model(shared, tmp_path):
    result = runner.invoke(app, ["edit", str(shared / "object_addition" / "1.jpg"), "--method",
                                 "sdedit", "--target-prompt", "x", "--model", "tiny-ip2p", "-o",
                                 str(tmp_path / "out.png")])
    assert result.exit_code == 2 and "4-channel" in result.output


def test_bench_with_missing_models_names_them_all_and_writes_nothing(editeval_v1_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    result = runner.invoke(app, ["bench", "--dataset", "editeval-v1", "--data-dir",
                                 str(editeval_v1_dir), "--model", "sd15", "--out", str(out),
                                 "--limit", "1"])
    assert result.exit_code == 2
    assert "timbrooks/instruct-pix2pix" in result.output
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in result.output
    assert not out.exists()
