"""The toy models' training loop: checkpoints record the architecture, resume exactly (a restarted
schedule too), the VAE's loss weights object pixels (and, for the wide VAE's decoder, normalises
contrast), and the wide VAE's encoder is distilled to the VAE's posterior."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from editeval.toyworld.scenes import (
    _ATTRIBUTE_PATTERN,
    ATTRIBUTE_PHRASES,
    hard_negative,
)
from editeval.toylab.training import (
    OBJECT_WEIGHT,
    Checkpointed,
    _cached,
    _latents,
    _pixels,
    _reconstruction_loss,
    _object_masks,
    contrastive_loss,
    inpainting_mask,
    load_weights,
    new_unet,
    unet_with_inputs,
    posterior_distillation_loss,
    save_checkpoint,
)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=2)


def _loss(model):
    weight = model.decoder.conv_out.weight
    return lambda rng: (weight.sum() - float(rng.normal())) ** 2


def _dies_at_call(n: int, loss):
    """``loss``, but the ``n``-th call is a kill (KeyboardInterrupt) in the middle of a step."""
    calls = []

    def dying(rng):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return loss(rng)

    return dying


def test_a_killed_training_run_resumes_to_the_same_weights(tmp_path):
    straight = Checkpointed(tmp_path / "straight.ckpt", _tiny_vae, lr=1e-2, seed=3)
    straight.train(8, _loss(straight.model), every_seconds=1e9, desc="straight")

    killed = Checkpointed(tmp_path / "killed.ckpt", _tiny_vae, lr=1e-2, seed=3)
    with pytest.raises(KeyboardInterrupt):  # saves every step, dies in the 4th
        killed.train(8, _dies_at_call(4, _loss(killed.model)), every_seconds=0.0, desc="killed")
    resumed = Checkpointed(tmp_path / "killed.ckpt", _tiny_vae, lr=1e-2, seed=3)
    assert resumed.step == 3
    resumed.train(8, _loss(resumed.model), every_seconds=1e9, desc="resumed")
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(3)
    untrained = _tiny_vae().decoder.conv_out.weight
    assert not torch.equal(straight.model.decoder.conv_out.weight, untrained)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = new_unet(4)
    cross = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert (cross.heads, cross.inner_dim // cross.heads) == (4, 16)
    # the first toy UNets: the same tensor shapes, but 32 heads of width 2
    old = UNet2DConditionModel.from_config({**unet.config, "attention_head_dim": 32})
    Checkpointed(tmp_path / "unet.ckpt", lambda: old, lr=1e-4, seed=0).save()
    with pytest.raises(ValueError, match="attention_head_dim.*new --work folder"):
        load_weights(new_unet(4), tmp_path / "unet.ckpt")
    state = torch.load(tmp_path / "unet.ckpt", weights_only=False)
    del state["config"]  # checkpoints written before configs were recorded
    torch.save(state, tmp_path / "unet.ckpt")
    with pytest.raises(ValueError, match="not recorded"):
        load_weights(new_unet(4), tmp_path / "unet.ckpt")


def test_a_cache_of_another_data_size_is_recomputed(tmp_path):
    path, calls = tmp_path / "states.pt", []

    def compute(rows):
        calls.append(rows)
        return torch.arange(rows)

    assert _cached(path, lambda: compute(3), 3).tolist() == [0, 1, 2]
    assert _cached(path, lambda: compute(3), 3).tolist() == [0, 1, 2]  # read back
    assert calls == [3]
    assert _cached(path, lambda: compute(5), 5).tolist() == [0, 1, 2, 3, 4]  # data grew
    assert calls == [3, 5] and len(torch.load(path)) == 5


def test_reconstruction_loss_weights_object_pixels():
    x = -torch.ones(1, 3, 2, 2)  # black: saturation 0
    x[0, 0, 0, 0] = 1.0  # one pure red pixel: saturation 1
    recon = x.clone()
    recon[0, :, 0, 0] += 0.3  # error 0.3 on each channel of the red pixel
    recon[0, :, 1, 1] += 0.1  # error 0.1 on a black pixel
    weights = torch.tensor([OBJECT_WEIGHT, 1.0, 1.0, 1.0])
    expected = (OBJECT_WEIGHT * 0.09 + 0.01) / weights.sum()
    assert _reconstruction_loss(recon, x).item() == pytest.approx(expected.item(), rel=1e-6)


def test_contrast_normalised_loss_weighs_a_darkened_scene_as_much_as_the_scene():
    x = torch.tensor([-0.5, 0.5, 0.5, -0.5]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)  # grey
    recon = x.clone()
    recon[0, :, 0, 0] += 0.2  # grey pixels have saturation 0: every weight is 1
    variance = 12 * 0.25 / 11  # torch's unbiased variance of the 12 values +-0.5
    by_hand = (3 * 0.04 / 12) * 0.7 / variance
    assert _reconstruction_loss(recon, x, 0.7).item() == pytest.approx(by_hand, rel=1e-6)
    dark, dark_recon = 0.35 * x, 0.35 * recon  # night's gain on contrast and on the error
    assert (_reconstruction_loss(dark_recon, dark, 0.7).item()
            == pytest.approx(_reconstruction_loss(recon, x, 0.7).item(), rel=1e-5))
    assert (_reconstruction_loss(dark_recon, dark).item()
            == pytest.approx(0.35 ** 2 * _reconstruction_loss(recon, x).item(), rel=1e-5))


@pytest.mark.parametrize("in_channels", [8, 9])  # InstructPix2Pix, inpainting
def test_widened_unet_starts_as_the_text_to_image_unet(in_channels):
    torch.manual_seed(0)
    t2i = new_unet(4)
    widened = unet_with_inputs(t2i, in_channels)
    assert widened.config.in_channels == in_channels
    latents, extra = torch.randn(1, 4, 8, 8), torch.randn(1, in_channels - 4, 8, 8)
    text = torch.randn(1, 77, t2i.config.cross_attention_dim)
    with torch.no_grad():
        expected = t2i(latents, 500, encoder_hidden_states=text).sample
        got = widened(torch.cat([latents, extra], 1), 500, encoder_hidden_states=text).sample
    assert torch.allclose(got, expected, atol=1e-5)


def test_instruction_training_conditions_on_the_latents_the_pipeline_feeds():
    """InstructPix2Pix conditions on the source's unscaled latents (the authors' code and diffusers'
    pipeline alike); training on scaled ones would show the model inputs off by the scaling
    factor at inference."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    torch.manual_seed(0)
    vae = _tiny_vae().eval()
    vae.register_to_config(scaling_factor=1.1)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    pipe = StableDiffusionInstructPix2PixPipeline.__new__(StableDiffusionInstructPix2PixPipeline)
    pipe.vae = vae
    with torch.no_grad():
        fed = pipe.prepare_image_latents(_pixels(images), 2, 1, torch.float32, "cpu",
                                         do_classifier_free_guidance=False)
    assert torch.allclose(_latents(vae, images), fed, atol=1e-6)


def test_a_hard_negative_changes_one_attribute_of_one_object():
    from editeval.toyworld.scenes import sample_scene

    rng = np.random.default_rng(0)
    changed = set()
    for i in range(300):
        caption = sample_scene(rng).caption()
        wanted = (None, "shape")[i % 2]
        negative = hard_negative(caption, rng, wanted)
        before = [m.group() for m in _ATTRIBUTE_PATTERN.finditer(caption)]
        after = [m.group() for m in _ATTRIBUTE_PATTERN.finditer(negative)]
        assert _ATTRIBUTE_PATTERN.sub("*", negative) == _ATTRIBUTE_PATTERN.sub("*", caption)
        diff = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(diff) == 1, (caption, negative)
        (old, new), = diff
        attribute = next(k for k, phrases in ATTRIBUTE_PHRASES.items() if old in phrases)
        assert new in ATTRIBUTE_PHRASES[attribute] and wanted in (None, attribute)
        changed.add(attribute)
    assert changed == set(ATTRIBUTE_PHRASES)  # colour, size, texture, shape/pose all occur
    with pytest.raises(ValueError, match="no object attribute"):
        hard_negative("on sand, at night", rng)
    with pytest.raises(ValueError, match="no object texture"):
        hard_negative("a small red circle on the left, on sand", rng, "texture")


def test_contrastive_loss_by_hand_and_equal_to_clips_without_negatives():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 3.0]])  # 2 images, 2 captions + 1 negative
    image_side = -(np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(1)))
                   + np.log(np.exp(3) / (1 + 2 * np.exp(3)))) / 2
    text_side = -(np.log(np.exp(2) / (np.exp(2) + 1)) + np.log(np.exp(3) / (1 + np.exp(3)))) / 2
    assert contrastive_loss(logits).item() == pytest.approx((image_side + text_side) / 2, rel=1e-6)

    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tiny = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(image_size=8, patch_size=4, hidden_size=8, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)).eval()
    out = tiny(input_ids=torch.randint(0, 50, (3, 8)), pixel_values=torch.randn(3, 3, 8, 8),
               return_loss=True)
    assert contrastive_loss(out.logits_per_image).item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_a_shape_negative_changes_one_shape_and_often_only_its_pose():
    from editeval.toyworld.scenes import sample_scene

    def shape_negative(caption, rng):
        return hard_negative(caption, rng, "shape", pose_flip=0.5)

    rng = np.random.default_rng(0)
    flips = others = 0
    for _ in range(300):
        caption = sample_scene(rng).caption()
        negative = shape_negative(caption, rng)
        before = [m.group() for m in _ATTRIBUTE_PATTERN.finditer(caption)]
        after = [m.group() for m in _ATTRIBUTE_PATTERN.finditer(negative)]
        assert _ATTRIBUTE_PATTERN.sub("*", negative) == _ATTRIBUTE_PATTERN.sub("*", caption)
        (old, new), = [(a, b) for a, b in zip(before, after) if a != b]
        assert old in ATTRIBUTE_PHRASES["shape"] and new in ATTRIBUTE_PHRASES["shape"]
        if old.split()[0] == new.split()[0]:  # the same shape: only the pose changed
            assert {old.split()[-1], new.split()[-1]} in ({"up", "down"}, {"standing", "lying"})
            flips += 1
        else:
            others += 1
    # a pose flip half of the time when the changed shape has poses (2 of 5 shapes)
    assert 0.1 < flips / 300 < 0.35 and others > flips
    assert shape_negative("a small red circle on the left, on sand", rng) != (
        "a small red circle on the left, on sand")
    with pytest.raises(ValueError, match="no object shape"):
        shape_negative("on sand, at night", rng)


def test_an_imported_checkpoint_warms_a_fresh_optimiser_up_from_its_step(tmp_path):
    torch.manual_seed(0)
    model = _tiny_vae()
    save_checkpoint(tmp_path / "imported.ckpt", model, 100, optimizer=None,
                    numpy_rng=np.random.default_rng(1).bit_generator.state,
                    torch_rng=torch.get_rng_state(), warmup_from=100)
    run = Checkpointed(tmp_path / "imported.ckpt", _tiny_vae, lr=1e-2, seed=3)
    assert run.step == 100 and not run.optimizer.state  # no AdamW moments were exported
    assert torch.equal(run.model.decoder.conv_out.weight, model.decoder.conv_out.weight)
    run.train(101, _loss(run.model), every_seconds=1e9, desc="imported")
    # step 100 of a 101-step cosine, first of 200 warm-up steps
    expected = 1e-2 * 0.5 * (1 + np.cos(np.pi * 100 / 101)) / 200
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    run.train(102, _loss(run.model), every_seconds=1e9, desc="imported")
    resumed = Checkpointed(tmp_path / "imported.ckpt", _tiny_vae, lr=1e-2, seed=3)
    assert (resumed.step, resumed.warmup_from) == (102, 100)  # a crash keeps the warm-up's start


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _without_versions(config):
    """``config`` without the keys that record which library version wrote it
    (``transformers_version``, ``_diffusers_version``, ...)."""
    if isinstance(config, dict):
        return {k: _without_versions(v) for k, v in config.items()
                if not k.lower().endswith("_version")}
    if isinstance(config, list):
        return [_without_versions(v) for v in config]
    return config


def _folder_sizes(weights) -> dict[str, int]:
    """What export records in sizes.json: the bytes of each folder, links left out."""
    return {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
            for p in weights.iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The shipped weights imported as training checkpoints (once: it takes most of the time of
    an import-export round trip), and the step of each."""
    from editeval.toylab.export import import_checkpoints

    work = tmp_path_factory.mktemp("imported") / "work"
    return work, import_checkpoints(work)


def test_import_then_export_gives_back_the_shipped_weights_bit_for_bit(tmp_path, imported):
    from safetensors.torch import load_file

    from editeval.toylab.export import export, import_checkpoints
    from editeval.toyworld.models import WEIGHTS

    work, steps = imported
    assert steps == json.loads((WEIGHTS / "training.json").read_text())
    assert torch.load(work / "unet.ckpt", weights_only=False)["step"] == steps["unet"]
    export(work, tmp_path / "out")
    shipped = sorted(WEIGHTS.rglob("*.safetensors"))
    models = {"sd/vae", "sd/text_encoder", "sd/unet", "clip"} | {
        f"{name}/unet" for name in ("ip2p", "inpaint") if name in steps}
    assert {path.parent.relative_to(WEIGHTS).as_posix() for path in shipped} == models
    for path in shipped:  # the tensors bit for bit (not the file: its header is the library's)
        a, b = load_file(path), load_file(tmp_path / "out" / path.relative_to(WEIGHTS))
        assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a), path
    # the configs' values; not the text, which records the library versions that wrote it
    for path in WEIGHTS.rglob("*.json"):
        if path.name != "sizes.json":
            exported = json.loads((tmp_path / "out" / path.relative_to(WEIGHTS)).read_text())
            shipped_values = _without_versions(json.loads(path.read_text()))
            assert _without_versions(exported) == shipped_values, path
    # sizes.json counts bytes, and a config naming transformers 5.100.0 is longer: the exported
    # one describes the exported folder, and differs from the shipped one by a few bytes at most
    sizes, shipped_sizes = (json.loads((folder / "sizes.json").read_text())
                            for folder in (tmp_path / "out", WEIGHTS))
    assert sizes == _folder_sizes(tmp_path / "out") and sizes.keys() == shipped_sizes.keys()
    assert all(abs(sizes[k] - shipped_sizes[k]) <= 4096 for k in sizes), (sizes, shipped_sizes)
    with pytest.raises(FileExistsError, match="new --work folder"):
        import_checkpoints(work)
    with pytest.raises(FileNotFoundError, match="training.json"):
        import_checkpoints(tmp_path / "other", weights=tmp_path / "work")


def test_inpainting_masks_come_in_their_kinds_and_shares():
    """Object masks are the toy pairs' own, boxes hold their object, borders keep a centre box,
    and each kind comes at its share of ``MASK_KINDS`` (a sampler that ignored the shares, or
    returned object masks for scenes without objects, fails)."""
    from editeval.toylab.training import MASK_KINDS

    rng = np.random.default_rng(0)
    objects = np.zeros((2, 64, 64), dtype=bool)
    objects[0, 10:30, 4:20], objects[1, 30:52, 40:60] = True, True
    masks = [inpainting_mask(rng, objects) for _ in range(3000)]
    is_object = [any(np.array_equal(m, o) for o in objects) for m in masks]
    full = [bool(m.all()) for m in masks]
    border = [not m.all() and m[0].all() | m[-1].all() | m[:, 0].all() | m[:, -1].all()
              and not m[20:44, 20:44].any() for m in masks]
    assert np.mean(is_object) == pytest.approx(MASK_KINDS["object"], abs=0.03)
    assert np.mean(full) == pytest.approx(MASK_KINDS["everything"], abs=0.02)
    assert np.mean(border) == pytest.approx(MASK_KINDS["border"], abs=0.03)
    boxes = [m for m, o in zip(masks, is_object) if not o and any(
        (m & obj).sum() == obj.sum() and m.sum() > obj.sum() for obj in objects) and not m.all()]
    assert len(boxes) / len(masks) > MASK_KINDS["box"] - 0.03  # (some rectangles hold one too)
    empty = [inpainting_mask(rng, objects[:0]) for _ in range(300)]
    assert all(m.any() for m in empty) and not any(
        np.array_equal(m, o) for m in empty for o in objects)


def test_object_masks_refuse_scenes_of_another_seed():
    from editeval.toyworld.pairs import _objects_mask
    from editeval.toyworld.scenes import sample_scene

    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng) for _ in range(3)]
    packed = _object_masks(5, [scene.caption() for scene in scenes])
    masks = np.unpackbits(packed.numpy(), axis=-1).astype(bool)
    slots = ["left", "middle", "right"]
    for scene, scene_masks in zip(scenes, masks):
        for obj in scene.objects:
            assert np.array_equal(scene_masks[slots.index(obj.slot)], _objects_mask([obj], 64))
        assert scene_masks.any((1, 2)).sum() == len(scene.objects)
    with pytest.raises(ValueError, match="--seed the data stage used"):
        _object_masks(6, [scene.caption() for scene in scenes])


def test_the_inpainting_model_exports_beside_sd_and_imports_back(tmp_path, imported):
    """A zero-initialised inpainting UNet (the inpaint stage's step 0, unless the shipped weights
    hold a trained one) exported into the toy suite: its own UNet, everything else linked to
    ``sd/``, loadable as the suite's inpainting checkpoint; the toy weights stay within 80 MB."""
    from editeval.models import load_pipeline
    from editeval.toylab.export import export, import_checkpoints

    shipped, steps = imported
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    for path in shipped.iterdir():
        (work / path.name).symlink_to(path)
    if "inpaint" not in steps:
        t2i = new_unet(4)
        load_weights(t2i, work / "unet.ckpt")
        save_checkpoint(work / "inpaint.ckpt", unet_with_inputs(t2i, 9), 0, optimizer=None,
                        numpy_rng=np.random.default_rng(0).bit_generator.state,
                        torch_rng=torch.get_rng_state())
    export(work, out)
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "inpaint" / component).readlink().as_posix() == f"../sd/{component}"
    assert json.loads((out / "training.json").read_text())["inpaint"] == steps.get("inpaint", 0)
    sizes = json.loads((out / "sizes.json").read_text())
    assert 10e6 < sizes["inpaint"] < 13e6 and sum(sizes.values()) <= 80e6, sizes
    pipe = load_pipeline(str(out / "inpaint"))
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert pipe.unet.config.in_channels == 9
    if "inpaint" not in steps:  # zero-initialised: the text-to-image UNet's weights
        t2i = torch.load(shipped / "unet.ckpt", weights_only=False)["model"]["conv_in.weight"]
        assert pipe.unet.conv_in.weight[:, 4:].abs().max() == 0
        assert torch.equal(pipe.unet.conv_in.weight[:, :4], t2i.half().float())
    again = import_checkpoints(tmp_path / "again", weights=out)
    assert again["inpaint"] == steps.get("inpaint", 0)
    imported = torch.load(tmp_path / "again" / "inpaint.ckpt", weights_only=False)
    assert imported["config"]["in_channels"] == 9


def test_a_restarted_schedule_starts_a_new_cosine_and_survives_a_resume(tmp_path):
    run = Checkpointed(tmp_path / "run.ckpt", _tiny_vae, lr=1e-2, seed=3)
    run.train(300, _loss(run.model), every_seconds=1e9, desc="first")
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-2 * 0.5 * (1 + np.cos(np.pi * 299 / 300)), rel=1e-12)  # the stage's schedule
    with pytest.raises(KeyboardInterrupt):  # dies in step 303
        run.train(400, _dies_at_call(4, _loss(run.model)), every_seconds=0.0, desc="restarted",
                  restart_lr=4e-3)
    # step 300 was step 0 of a new 100-step cosine from 4e-3, first of 200 warm-up steps
    assert run.restart["step"] == 300 and run.step == 303
    resumed = Checkpointed(tmp_path / "run.ckpt", _tiny_vae, lr=1e-2, seed=3)
    resumed.train(400, _loss(resumed.model), every_seconds=1e9, desc="resumed", restart_lr=4e-3)
    assert resumed.restart["step"] == 300 and resumed.warmup_from == 300  # not restarted again
    by_hand = 4e-3 * 0.5 * (1 + np.cos(np.pi * 99 / 100)) * 100 / 200  # step 399
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(by_hand, rel=1e-12)
    resumed.train(401, _loss(resumed.model), every_seconds=1e9, desc="more", restart_lr=2e-3)
    assert resumed.restart["step"] == 400  # asked again: a new restart from the current step
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 200, rel=1e-12)


def test_posterior_distillation_loss_by_hand():
    torch.manual_seed(0)
    teacher = _tiny_vae().eval()
    student = _tiny_vae().eval()
    student.load_state_dict(teacher.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, mean = posterior_distillation_loss(student, teacher, x, scale=0.5)
    assert loss.item() == 0.0
    expected_mean = teacher.encode(x).latent_dist.mean  # the latents the UNets learn on
    assert torch.allclose(mean, expected_mean)
    with torch.no_grad():
        student.quant_conv.bias[:2] += 0.1  # every mean off by 0.1 (2 latent channels)
        student.quant_conv.bias[2:] -= 0.2  # every log-variance off by 0.2
    loss, _ = posterior_distillation_loss(student, teacher, x, scale=0.5)
    assert loss.item() == pytest.approx((0.1 * 0.5) ** 2 + 0.2 ** 2, rel=1e-4)
