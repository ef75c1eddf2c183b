"""The shared parts of test-time finetuning (editeval.diffusion.finetuning): the trainable copy
(counted, the pipeline untouched), the denoising loss and its fit, the fitted-state cache and its
bounds, and the progress an optimisation reports."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from editeval.core.nfe import count_nfe
from editeval.core.progress import showing_progress, step_progress
from editeval.diffusion.finetuning import (
    denoising_target,
    finetuned_state,
    fit_denoising_loss,
    load_weights,
    trainable_copy,
    weights_of,
)
from editeval.diffusion.inversion_cache import InversionCache
from editeval.diffusion.latents import encode_image, encode_prompt


@pytest.fixture(scope="module")
def image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_fitting_the_copy_is_counted_and_leaves_the_pipeline_unchanged(tiny_sd, image):
    before = _state(tiny_sd.unet)
    latents, text = encode_image(tiny_sd, image), encode_prompt(tiny_sd, "a red circle")
    generator = torch.Generator().manual_seed(0)
    with count_nfe(tiny_sd.unet) as counter:
        with trainable_copy(tiny_sd) as unet:
            assert unet is not tiny_sd.unet and unet.dtype == torch.float32
            weights = [p for p in unet.parameters()]
            losses = fit_denoising_loss(unet, tiny_sd.scheduler, latents, text,
                                        [{"params": weights, "lr": 1e-2}], 3, generator, "test")
            fitted = weights_of(unet)
        with torch.no_grad():  # outside the block the copy is no longer counted
            unet(latents, 10, encoder_hidden_states=text)
    # 3 steps: one forward (batch 1) and one backward each, all counted in the edit's counter
    assert (counter.nfe, counter.backward, len(losses)) == (3, 3, 3)
    assert all(torch.equal(before[k], v) for k, v in tiny_sd.unet.state_dict().items())
    changed = sum(not torch.equal(fitted[k], before[k].float()) for k in fitted)
    assert changed > len(fitted) // 2  # the copy was fitted (lr 1e-2 moves every used weight)
    assert not any(p.requires_grad for p in unet.parameters())  # flags restored after the fit
    assert not tiny_sd.unet._forward_pre_hooks and not unet._forward_pre_hooks


def test_fitting_only_an_embedding_leaves_the_weights_alone(tiny_sd, image):
    # a wrong fit that steps every parameter requiring gradients, or gathers .grad on the weights,
    # fails this
    latents = encode_image(tiny_sd, image)
    start = encode_prompt(tiny_sd, "a red circle").float()
    embedding = start.clone()
    with trainable_copy(tiny_sd) as unet:
        before = weights_of(unet)
        losses = fit_denoising_loss(unet, tiny_sd.scheduler, latents, embedding,
                                    [{"params": [embedding], "lr": 1e-2}], 4,
                                    torch.Generator().manual_seed(1), "embedding")
        assert all(torch.equal(before[k], v) for k, v in weights_of(unet).items())
        assert all(p.grad is None for p in unet.parameters())
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert float((embedding - start).abs().max()) == pytest.approx(4e-2, rel=0.05)  # Adam: lr a step
    assert not embedding.requires_grad


def test_the_denoising_target_follows_the_prediction_type():
    class Scheduler:
        alphas_cumprod = torch.tensor([0.64])

        def __init__(self, kind: str) -> None:
            self.config = type("Config", (), {"prediction_type": kind})

    latents, noise = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), -1.0)
    assert torch.equal(denoising_target(Scheduler("epsilon"), latents, noise, 0), noise)
    assert torch.equal(denoising_target(Scheduler("sample"), latents, noise, 0), latents)
    # v = sqrt(a) * noise - sqrt(1 - a) * x0 = 0.8 * -1 - 0.6 * 2 = -2.0
    v = denoising_target(Scheduler("v_prediction"), latents, noise, 0)
    assert torch.allclose(v, torch.full_like(v, -2.0))
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        denoising_target(Scheduler("flow"), latents, noise, 0)


def test_a_cached_fit_is_reused_with_the_generator_where_the_fit_left_it(tiny_sd, image, tmp_path):
    calls = []

    def fit(generator: torch.Generator):
        def compute():
            calls.append(1)
            torch.randn(5, generator=generator)  # the fit draws from the edit's generator
            return {"weights": torch.arange(3.0)}
        return compute

    cache = InversionCache(tmp_path)
    keys = {"kind": "test-fit", "pipe": tiny_sd, "image": image, "prompt": "a circle",
            "settings": {"steps": 3}}
    first = torch.Generator().manual_seed(7)
    value, hit = finetuned_state(cache, generator=first, compute=fit(first), **keys)
    after_fit = torch.randn(2, generator=first)
    again = torch.Generator().manual_seed(7)
    value2, hit2 = finetuned_state(InversionCache(tmp_path), generator=again,
                                   compute=fit(again), **keys)  # from disk, a new process
    assert (hit, hit2, len(calls)) == (False, True, 1)
    assert torch.equal(value2["weights"], torch.arange(3.0))
    assert torch.equal(torch.randn(2, generator=again), after_fit)  # same draws as a miss
    other = torch.Generator().manual_seed(8)  # another seed draws other timesteps: a new fit
    finetuned_state(cache, generator=other, compute=fit(other), **keys)
    changed = torch.Generator().manual_seed(7)
    finetuned_state(cache, generator=changed, compute=fit(changed),
                    **{**keys, "settings": {"steps": 4}})
    assert len(calls) == 3


def test_large_entries_stay_within_their_bound_least_recently_used_first(tmp_path):
    entry = {"w": torch.zeros(1000)}  # 4000 bytes of tensor, about 5.5 kB as a file
    cache = InversionCache(tmp_path, large_bytes=12_000)
    for key in ("a", "b", "c"):
        cache.get_or_compute(key, lambda: entry, large=True)
    folder = tmp_path / "finetuned"
    assert sorted(p.stem for p in folder.glob("*.pt")) == ["b", "c"]  # "a" evicted
    assert not list(tmp_path.glob("*.pt"))  # not among the inversions
    huge = InversionCache(tmp_path / "small", large_bytes=100)
    value, _ = huge.get_or_compute("x", lambda: entry, large=True)
    assert not (tmp_path / "small" / "finetuned").exists()  # over the bound: memory only
    assert huge.get_or_compute("x", lambda: {"w": torch.ones(1)}, large=True)[1]  # in memory


def test_load_weights_round_trips_fitted_weights(tiny_sd):
    with trainable_copy(tiny_sd) as unet:
        saved = weights_of(unet, ["conv_in.weight"])
        with torch.no_grad():
            unet.conv_in.weight.add_(1.0)
        load_weights(unet, saved)
        assert torch.equal(unet.conv_in.weight, saved["conv_in.weight"])
        with pytest.raises(KeyError):
            load_weights(unet, {"no.such.weight": torch.zeros(1)})


def test_progress_is_shown_only_where_a_display_is_installed():
    seen = []

    @contextmanager
    def display(description: str, total: int):
        seen.append((description, total))
        yield lambda **values: seen.append(values)

    with step_progress("quiet", 2) as update:  # no display: nothing happens
        update(loss=1.0)
    with showing_progress(display):
        with step_progress("fit", 2) as update:
            update(loss=0.5)
    assert seen == [("fit", 2), {"loss": 0.5}]
