"""The ``editeval-toy`` split: a fixed, versioned set of toy edit pairs, loaded like EditEval v1.

Version 1: 30 pairs for each of the 7 EditEval tasks (210), drawn from ``SPLIT_SEED``, rendered at
64 px. The split is generated on first use into the given folder (default: the editeval cache) with
a ``manifest.json``; each sample carries its ground-truth target image, its edit-region mask and
both scenes (``extra["source_scene"]``, ``extra["target_scene"]``, JSON) for the oracle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from editeval.core.files import atomic_write
from editeval.core.samples import TASKS, Dataset, DatasetError, Sample
from editeval.toyworld.oracle import EditScore, psnr, score_edit
from editeval.toyworld.pairs import sample_pair
from editeval.toyworld.scenes import Scene

SPLIT_VERSION = 2
SPLIT_SEED = 20261129
PAIRS_PER_TASK = 30


def default_root() -> Path:
    from editeval.core.cache import cache_dir

    return cache_dir() / "datasets" / f"editeval-toy-v{SPLIT_VERSION}"


def build_split(root: Path) -> None:
    """Render the split into ``root`` (images, masks, manifest.json); deterministic."""
    rng = np.random.default_rng(SPLIT_SEED)
    records = []
    for task in TASKS:
        (root / task).mkdir(parents=True, exist_ok=True)
        for number in range(1, PAIRS_PER_TASK + 1):
            pair = sample_pair(rng, task)
            stem = root / task / str(number)
            Image.fromarray(pair.source_image).save(f"{stem}.png")
            Image.fromarray(pair.target_image).save(f"{stem}_target.png")
            Image.fromarray(pair.mask.astype(np.uint8) * 255).save(f"{stem}_mask.png")
            records.append({
                "id": f"{task}/{number}", "task": task,
                "source_prompt": pair.source.caption(), "target_prompt": pair.target.caption(),
                "instruction": pair.instruction,
                "source_scene": pair.source.to_dict(), "target_scene": pair.target.to_dict(),
            })
    manifest = {"name": "editeval-toy", "version": SPLIT_VERSION, "seed": SPLIT_SEED,
                "samples": records}
    # written last: a complete split or none
    atomic_write(root / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def load_editeval_toy(root: str | os.PathLike | None = None) -> Dataset:
    """Load (building it first if needed) the ``editeval-toy`` split from ``root``.

    Raises:
        DatasetError: ``root`` holds a split of another version.
    """
    root = Path(root) if root is not None else default_root()
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        build_split(root)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != SPLIT_VERSION:
        raise DatasetError(
            f"{root} holds editeval-toy version {manifest.get('version')}, this editeval makes "
            f"version {SPLIT_VERSION}; point --data-dir at an empty folder to build it"
        )
    samples = []
    for record in manifest["samples"]:
        stem = root / record["id"]
        samples.append(Sample(
            id=record["id"], task=record["task"], image_path=Path(f"{stem}.png"),
            source_prompt=record["source_prompt"], target_prompt=record["target_prompt"],
            instruction=record["instruction"], mask_path=Path(f"{stem}_mask.png"),
            target_image_path=Path(f"{stem}_target.png"),
            extra={"source_scene": json.dumps(record["source_scene"]),
                   "target_scene": json.dumps(record["target_scene"])},
        ))
    return Dataset(name="editeval-toy", root=root, samples=samples)


@dataclass
class SampleJudgement:
    """The oracle's verdict on one edit of a toy sample, against its ground truth.

    Attributes:
        score: :class:`~editeval.toyworld.oracle.EditScore` (success, the four 1-10 factors, and the
            unedited-region PSNR against the *source*).
        unedited_psnr_vs_target: PSNR in dB of the unedited region (mask = 0) against the
            ground-truth target; ``nan`` when the mask covers the whole image (style change).
    """

    score: EditScore
    unedited_psnr_vs_target: float


def judge_sample(sample: Sample, output: Image.Image) -> SampleJudgement:
    """Judge ``output`` (any size: resized to the source's with Lanczos) as an edit of ``sample``.

    Raises:
        DatasetError: ``sample`` is not a toy-world sample (it has no ground-truth scenes).
    """
    if "target_scene" not in sample.extra:
        raise DatasetError(f"the oracle judges toy-world samples only; {sample.id} has no "
                           "ground-truth scene")
    source = np.asarray(Image.open(sample.image_path).convert("RGB"))
    target = np.asarray(Image.open(sample.target_image_path).convert("RGB"))
    mask = np.asarray(Image.open(sample.mask_path).convert("L")) > 127
    output = output.convert("RGB")
    if output.size != (source.shape[1], source.shape[0]):
        output = output.resize((source.shape[1], source.shape[0]), Image.Resampling.LANCZOS)
    edited = np.asarray(output)
    score = score_edit(edited, source, Scene.from_dict(json.loads(sample.extra["source_scene"])),
                       Scene.from_dict(json.loads(sample.extra["target_scene"])), mask)
    unedited = psnr(edited, target, ~mask) if (~mask).any() else float("nan")
    return SampleJudgement(score, unedited)
