"""Scoring a run directory with the classic metrics: resumable, one stored value per image.

``score_metrics(run, ["clip_t", "psnr", ...])`` computes, for every finished edit of the run,
each requested per-image metric that the run's ``results.sqlite`` does not hold yet for the chosen
backbone (table ``metric_scores``: job, metric, backbone, region, value, note), and each set metric
(FID, KID) per method and task, and per method over all tasks (table ``metric_set_scores``; redone
only when the set of edits changed). Values are written every ``batch_size`` edits, so a killed
scoring resumes where it stopped, and a second call computes nothing and loads no backbone.

Metrics (each module's docstring has the definition and the paper):

=================  ==============================================  =========  ===========
name               what                                            region     better
=================  ==============================================  =========  ===========
``clip_t``         CLIPScore of edit and target prompt, 0..100     whole      higher
``clip_t_edited``  the same on the edited region                   edited     higher
``clip_i``         cosine of source and edit CLIP embeddings       whole      higher
``clip_dir``       directional CLIP similarity, -1..1              whole      higher
``lpips``          LPIPS of source and edit                        unedited   lower
``psnr``           PSNR (dB) of source and edit                    unedited   higher
``ssim``           SSIM of source and edit                         unedited   higher
``mse``            MSE of source and edit, 0..1                    unedited   lower
``dino_struct``    DINO self-similarity structure distance         whole      lower
``fid`` / ``kid``  FID / KID of the edits against their sources    set        lower
=================  ==============================================  =========  ===========

Regions follow PIE-Bench (zeroed pixels; see :mod:`editeval.metrics.regions`); a sample without a
mask (EditEval v1) is scored on the whole image and recorded as region ``whole``. A metric that has
no value for an image (a full mask leaves no unedited region; no source prompt for ``clip_dir``) is
stored as NaN with a note, counted in the table's ``nan`` column and never averaged.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from editeval.core.samples import TASKS
from editeval.metrics import regions
from editeval.metrics.backbones import default_backbones, resolve_vision_checkpoint
from editeval.run import ResultStore, Run

PER_IMAGE_METRICS = ("clip_t", "clip_t_edited", "clip_i", "clip_dir", "lpips", "psnr", "ssim",
                     "mse", "dino_struct")
SET_METRICS = ("fid", "kid")
METRICS = PER_IMAGE_METRICS + SET_METRICS
DEFAULT_METRICS = ("clip_t", "clip_i", "clip_dir", "lpips", "psnr", "ssim", "mse", "dino_struct",
                   "fid", "kid")
HIGHER_IS_BETTER = {"clip_t": True, "clip_t_edited": True, "clip_i": True, "clip_dir": True,
                    "lpips": False, "psnr": True, "ssim": True, "mse": False,
                    "dino_struct": False, "fid": False, "kid": False}
BACKBONE_KIND = {"clip_t": "clip", "clip_t_edited": "clip", "clip_i": "clip", "clip_dir": "clip",
                 "lpips": "lpips", "psnr": "pixels", "ssim": "pixels", "mse": "pixels",
                 "dino_struct": "dino", "fid": "fid", "kid": "fid"}
ALL_TASKS = "all"


@dataclass
class MetricSummary:
    """One scoring call: values computed now and found stored, per metric, and the backbone ids."""

    computed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    backbones: dict[str, str] = field(default_factory=dict)


def parse_metrics(text: str) -> list[str]:
    """``"clip_t,psnr"`` into ``["clip_t", "psnr"]``.

    Raises:
        ValueError: an unknown name (the message lists the known ones) or none at all.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; known: "
                         f"{', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def backbone_ids(names: dict[str, str]) -> dict[str, str]:
    """The recorded id of each backbone kind (clip, dino, lpips, fid, pixels), without loading."""
    from editeval.metrics.distribution import INCEPTION_ID
    from editeval.metrics.perceptual import STAND_IN_SEED

    lpips = names["lpips"]
    return {
        "clip": resolve_vision_checkpoint(names["clip"], "clip")[1],
        "dino": resolve_vision_checkpoint(names["dino"], "dino")[1],
        "lpips": f"lpips-alex-random-seed{STAND_IN_SEED}" if lpips == "alex-random"
        else f"lpips-{lpips}",
        "fid": INCEPTION_ID if names["fid"] == "inception"
        else "clip-image:" + resolve_vision_checkpoint(names["fid"], "clip")[1],
        "pixels": "pixels",
    }


class _Backbones:
    """The backbones of one call, each loaded on first use."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self._loaded: dict[str, Any] = {}

    def get(self, kind: str) -> Any:
        if kind not in self._loaded:
            from editeval.metrics.backbones import load_clip
            from editeval.metrics.distribution import load_feature_extractor
            from editeval.metrics.perceptual import load_lpips
            from editeval.metrics.structure import load_structure_backbone

            loaders = {"clip": load_clip, "dino": load_structure_backbone, "lpips": load_lpips,
                       "fid": load_feature_extractor}
            self._loaded[kind] = loaders[kind](self.names[kind])
        return self._loaded[kind]


def _load_pair(run: Run, row: Any, sample: Any) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray | None]:
    """Source, edit (resized to the source's size with Lanczos if it differs) and mask."""
    source = regions.read_rgb(sample.image_path)
    edit_image = Image.open(run.image_path(row)).convert("RGB")
    size = (source.shape[1], source.shape[0])
    if edit_image.size != size:
        edit_image = edit_image.resize(size, Image.Resampling.LANCZOS)
    return source, np.array(edit_image), regions.read_mask(sample.mask_path, size)


_NO_UNEDITED = "the mask covers the whole image: no unedited region"
_NO_EDITED = "the mask is empty: no edited region"


def _image_values(metrics: list[str], backbones: _Backbones, source: np.ndarray, edit: np.ndarray,
                  mask: np.ndarray | None, sample: Any) -> dict[str, tuple[str, float, str | None]]:
    """metric -> (region, value, note) for one edit."""
    from editeval.metrics import clip_similarity, pixel

    out: dict[str, tuple[str, float, str | None]] = {}
    nan = float("nan")
    region, kept = regions.region_of(mask, regions.UNEDITED)
    for name in ("psnr", "ssim", "mse", "lpips"):
        if name not in metrics:
            continue
        if kept is not None and not kept.any():
            out[name] = (region, nan, _NO_UNEDITED)
            continue
        a, b = regions.keep(source, kept), regions.keep(edit, kept)
        value = backbones.get("lpips")([a], [b])[0] if name == "lpips" else \
            getattr(pixel, name)(a, b)
        out[name] = (region, float(value), None)
    clip = backbones.get("clip") if {"clip_t", "clip_t_edited", "clip_i", "clip_dir"} & set(
        metrics) else None
    target = sample.target_prompt.strip()
    if "clip_t" in metrics:
        out["clip_t"] = ((regions.WHOLE, float(clip_similarity.clip_score(clip, [edit], [target])[0]),
                          None) if target else (regions.WHOLE, nan, "no target prompt"))
    if "clip_t_edited" in metrics:
        region_e, kept_e = regions.region_of(mask, regions.EDITED)
        if not target:
            out["clip_t_edited"] = (region_e, nan, "no target prompt")
        elif kept_e is not None and not kept_e.any():
            out["clip_t_edited"] = (region_e, nan, _NO_EDITED)
        else:
            value = clip_similarity.clip_score(clip, [regions.keep(edit, kept_e)], [target])[0]
            out["clip_t_edited"] = (region_e, float(value), None)
    if "clip_i" in metrics or "clip_dir" in metrics:
        images = clip.image_embeddings([source, edit])
        if "clip_i" in metrics:
            value = clip_similarity.clip_image_similarity(images[:1], images[1:])[0]
            out["clip_i"] = (regions.WHOLE, float(value), None)
        if "clip_dir" in metrics:
            prompt = sample.source_prompt.strip()
            if not prompt or not target:
                out["clip_dir"] = (regions.WHOLE, nan, "needs both a source and a target prompt")
            else:
                texts = clip.text_embeddings([prompt, target])
                value = float(clip_similarity.directional_similarity(
                    images[:1], images[1:], texts[:1], texts[1:])[0])
                out["clip_dir"] = (regions.WHOLE, value, None if value == value else
                                   "no change of image or prompt embedding: direction undefined")
    if "dino_struct" in metrics:
        value = backbones.get("dino").distance([source], [edit])[0]
        out["dino_struct"] = (regions.WHOLE, float(value), None)
    return out


def _digest(job_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(job_ids)).encode()).hexdigest()


def score_metrics(run: Run, metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS, *,
                  clip_model: str | None = None, dino_model: str | None = None,
                  lpips_net: str | None = None, fid_model: str | None = None,
                  batch_size: int = 16, progress: Any = None) -> MetricSummary:
    """Add the ``metrics`` of every finished edit of ``run`` to its store (see the module
    docstring). Backbone names default to :func:`editeval.metrics.backbones.default_backbones` of the
    run's model. ``progress``: optional callable ``(done, total)`` called after each batch.

    Raises:
        ValueError: an unknown metric, or edits of samples the run's dataset no longer has.
        BackboneUnavailableError: a needed backbone cannot be loaded (nothing is lost: values
            computed before are stored).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    samples = run.samples
    names = default_backbones(run.model)
    for kind, given in (("clip", clip_model), ("dino", dino_model), ("lpips", lpips_net),
                        ("fid", fid_model)):
        names[kind] = given or names[kind]
    ids = backbone_ids(names)
    backbones = _Backbones(names)
    summary = MetricSummary(backbones={m: ids[BACKBONE_KIND[m]] for m in metrics})
    store = run.store
    rows = run.rows("done")
    missing = sorted({r.sample_id for r in rows} - set(samples))
    if missing:
        raise ValueError(f"{run.path}'s dataset has no sample {missing[0]} (and "
                         f"{len(missing) - 1} more); was the dataset changed since the run?")
    per_image = [m for m in metrics if m in PER_IMAGE_METRICS]
    todo: dict[str, list[str]] = defaultdict(list)  # job id -> metrics to compute
    for metric in per_image:
        done = store.metric_computed(metric, ids[BACKBONE_KIND[metric]])
        for row in rows:
            if row.job_id in done:
                summary.skipped[metric] += 1
            else:
                todo[row.job_id].append(metric)
    pending = [r for r in rows if r.job_id in todo]
    for start in range(0, len(pending), batch_size):
        values = []
        for row in pending[start:start + batch_size]:
            sample = samples[row.sample_id]
            source, edit, mask = _load_pair(run, row, sample)
            wanted = todo[row.job_id]
            for metric, (region, value, note) in _image_values(
                    wanted, backbones, source, edit, mask, sample).items():
                values.append((row.job_id, metric, ids[BACKBONE_KIND[metric]], region, value,
                               note))
                summary.computed[metric] += 1
        store.record_metric_values(values)
        if progress is not None:
            progress(min(start + batch_size, len(pending)), len(pending))
    for metric in (m for m in metrics if m in SET_METRICS):
        _score_sets(run, store, rows, samples, metric, ids["fid"], backbones, summary)
    return summary


def _score_sets(run: Run, store: ResultStore, rows: list[Any], samples: dict[str, Any],
                metric: str, backbone: str, backbones: _Backbones, summary: MetricSummary) -> None:
    from editeval.metrics.distribution import fid, kid

    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row.method, row.task)].append(row)
        groups[(row.method, ALL_TASKS)].append(row)
    for (method, task), members in sorted(groups.items()):
        digest = _digest([r.job_id for r in members])
        if store.set_metric_digest(method, task, metric, backbone) == digest:
            summary.skipped[metric] += 1
            continue
        value, std = float("nan"), None
        if len(members) >= 2:
            pairs = [_load_pair(run, r, samples[r.sample_id]) for r in members]
            sources, edits = [p[0] for p in pairs], [p[1] for p in pairs]
            extractor = backbones.get("fid")
            if metric == "fid":
                value = fid(extractor, sources, edits)
            else:
                value, std = kid(extractor, sources, edits)
        store.record_set_metric(method=method, task=task, metric=metric, backbone=backbone,
                                n=len(members), value=value, std=std, jobs_digest=digest)
        summary.computed[metric] += 1


def _task_order(task: str) -> int:
    return TASKS.index(task) if task in TASKS else len(TASKS)


def metric_table(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The method x task tables of a scored run.

    Returns:
        ``(per_image, sets)``. ``per_image``: one row per (method, task, metric, backbone) with the
        region(s), ``mean`` and ``std`` (population, ddof 0) over the images with a value, ``n``
        (images with a value) and ``nan`` (images without one, dropped), plus ``task="all"`` rows
        per method. ``sets``: the stored FID/KID rows (``value``, ``std`` for KID, ``n``).
    """
    frame = pd.DataFrame(run.store.metric_values())
    sets = pd.DataFrame(run.store.set_metric_values())
    rows = []
    if not frame.empty:
        everything = pd.concat([frame, frame.assign(task=ALL_TASKS)])
        for (method, task, metric, backbone), group in everything.groupby(
                ["method", "task", "metric", "backbone"]):
            values = group["value"].to_numpy(dtype=float)
            finite = values[~np.isnan(values)]  # inf (identical regions: PSNR) is kept
            with np.errstate(invalid="ignore"):  # the std of values with an inf is NaN
                std = float(finite.std()) if finite.size else float("nan")
            rows.append({
                "method": method, "task": task, "metric": metric, "backbone": backbone,
                "region": "/".join(sorted(set(group["region"]))),
                "mean": float(finite.mean()) if finite.size else float("nan"),
                "std": std,
                "n": int(finite.size), "nan": int(np.isnan(values).sum()),
            })
    per_image = pd.DataFrame(rows, columns=["method", "task", "metric", "backbone", "region",
                                            "mean", "std", "n", "nan"])
    if not per_image.empty:
        per_image = per_image.assign(
            order=per_image["metric"].map(METRICS.index),
            task_order=per_image["task"].map(_task_order)).sort_values(
            ["order", "method", "task_order"]).drop(columns=["order", "task_order"])
    if not sets.empty:
        sets = sets.assign(order=sets["metric"].map(METRICS.index),
                           task_order=sets["task"].map(_task_order)).sort_values(
            ["order", "method", "task_order"])[
            ["method", "task", "metric", "backbone", "value", "std", "n"]]
    return per_image.reset_index(drop=True), sets.reset_index(drop=True)


def _number(value: float, digits: int = 4) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}g}"


def metrics_markdown(per_image: pd.DataFrame, sets: pd.DataFrame) -> str:
    """Markdown tables: per metric and backbone, one row per method and task (mean, std, n, NaNs
    dropped); then FID/KID."""
    lines = []
    for (metric, backbone), group in per_image.groupby(["metric", "backbone"], sort=False):
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        lines += [f"### {metric} ({better} is better; backbone `{backbone}`)", "",
                  "| method | task | region | mean | std | n | NaN dropped |",
                  "|---|---|---|---|---|---|---|"]
        for row in group.itertuples():
            lines.append(f"| {row.method} | {row.task} | {row.region} | {_number(row.mean)} | "
                         f"{_number(row.std)} | {row.n} | {row.nan} |")
        lines.append("")
    for (metric, backbone), group in (sets.groupby(["metric", "backbone"], sort=False)
                                      if not sets.empty else []):
        lines += [f"### {metric} (lower is better; features `{backbone}`; edits against their "
                  "sources)", "", "| method | task | value | std | n |", "|---|---|---|---|---|"]
        for row in group.itertuples():
            lines.append(f"| {row.method} | {row.task} | {_number(row.value)} | "
                         f"{_number(row.std)} | {row.n} |")
        lines.append("")
    return "\n".join(lines) if lines else "no metric values stored yet\n"
