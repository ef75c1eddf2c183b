"""Run directories for the user-study tests: fake methods on ``editeval-toy`` samples (no model),
so a study has real images, samples and edits to rate in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from editeval.data import load_dataset
from editeval.run import Run, RunConfig

# names that must never reach a rater's browser
METHODS = ("methodzebra", "methodyak", "methodquokka", "methodnarwhal")


def fake_edit(sample, kind: str, rng: np.random.Generator) -> Image.Image:
    """``target`` (the ground truth: a perfect edit), ``source`` (no edit), ``noisy`` (the truth
    with Gaussian noise, sigma 30) or ``blend`` (half source, half truth)."""
    source = np.asarray(Image.open(sample.image_path).convert("RGB"), dtype=float)
    target = np.asarray(Image.open(sample.target_image_path).convert("RGB"), dtype=float)
    pixels = {"target": target, "source": source,
              "noisy": target + rng.normal(0, 30, target.shape),
              "blend": 0.5 * source + 0.5 * target}[kind]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def fake_run(out: Path, methods: dict[str, str], per_task: int = 1, limit: int | None = None
             ) -> Path:
    """A run in ``out`` with one done job per (method, sample): ``methods`` maps a method name to
    a :func:`fake_edit` kind; samples are the first ``per_task`` of each task (at most
    ``limit``)."""
    samples = load_dataset("editeval-toy").select(per_task=per_task, limit=limit)
    rng = np.random.default_rng(0)
    with Run.for_config(RunConfig(dataset="editeval-toy", methods=list(methods), model="fake",
                                  out=out)) as run:
        run.save_config()
        for method, kind in methods.items():
            for sample in samples:
                run.store.record_done(job_id=f"{method}/{sample.id}/seed0", method=method,
                                      sample_id=sample.id, task=sample.task, seed=0,
                                      image=fake_edit(sample, kind, rng), nfe=0, uncached_nfe=0,
                                      wall_seconds=0.0, model="fake", params={})
    return out
