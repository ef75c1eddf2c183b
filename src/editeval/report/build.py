"""What a run's report shows, gathered from the :class:`~editeval.run.Run`: the leaderboard (LMM
Score, classic metrics, cost) per task and overall, and one grid row per sample with every method's
edits, their scores, judge answers, generated masks and errors.

Nothing here reads the run directory by hand: rows, images, judgements, metric values and
intermediates all come through :class:`~editeval.run.Run` and its store.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from editeval.bench import summarize
from editeval.core.lmm_score import FACTORS
from editeval.core.samples import TASKS, Sample
from editeval.judge.leaderboard import judgements, leaderboard
from editeval.metrics import metric_table
from editeval.run import ResultRow, Run

ALL_TASKS = "all"
"""The ``task`` of the leaderboard rows that pool every task."""

LMM = "lmm"
"""The column prefix of LMM Score (S_all) in :func:`leaderboard_table`."""


@dataclass(frozen=True)
class Judgement:
    """One judge answer about one edit (one repeat).

    Attributes:
        repeat: the repeat index (0-based). status: ``ok``, ``parse_failed``, ``refused`` or
        ``error``. scores: factor -> integer 1..10 (``None`` where the answer gave none).
        s_all: the weighted overall score, 1..10, or ``None``. position / group_size: the edit's
        place in the judge's conversation (1-based) and how many edits it held. message: the
        parser's or provider's message. raw: the judge's raw answer text.
    """

    repeat: int
    status: str
    scores: dict[str, int | None]
    s_all: float | None
    position: int
    group_size: int
    message: str
    raw: str


@dataclass
class Edit:
    """One job of the run as the grid shows it.

    Attributes:
        row: the stored job (done or failed; a failed one has ``row.error``).
        judgements: the chosen judge's answers about it, by repeat.
        metrics: metric label (see :func:`metric_labels`) -> per-image value (NaN: no value).
        masks: the job's generated masks as stored intermediates (name -> stored reference of a
            PIL image, or of a 2-D tensor or array); load them with
            :func:`editeval.run.intermediates.load_intermediates`.
    """

    row: ResultRow
    judgements: list[Judgement] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)

    @property
    def s_all(self) -> float | None:
        """The mean S_all over the answers that parsed, or ``None``."""
        scores = [j.s_all for j in self.judgements if j.status == "ok" and j.s_all is not None]
        return float(np.mean(scores)) if scores else None


@dataclass
class GridRow:
    """One sample: its case and every method's edits (one per seed) by method name."""

    sample: Sample
    edits: dict[str, list[Edit]]


@dataclass
class ReportData:
    """Everything a report shows.

    Attributes:
        run: the run. methods: method names in the run's fixed order (the order of the run's
        config, then any other stored method by name). tasks: the tasks with jobs, canonical order.
        table: :func:`leaderboard_table`. identity: the judge (``judge``, ``protocol_version``,
        ``mode``) or ``None`` when the run has no LMM Score. judge_table: the judge's per-task
        leaderboard (:func:`editeval.judge.leaderboard`) or ``None``. metrics: metric labels,
        in the table's order. rows: one :class:`GridRow` per sample with jobs, dataset order.
        headline: the column prefix and label of the score the plots show (LMM Score when the
        run has it, else the first metric), or ``None`` when the run is not scored.
    """

    run: Run
    methods: list[str]
    tasks: list[str]
    table: pd.DataFrame
    identity: dict[str, str] | None
    judge_table: pd.DataFrame | None
    metrics: list[str]
    rows: list[GridRow]
    headline: tuple[str, str] | None


def method_order(run: Run, rows: list[ResultRow]) -> list[str]:
    """The run's methods in a fixed order: as its config lists them, then any other stored method
    in name order."""
    configured = list(dict.fromkeys(run.config.get("methods", [])))
    return configured + sorted({r.method for r in rows} - set(configured))


def metric_labels(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(metric, backbone) -> the column label: the metric's name, with the backbone in
    parentheses where the run holds the metric by several backbones."""
    count = defaultdict(int)
    for metric, _ in pairs:
        count[metric] += 1
    return {(m, b): m if count[m] == 1 else f"{m} ({b})" for m, b in pairs}


def _judge(run: Run, judge: str | None) -> tuple[pd.DataFrame | None, dict | None,
                                                   pd.DataFrame]:
    """The judge's per-task leaderboard, its identity and its answers (empty without any)."""
    if not run.store.judgements():
        if judge is not None:
            raise ValueError(f"{run.path} holds no judge scores, so --judge {judge} picks none; "
                             f"run `editeval score {run.path} --judge {judge}` first")
        return None, None, pd.DataFrame()
    answers, identity = judgements(run, judge)
    table, _ = leaderboard(run, judge)
    return table, identity, answers


def _overall_lmm(answers: pd.DataFrame) -> pd.DataFrame:
    """Per method over all tasks, as the judge's leaderboard per task: mean and std (ddof 0)
    over edits of each edit's mean S_all over its parsed repeats; n, failures, items."""
    ok = answers[answers["status"] == "ok"]
    per_job = ok.groupby(["method", "job_id"])["s_all"].mean().reset_index()
    scored = per_job.groupby("method")["s_all"].agg(
        mean="mean", std=lambda v: v.std(ddof=0), n="count")
    counted = answers.groupby("method")["status"].agg(
        items="count", failures=lambda s: int((s != "ok").sum()))
    return counted.join(scored).reset_index()


def leaderboard_table(run: Run, judge: str | None = None) -> tuple[pd.DataFrame, dict | None,
                                                                    pd.DataFrame | None]:
    """The report's leaderboard: one row per (task, method), ``task="all"`` rows pooling every
    task, ranked by LMM Score mean within each task.

    Columns: ``task``, ``rank`` (1 = best; NaN without LMM Score), ``method``;
    ``lmm_mean``/``lmm_std`` (S_all, 1..10, over samples; std with ddof 0), ``lmm_n`` (edits
    with a score), ``lmm_failures``/``lmm_items`` (answers without a score / all answers), NaN
    without a judgement; for each per-image metric label ``L`` (:func:`metric_labels`)
    ``L_mean``/``L_std``/``L_nan`` (images without a value, dropped); ``fid``/``kid`` where
    stored; ``nfe`` (mean NFE spent in this run), ``uncached_nfe`` (mean NFE on its own),
    ``backward`` (mean backward passes through the denoiser), ``seconds`` (mean wall seconds per edit), ``done``/``failed`` (jobs).

    Per-task ranks are the judge leaderboard's (:func:`editeval.judge.leaderboard`); the
    ``all`` rows are ranked alike: by mean, methods whose means agree to the 2 decimals shown
    sharing the best rank, a method without a score unranked.

    Returns:
        ``(table, identity, judge_table)``: identity and judge table are ``None`` for a run
        without LMM Score.

    Raises:
        ValueError: the run has no jobs, or several judges and ``judge`` picks none of them.
    """
    rows = run.rows()
    if not rows:
        raise ValueError(f"{run.path} holds no finished jobs yet; run `editeval bench ... --out "
                         f"{run.path}` first")
    methods = method_order(run, rows)
    tasks = [t for t in TASKS if any(r.task == t for r in rows)]
    tasks += sorted({r.task for r in rows} - set(tasks))
    records = []
    for task in [*tasks, ALL_TASKS]:
        cost = summarize(r for r in rows if task == ALL_TASKS or r.task == task)
        for method in methods:
            if method in cost:
                c = cost[method]
                records.append({"task": task, "method": method, "nfe": c["mean_nfe"],
                                "uncached_nfe": c["mean_uncached_nfe"],
                                "backward": c["mean_backward"],
                                "seconds": c["mean_seconds"], "done": c["done"],
                                "failed": c["failed"]})
    table = pd.DataFrame(records)
    judge_table, identity, answers = _judge(run, judge)
    lmm_columns = ["lmm_mean", "lmm_std", "lmm_n", "lmm_failures", "lmm_items"]
    if judge_table is not None:
        overall = _overall_lmm(answers).assign(task=ALL_TASKS)
        lmm = pd.concat([judge_table, overall]).rename(columns={
            "mean": "lmm_mean", "std": "lmm_std", "n": "lmm_n", "failures": "lmm_failures",
            "items": "lmm_items"})
        lmm["rank"] = lmm["rank"].astype(float)  # NaN: unranked
        everything = lmm["task"] == ALL_TASKS
        shown = lmm.loc[everything, "lmm_mean"].map(lambda m: float(f"{m:.2f}"))
        lmm.loc[everything, "rank"] = shown.rank(method="min", ascending=False)
        table = table.merge(lmm[["task", "method", "rank", *lmm_columns]],
                            on=["task", "method"], how="left")
    else:
        table = table.assign(rank=np.nan, **{c: np.nan for c in lmm_columns})
    per_image, sets = metric_table(run)
    labels = metric_labels(list(dict.fromkeys(zip(per_image["metric"], per_image["backbone"]))))
    for (metric, backbone), label in labels.items():
        part = per_image[(per_image["metric"] == metric) & (per_image["backbone"] == backbone)]
        part = part[["task", "method", "mean", "std", "nan"]].rename(columns={
            "mean": f"{label}_mean", "std": f"{label}_std", "nan": f"{label}_nan"})
        table = table.merge(part, on=["task", "method"], how="left")
    if not sets.empty:
        set_labels = metric_labels(list(dict.fromkeys(zip(sets["metric"], sets["backbone"]))))
        for (metric, backbone), label in set_labels.items():
            part = sets[(sets["metric"] == metric) & (sets["backbone"] == backbone)]
            table = table.merge(part[["task", "method", "value"]].rename(
                columns={"value": label}), on=["task", "method"], how="left")
    order = {m: i for i, m in enumerate(methods)}
    table = table.assign(
        _task=table["task"].map({t: i for i, t in enumerate([ALL_TASKS, *tasks])}),
        _method=table["method"].map(order)).sort_values(
        ["_task", "rank", "_method"], na_position="last").drop(columns=["_task", "_method"])
    front = ["task", "rank", "method", *lmm_columns]
    return (table[front + [c for c in table.columns if c not in front]].reset_index(drop=True),
            identity, judge_table)


def _is_mask(stored: Any) -> bool:
    """A stored intermediate that is a mask: a PIL image, or a 2-D tensor or array (a map)."""
    if not (isinstance(stored, Mapping) and "$file" in stored):
        return False
    return stored["type"] == "image" or len(stored.get("shape", ())) == 2


def collect(run: Run, judge: str | None = None) -> ReportData:
    """Everything :func:`editeval.report.build_report` shows about ``run``.

    Raises:
        ValueError: the run has no jobs, several judges and ``judge`` picks none, or jobs of
            samples that its dataset no longer has.
        DatasetError: the run's dataset cannot be loaded.
    """
    table, identity, judge_table = leaderboard_table(run, judge)
    rows = run.rows()
    samples = run.samples
    missing = sorted({r.sample_id for r in rows} - set(samples))
    if missing:
        raise ValueError(f"{run.path}'s dataset has no sample {missing[0]} (and "
                         f"{len(missing) - 1} more); was the dataset changed since the run?")
    methods = method_order(run, rows)
    tasks = [t for t in table["task"].drop_duplicates() if t != ALL_TASKS]

    answers: dict[str, list[Judgement]] = defaultdict(list)
    if identity is not None:
        for a in run.store.judgements():  # the chosen judge's (identity: stored values)
            if all(a[key] == value for key, value in identity.items()):
                answers[a["job_id"]].append(Judgement(
                    repeat=a["repeat"], status=a["status"], scores={f: a[f] for f in FACTORS},
                    s_all=a["s_all"], position=a["position"], group_size=a["group_size"],
                    message=a["message"] or "", raw=a["raw"] or ""))
    values = pd.DataFrame(run.store.metric_values())
    per_edit: dict[str, dict[str, float]] = defaultdict(dict)
    metrics: list[str] = []
    if not values.empty:
        labels = metric_labels(list(dict.fromkeys(zip(values["metric"], values["backbone"]))))
        metrics = [f[:-5] for f in table.columns if f.endswith("_mean") and f != "lmm_mean"]
        for job_id, metric, backbone, value in values[
                ["job_id", "metric", "backbone", "value"]].itertuples(index=False):
            per_edit[job_id][labels[(metric, backbone)]] = value

    by_sample: dict[str, dict[str, list[Edit]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        masks = {name: ref for name, ref in (row.intermediates or {}).items() if _is_mask(ref)}
        by_sample[row.sample_id][row.method].append(Edit(
            row, sorted(answers.get(row.job_id, []), key=lambda j: j.repeat),
            per_edit.get(row.job_id, {}), masks))
    grid = [GridRow(sample, {m: sorted(e, key=lambda x: x.row.seed) for m, e in
                             by_sample[sample.id].items()})
            for sample in samples.values() if sample.id in by_sample]
    if identity is not None:
        headline = (LMM, "LMM Score (S_all)")
    elif metrics:
        headline = (metrics[0], metrics[0])
    else:
        headline = None
    return ReportData(run=run, methods=methods, tasks=tasks, table=table, identity=identity,
                      judge_table=judge_table, metrics=metrics, rows=grid, headline=headline)
