"""Writing a run's report: ``index.html`` (one page, no server, no network), ``Leaderboard.md``,
the plots, full images and thumbnails, in one folder that opens by double-click.

Layout of the report folder::

    index.html        leaderboard, plots, filters, one grid row per sample
    Leaderboard.md    the survey's leaderboard format (LMM Score per task)
    plots/*.png       the figures (:mod:`editeval.report.plots`)
    full/...          the images at their size (hard links to the run's files where the file
                      system allows, copies otherwise): sources/, targets/, masks/ (the
                      dataset's), edits/ (by method), generated/ (the methods' masks)
    thumbs/...        the same images at most THUMB_SIDE px on their longer side (JPEG; masks PNG)

A rebuild only redoes the files whose source changed, so a report follows a growing run cheaply.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from editeval.core.files import atomic_write
from editeval.core.lmm_score import FACTORS
from editeval.judge import public_judge_name, to_markdown
from editeval.report import plots
from editeval.report.build import ALL_TASKS, LMM, Edit, GridRow, ReportData, collect
from editeval.run import Run
from editeval.run.intermediates import load_intermediates
from editeval.study import analyze, ratings_table

THUMB_SIDE = 256
"""Thumbnails' longer side in pixels (at most; smaller images keep their size)."""

STUDY_FIGURES = {
    "lmm_vs_human.png": "The user study: LMM Score against the human mean S_all per edit, per "
                        "task, with Pearson's r and its bootstrap confidence interval.",
    "lmm_vs_clipscore.png": "LMM Score and CLIPScore as predictors of the user study: Pearson's "
                            "r per task.",
}


@dataclass(frozen=True)
class Picture:
    """An image in the report: paths relative to the report folder (URL-quoted) and the
    thumbnail's size in pixels."""

    full: str
    thumb: str
    width: int
    height: int


def _fresh(target: Path, source: Path) -> bool:
    return target.exists() and target.stat().st_mtime >= source.stat().st_mtime


class _Images:
    """Publishes images into the report folder: full size (a hard link or a copy) and a
    thumbnail, each redone only when its source is newer."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _full(self, source: Path, relative: str) -> Path:
        target = self.out / "full" / relative
        if target.exists() and (os.path.samefile(source, target) or (
                target.stat().st_size == source.stat().st_size
                and target.stat().st_mtime == source.stat().st_mtime)):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(source, target)
        return target

    def publish(self, source: Path, relative: str, *, mask: bool = False) -> Picture:
        """``source`` as ``full/RELATIVE`` and ``thumbs/RELATIVE`` (``.jpg``; ``.png`` for a
        mask, whose hard edges JPEG would blur).

        Raises:
            FileNotFoundError: ``source`` does not exist.
        """
        full = self._full(source, relative)
        thumb = (self.out / "thumbs" / relative).with_suffix(".png" if mask else ".jpg")
        if _fresh(thumb, full):
            with Image.open(thumb) as image:
                size = image.size
        else:
            with Image.open(full) as image:
                image.draft(None, (THUMB_SIDE, THUMB_SIDE))  # a JPEG decodes at a reduced scale
                small = image.convert("L" if mask else "RGB")
                # a box reduction by the integer factor, then Lanczos: 9x faster at 512 px
                small.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS,
                                reducing_gap=1.0)
            thumb.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(thumb, lambda handle: small.save(
                handle, format="PNG" if mask else "JPEG", quality=88))
            size = small.size
        return Picture(_url(full.relative_to(self.out)), _url(thumb.relative_to(self.out)),
                       *size)


def _url(path: Path) -> str:
    return quote(path.as_posix())


def mask_image(value: Any, size: tuple[int, int]) -> Image.Image:
    """A generated mask as an 8-bit grey image of ``size`` (width, height), nearest-neighbour
    scaled: white = 1 (the edit region). A PIL image is converted to grey; a 2-D tensor or array
    of values in 0..1 (or booleans) is scaled by 255, any other range min-max normalised."""
    if isinstance(value, Image.Image):
        grey = value.convert("L")
    else:
        array = (value.float().numpy() if isinstance(value, torch.Tensor)
                 else np.asarray(value, dtype=np.float32))
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if low < 0 or high > 1:
            array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        grey = Image.fromarray(np.nan_to_num(array * 255).round().astype(np.uint8))
    return grey.resize(size, Image.Resampling.NEAREST)


def _number(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for a missing value, ``digits`` decimals below 100, none above."""
    if value is None or pd.isna(value):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not np.isfinite(value):
        return str(value)  # PSNR of identical regions: inf
    return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.0f}"


def _metric(value: Any) -> str:
    """A classic metric's value: 4 significant digits (``-`` when missing)."""
    return "-" if value is None or pd.isna(value) else f"{float(value):.4g}"


def _mean_std(row: dict, prefix: str) -> str:
    """``mean ± std`` of a leaderboard row's score ``prefix``: 2 decimals for LMM Score, for a
    metric 4 significant digits of the mean and the std to the same decimals; then the images
    left out for having no value."""
    mean, std = row[f"{prefix}_mean"], row[f"{prefix}_std"]
    if pd.isna(mean):
        text = "-"
    elif prefix == LMM:
        text = f"{_number(mean)} ± {_number(std)}"
    elif not np.isfinite(mean):
        text = f"{mean} ± -"  # PSNR with identical regions: inf
    else:
        digits = max(0, 3 - int(np.floor(np.log10(abs(mean))))) if mean else 4
        text = f"{mean:.{digits}f} ± " + ("-" if pd.isna(std) else f"{std:.{digits}f}")
    dropped = row.get(f"{prefix}_nan", 0)
    return text + (f" ({int(dropped)} n/a)" if dropped > 0 else "")


def _edit_view(edit: Edit, images: _Images, run: Run) -> dict:
    """What one edit's cell shows (pictures written on the way)."""
    row = edit.row
    view: dict[str, Any] = {"job_id": row.job_id, "seed": row.seed, "status": row.status,
                            "error": row.error, "picture": None, "masks": [],
                            "s_all": _number(edit.s_all), "judgements": [],
                            "metrics": [(k, _metric(v)) for k, v in edit.metrics.items()],
                            "nfe": _number(row.nfe), "uncached_nfe": _number(row.uncached_nfe),
                            "backward": _number(row.backward_passes),
                            "seconds": _number(row.wall_seconds)}
    source = run.image_path(row) if row.status == "done" else None
    if source is not None and not source.is_file():  # deleted since: the bench redoes the job
        view.update(status="failed", error=f"the edited image {source} is missing; run the "
                                           "same `editeval bench` command again to redo it")
    elif source is not None:
        relative = Path(row.image_path).relative_to("images")  # METHOD/TASK/N_seedS.png
        view["picture"] = images.publish(source, f"edits/{relative.as_posix()}")
        with Image.open(source) as image:
            size = image.size
        for name, value in load_intermediates(edit.masks, run.path).items():
            target = images.out / "full" / "generated" / relative.with_suffix("") / f"{name}.png"
            stored = run.path / edit.masks[name]["$file"]
            if not _fresh(target, stored):
                target.parent.mkdir(parents=True, exist_ok=True)
                grey = mask_image(value, size)
                atomic_write(target, lambda handle, g=grey: g.save(handle, format="PNG"))
            view["masks"].append((name, images.publish(
                target, target.relative_to(images.out / "full").as_posix(), mask=True)))
    for j in edit.judgements:
        factors = "/".join("-" if j.scores[f] is None else str(j.scores[f]) for f in FACTORS)
        view["judgements"].append({
            "repeat": j.repeat, "status": j.status, "s_all": _number(j.s_all),
            "factors": factors, "message": j.message, "raw": j.raw,
            "position": j.position, "group_size": j.group_size})
    return view


def _leaderboard_sections(data: ReportData) -> list[dict]:
    """The leaderboard as one table per task (all tasks first), cells formatted."""
    table = data.table
    columns = [("LMM Score", "lmm")] if data.identity else []
    columns += [(label, label) for label in data.metrics]
    sets = [c for c in ("fid", "kid") if c in table.columns]
    sections = []
    for task, rows in table.groupby("task", sort=False):
        body = []
        for r in rows.to_dict("records"):
            cells = [_mean_std(r, p) for _, p in columns]
            if data.identity:
                cells.append(_number(r["lmm_n"], 0) + (
                    f" ({int(r['lmm_failures'])} failed)" if r["lmm_failures"] > 0 else ""))
            cells += [_metric(r[s]) for s in sets]
            cells += [_number(r["nfe"], 0), _number(r["uncached_nfe"], 0),
                      _number(r["backward"], 0), _number(r["seconds"]),
                      f"{r['done']}" + (f" ({r['failed']} failed)" if r["failed"] else "")]
            rank = "-" if pd.isna(r["rank"]) else str(int(r["rank"]))
            body.append({"method": r["method"], "rank": rank, "cells": cells})
        sections.append({"task": task, "title": "All tasks" if task == ALL_TASKS
                         else task.replace("_", " ").capitalize(), "rows": body})
    header = [label + (" (mean ± std)" if p == LMM else "") for label, p in columns]
    header += ["judged"] if data.identity else []
    header += [s.upper() for s in sets]
    header += ["NFE spent", "NFE (own)", "backward passes", "s/edit", "jobs"]
    return [{"header": header, **s} for s in sections]


def leaderboard_markdown(data: ReportData) -> str:
    """``Leaderboard.md``: the survey's format (:func:`editeval.judge.to_markdown`), or, for a
    run without LMM Score, a line saying how to score it."""
    if data.identity is None:
        return (f"# Leaderboard\n\nNo LMM Score yet: run `editeval score {data.run.path} --judge "
                "...` (`--judge oracle` on the toy world), then `editeval report` again.\n")
    return to_markdown(data.judge_table, data.identity)


def _plots(data: ReportData, out: Path) -> list[dict]:
    """The report's figures, and, once the run has a user study with ratings, the study's two
    (:func:`editeval.study.analyze`, written with its tables to ``OUT/study``)."""
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    if data.headline is not None:
        column, label = data.headline
        made.append((plots.score_by_task(data.table, column, label, data.methods,
                                         folder / "score_by_task.png"),
                     f"{label} by task and method: mean and standard deviation over samples."))
        made.append((plots.score_against_nfe(data.table, column, label, data.methods,
                                             folder / "score_vs_nfe.png"),
                     (f"{label} against NFE per edit (each method's own cost); the dashed line "
                      "is the cost-quality front.")))
    if data.identity is not None and not ratings_table(data.run).empty:
        study = analyze(data.run, out / "study", judge=data.identity["judge"])
        for name, caption in STUDY_FIGURES.items():
            if name in study.files:
                made.append((study.files[name], caption))
    return [{"src": _url(path.relative_to(out)), "caption": caption} for path, caption in made]


def build_report(run: Run, out: str | os.PathLike | None = None, *,
                 judge: str | None = None) -> Path:
    """Write the report of ``run`` into ``out`` (default ``RUN_DIR/report``); returns the path
    of its ``index.html``.

    Args:
        run: an open run. out: the report folder (created; files of an earlier report there are
            reused where their source has not changed). judge: which judge's LMM Score, when the
            run holds several.

    Raises:
        ValueError: the run has no jobs, several judges and ``judge`` picks none, or jobs of
            samples its dataset no longer has.
        DatasetError: the run's dataset cannot be loaded.
    """
    data = collect(run, judge)
    out = Path(out) if out is not None else run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = _Images(out)

    def view(grid_row: GridRow) -> dict:
        sample = grid_row.sample
        pictures = {kind: None if path is None else images.publish(
                        path, f"{kind}s/{sample.id}{path.suffix}", mask=kind == "mask")
                    for kind, path in (("source", sample.image_path),
                                       ("target", sample.target_image_path),
                                       ("mask", sample.mask_path))}
        return {"sample": sample, **pictures, "cells": [
            {"method": m, "edits": [_edit_view(e, images, run) for e in grid_row.edits.get(m, [])]}
            for m in data.methods]}

    # images are decoded, scaled and encoded by Pillow, which lets other threads run meanwhile:
    # as many at once as torch may use (`editeval --threads`, OMP_NUM_THREADS)
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        grid = list(pool.map(view, data.rows))
    answers: dict[str, str] = {}  # each distinct answer once: a conversation's is shared
    for judgement in (j for row in grid for cell in row["cells"] for e in cell["edits"]
                      for j in e["judgements"]):
        judgement["raw"] = answers.setdefault(judgement["raw"], str(len(answers)))
    rows = data.run.rows()
    page = _TEMPLATE.render(
        run=run, data=data, grid=grid, plots=_plots(data, out),
        targets=any(row["target"] for row in grid),
        judge=public_judge_name(data.identity["judge"]) if data.identity else None,
        leaderboard=_leaderboard_sections(data),
        raw_answers={key: text for text, key in answers.items()},
        done=sum(r.status == "done" for r in rows), failed=sum(r.status == "failed" for r in rows),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "Leaderboard.md").write_text(leaderboard_markdown(data), encoding="utf-8")
    return out / "index.html"


_TEMPLATE = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True,
                               undefined=jinja2.StrictUndefined).from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>editeval report: {{ run.path.name }}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 3em; color: #222; }
h1 { margin: .6em 0 .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.meta { color: #555; }
.filters { position: sticky; top: 0; z-index: 3; background: #f6f6f6; padding: .5em .8em;
           border: 1px solid #ddd; margin: 1em 0; }
.filters label { margin-right: .9em; white-space: nowrap; }
table { border-collapse: collapse; }
.board td, .board th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.board td.method, .board th.method { text-align: left; }
.board section { margin-bottom: 1em; }
.plots figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
.plots img { max-width: 100%; border: 1px solid #eee; }
.grid { margin-top: .5em; }
.grid th { position: sticky; top: 2.6em; background: #fff; z-index: 2; border-bottom: 1px solid #999; }
.grid td, .grid th { vertical-align: top; padding: 4px; border-right: 1px solid #eee; }
.grid tr.sample { border-bottom: 1px solid #ccc; }
.grid td { width: 168px; min-width: 168px; font-size: 12px; }
.grid td.case { width: 220px; min-width: 220px; }
.grid img { width: 160px; height: auto; image-rendering: pixelated; background: #eee; display: block; }
.grid img.mask { width: 72px; display: inline-block; margin: 2px 2px 0 0; outline: 1px solid #999; }
.prompt { color: #333; margin: 2px 0; } .prompt b { color: #777; font-weight: normal; }
.score { font-weight: 600; }
.failed { background: #fff0f0; }
.failed pre, details pre { white-space: pre-wrap; word-break: break-word; font-size: 11px;
                           max-height: 24em; overflow: auto; background: #f8f8f8; padding: 4px; }
.missing { color: #999; font-style: italic; }
.muted { color: #777; }
</style>
</head>
<body>
<h1>{{ run.path.name }}</h1>
<p class="meta">dataset <b>{{ run.config.dataset }}</b>, model <b>{{ run.model }}</b>,
{{ data.methods|length }} methods, {{ data.rows|length }} samples; {{ done }} edits done,
{{ failed }} failed.
{% if data.identity %}LMM Score by <b>{{ judge }}</b> (protocol {{ data.identity.protocol_version }}, {{ data.identity.mode }} mode).
{% else %}No LMM Score yet (<code>editeval score {{ run.path }} --judge ...</code>).{% endif %}
Made {{ created }} by <code>editeval report</code>.
<a href="Leaderboard.md">Leaderboard.md</a></p>

<div class="filters" id="filters">
<label>Task <select id="task-filter">
<option value="">all tasks</option>
{% for task in data.tasks %}<option value="{{ task }}">{{ task }}</option>
{% endfor %}
</select></label>
Methods:
{% for method in data.methods %}<label><input type="checkbox" class="method-filter" value="{{ method }}" checked> {{ method }}</label>
{% endfor %}
</div>

<h2 id="leaderboard">Leaderboard</h2>
<div class="board">
{% for section in leaderboard %}
<section{% if section.task != "all" %} data-task="{{ section.task }}"{% endif %}>
<h3>{{ section.title }}</h3>
<table>
<thead><tr><th>rank</th><th class="method">method</th>{% for h in section.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in section.rows %}
<tr data-method="{{ row.method }}"><td>{{ row.rank }}</td><td class="method">{{ row.method }}</td>{% for c in row.cells %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
</section>
{% endfor %}
<p class="muted">Ranks by mean LMM Score (S_all = 0.4 acc + 0.3 pre + 0.2 qua + 0.1 real, 1..10);
std over samples. NFE spent: denoiser evaluations in this run (a reused inversion costs 0); NFE
(own): the method's cost on its own; backward passes: gradient steps through the denoiser (test-time
finetuning and guidance by gradients).</p>
</div>

{% if plots %}
<h2 id="plots">Plots</h2>
<div class="plots">
{% for p in plots %}<figure><img src="{{ p.src }}" alt="{{ p.caption }}"><figcaption>{{ p.caption }}</figcaption></figure>
{% endfor %}
</div>
{% endif %}

<h2 id="grid">Edits</h2>
<table class="grid">
<thead><tr><th>sample</th><th>source</th>{% if targets %}<th>target (ground truth)</th>{% endif %}{% for method in data.methods %}<th data-method="{{ method }}">{{ method }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in grid %}
<tr class="sample" id="{{ row.sample.id }}" data-task="{{ row.sample.task }}">
<td class="case"><b>{{ row.sample.id }}</b>
{% if row.sample.source_prompt %}<div class="prompt"><b>source:</b> {{ row.sample.source_prompt }}</div>{% endif %}
{% if row.sample.target_prompt %}<div class="prompt"><b>target:</b> {{ row.sample.target_prompt }}</div>{% endif %}
{% if row.sample.instruction %}<div class="prompt"><b>instruction:</b> {{ row.sample.instruction }}</div>{% endif %}
{% if row.mask %}<div class="muted">edit mask (white: edit)</div>
<a href="{{ row.mask.full }}"><img class="mask" src="{{ row.mask.thumb }}" width="{{ row.mask.width }}" height="{{ row.mask.height }}" loading="lazy" alt="edit mask of {{ row.sample.id }}"></a>
{% endif %}
</td>
<td><a href="{{ row.source.full }}"><img src="{{ row.source.thumb }}" width="{{ row.source.width }}" height="{{ row.source.height }}" loading="lazy" alt="source of {{ row.sample.id }}"></a></td>
{% if targets %}<td>{% if row.target %}<a href="{{ row.target.full }}"><img src="{{ row.target.thumb }}" width="{{ row.target.width }}" height="{{ row.target.height }}" loading="lazy" alt="ground-truth target of {{ row.sample.id }}"></a>{% endif %}</td>{% endif %}
{% for cell in row.cells %}
<td data-method="{{ cell.method }}"{% if cell.edits and cell.edits|selectattr("status", "eq", "failed")|list %} class="failed"{% endif %}>
{% if not cell.edits %}<span class="missing">not run</span>{% endif %}
{% for e in cell.edits %}
<div class="edit" data-job="{{ e.job_id }}">
{% if cell.edits|length > 1 %}<div class="muted">seed {{ e.seed }}</div>{% endif %}
{% if e.status == "failed" %}
<div><b>failed</b></div><pre class="error">{{ e.error }}</pre>
{% else %}
<a href="{{ e.picture.full }}"><img src="{{ e.picture.thumb }}" width="{{ e.picture.width }}" height="{{ e.picture.height }}" loading="lazy" alt="{{ cell.method }} on {{ row.sample.id }}"></a>
{% if e.judgements %}<div class="score">S_all {{ e.s_all }}</div>{% endif %}
{% for j in e.judgements %}
<details data-raw="{{ j.raw }}"><summary>{% if e.judgements|length > 1 %}#{{ j.repeat }} {% endif %}{% if j.status == "ok" %}{{ j.factors }} <span class="muted">(acc/pre/qua/real)</span>{% else %}<b>{{ j.status }}</b>{% endif %}</summary>
<div class="muted">image {{ j.position }} of {{ j.group_size }} in the judge's conversation{% if j.message %}; {{ j.message }}{% endif %}</div>
<pre></pre></details>
{% endfor %}
{% if e.metrics %}<div>{% for name, value in e.metrics %}{{ name }} {{ value }}{% if not loop.last %} · {% endif %}{% endfor %}</div>{% endif %}
<div class="muted">NFE {{ e.nfe }} (own {{ e.uncached_nfe }}){% if e.backward not in ("-", "0") %} · {{ e.backward }} backward{% endif %} · {{ e.seconds }} s</div>
{% for name, pic in e.masks %}<a href="{{ pic.full }}" title="{{ name }}"><img class="mask" src="{{ pic.thumb }}" width="{{ pic.width }}" height="{{ pic.height }}" loading="lazy" alt="{{ name }}"></a>{% endfor %}
{% if e.masks %}<div class="muted">generated: {{ e.masks|map("first")|join(", ") }}</div>{% endif %}
{% endif %}
</div>
{% endfor %}
</td>
{% endfor %}
</tr>
{% endfor %}
</tbody>
</table>

<script type="application/json" id="raw-answers">{{ raw_answers|tojson }}</script>
<script>
(function () {
  var answers = JSON.parse(document.getElementById("raw-answers").textContent);
  document.querySelectorAll("details[data-raw]").forEach(function (d) {
    d.addEventListener("toggle", function () {
      var pre = d.querySelector("pre");
      if (d.open && !pre.textContent) { pre.textContent = answers[d.dataset.raw]; }
    });
  });
  function apply() {
    var task = document.getElementById("task-filter").value;
    var shown = {};
    document.querySelectorAll(".method-filter").forEach(function (c) { shown[c.value] = c.checked; });
    document.querySelectorAll("[data-task]").forEach(function (e) {
      e.hidden = task !== "" && e.dataset.task !== task;
    });
    document.querySelectorAll("[data-method]").forEach(function (e) {
      e.hidden = !shown[e.dataset.method];
    });
  }
  document.getElementById("filters").addEventListener("change", apply);
  apply();
})();
</script>
</body>
</html>
""")
