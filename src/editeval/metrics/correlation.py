"""How well each classic metric predicts the toy world's ground truth.

For every edit of one or more scored toy-world runs (``editeval score RUN --metrics ...``), the
oracle gives the ground truth (:func:`editeval.toyworld.dataset.judge_sample`):

- ``success``: every edited attribute (those that differ between the source and the target scene)
  holds in the edit (1) or not (0);
- ``edited_correct``: the share of edited attributes that hold, 0..1;
- ``unedited_psnr``: PSNR (dB) of the unedited region (mask = 0) of the edit against the
  ground-truth *target* (NaN for full masks: style changes);
- ``oracle_s_all``: the oracle judge's S_all (1..10) where the run was judged with
  ``editeval score RUN --judge oracle``.

:func:`correlation_table` then gives, per metric and ground-truth measure, over all edits pooled
(pairs with a NaN or infinite value dropped, ``n`` says how many are left): Pearson's r, Spearman's
rho, for ``success`` the ROC AUC of the metric oriented so that higher means "better" for it
(0.5: no better than chance; 1: separates successes from failures perfectly), and the mean over
tasks of the Spearman rho within each task (``spearman_within_task``: tasks differ in mask size,
which moves region metrics by itself). Set metrics (FID,
KID) exist per (run, method, task) only; :func:`group_table` correlates them, and the per-image
metrics' group means, with each group's success rate and mean unedited PSNR.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from scipy import stats

from editeval.metrics.scoring import ALL_TASKS, HIGHER_IS_BETTER, METRICS
from editeval.run import Run

TRUTHS = ("success", "edited_correct", "unedited_psnr", "oracle_s_all")


def _setting(run: Run, method: str) -> str:
    return f"{run.path.name}:{method}"


def edit_table(runs: list[Run]) -> pd.DataFrame:
    """One row per finished edit of the runs: setting (``RUN_NAME:method``), job id, task, the
    ground truth (:data:`TRUTHS`) and one column per ``metric@backbone`` stored in the runs.

    Raises:
        ValueError: a run is not of the toy world (no ground truth).
    """
    from editeval.toyworld.dataset import judge_sample

    frames = []
    for run in runs:
        samples = run.samples
        rows = run.rows("done")
        metrics = pd.DataFrame(run.store.metric_values())
        judged = pd.DataFrame(run.store.judgements())
        records = []
        for row in rows:
            sample = samples[row.sample_id]
            if "target_scene" not in sample.extra:
                raise ValueError(f"{run.path} is not a toy-world run: {sample.id} has no ground "
                                 "truth; correlations need editeval-toy runs")
            truth = judge_sample(sample, Image.open(run.image_path(row)))
            records.append({"setting": _setting(run, row.method), "job_id": row.job_id,
                            "task": row.task, "success": float(truth.score.success),
                            "edited_correct": truth.score.edited_correct,
                            "unedited_psnr": truth.unedited_psnr_vs_target})
        frame = pd.DataFrame(records)
        oracle = judged[(judged["judge"] == "oracle") & (judged["status"] == "ok")] \
            if not judged.empty else judged
        s_all = oracle.groupby("job_id")["s_all"].mean() if not oracle.empty else pd.Series()
        frame["oracle_s_all"] = frame["job_id"].map(s_all).astype(float)
        if not metrics.empty:
            wide = metrics.assign(column=metrics["metric"] + "@" + metrics["backbone"]).pivot(
                index="job_id", columns="column", values="value")
            frame = frame.join(wide, on="job_id")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _metric_columns(frame: pd.DataFrame) -> list[str]:
    columns = [c for c in frame.columns if "@" in c]
    return sorted(columns, key=lambda c: (METRICS.index(c.split("@")[0]), c))


def _finite_pairs(x: pd.Series, y: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    x, y = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _varies(x: np.ndarray, y: np.ndarray) -> bool:
    """At least 3 pairs, and neither side constant (a correlation is defined)."""
    return len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann-Whitney U / (n1 n0), ties count half)."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if not len(positives) or not len(negatives):
        return float("nan")
    u = stats.mannwhitneyu(positives, negatives, alternative="two-sided").statistic
    return float(u / (len(positives) * len(negatives)))


def correlation_table(edits: pd.DataFrame, truths: tuple[str, ...] = TRUTHS) -> pd.DataFrame:
    """Per metric column and ground-truth measure: n, Pearson r, Spearman rho (and, for
    ``success``, the oriented ROC AUC), over all edits pooled; see the module docstring."""
    rows = []
    for column in _metric_columns(edits):
        metric, backbone = column.split("@", 1)
        for truth in truths:
            x, y = _finite_pairs(edits[column], edits[truth])
            row = {"metric": metric, "backbone": backbone, "truth": truth, "n": len(x),
                   "pearson": float("nan"), "spearman": float("nan"), "auc": float("nan"),
                   "spearman_within_task": float("nan")}
            if _varies(x, y):
                row["pearson"] = float(stats.pearsonr(x, y).statistic)
                row["spearman"] = float(stats.spearmanr(x, y).statistic)
                if truth == "success":
                    row["auc"] = _auc(x if HIGHER_IS_BETTER[metric] else -x, y)
            within = [stats.spearmanr(*pair).statistic for pair in (
                _finite_pairs(group[column], group[truth]) for _, group in edits.groupby("task"))
                if _varies(*pair)]
            if within:
                row["spearman_within_task"] = float(np.mean(within))
            rows.append(row)
    return pd.DataFrame(rows)


def group_table(runs: list[Run], edits: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, task) group: FID/KID and per-image metric means against the group's success
    rate and mean unedited PSNR; Pearson and Spearman over groups (``n`` groups)."""
    groups = edits.groupby(["setting", "task"])
    means = groups[["success", "unedited_psnr"] + _metric_columns(edits)].mean()
    for run in runs:
        for row in run.store.set_metric_values():
            if row["task"] == ALL_TASKS:
                continue
            key = (_setting(run, row["method"]), row["task"])
            column = f"{row['metric']}@{row['backbone']}"
            means.loc[key, column] = np.nan if row["value"] is None else row["value"]
    means = means.reset_index()
    rows = []
    for column in _metric_columns(means):
        metric, backbone = column.split("@", 1)
        for truth in ("success", "unedited_psnr"):
            x, y = _finite_pairs(means[column], means[truth])
            ok = _varies(x, y)
            rows.append({"metric": metric, "backbone": backbone, "truth": f"group {truth}",
                         "n": len(x),
                         "pearson": float(stats.pearsonr(x, y).statistic) if ok else np.nan,
                         "spearman": float(stats.spearmanr(x, y).statistic) if ok else np.nan})
    return pd.DataFrame(rows)


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:+.2f}"


def to_markdown(table: pd.DataFrame, truths: list[str], with_auc: bool = True) -> str:
    """One row per metric and backbone; per truth measure ``r / rho`` pooled, then the mean
    within-task rho where the table has it, and ``n``; and the success AUC."""
    within = "spearman_within_task" in table.columns
    header = "| metric | backbone | better | " + " | ".join(
        f"{t}: r / rho{' / task rho' if within else ''} (n)" for t in truths) + (" | success AUC |" if with_auc else " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (metric, backbone), rows in table.groupby(["metric", "backbone"], sort=False):
        by_truth = rows.set_index("truth")
        cells = []
        for truth in truths:
            row = by_truth.loc[truth]
            within = row.get("spearman_within_task", float("nan"))
            cells.append(f"{_fmt(row['pearson'])} / {_fmt(row['spearman'])}"
                         + ("" if within != within else f" / {_fmt(within)}") + f" ({row['n']})")
        auc = by_truth.loc["success", "auc"] if with_auc else None
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        lines.append(f"| {metric} | `{backbone}` | {better} | " + " | ".join(cells)
                     + (f" | {'-' if auc != auc else f'{auc:.2f}'} |" if with_auc else " |"))
    return "\n".join(lines)


def settings_markdown(edits: pd.DataFrame) -> str:
    """Per setting (run and method), over all tasks: n, success rate, mean unedited PSNR against
    the target (finite values), and the mean of every metric column (finite values)."""
    columns = _metric_columns(edits)
    header = "| setting | n | success | unedited PSNR (dB) | " + " | ".join(
        c.split("@")[0] for c in columns) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for setting, group in edits.groupby("setting"):
        def mean(column: str) -> str:
            values = group[column].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            return f"{values.mean():.4g}" if values.size else "-"
        lines.append(f"| {setting} | {len(group)} | {group['success'].mean():.0%} | "
                     f"{mean('unedited_psnr')} | " + " | ".join(mean(c) for c in columns) + " |")
    return "\n".join(lines)


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of two (B, n) arrays; NaN where a row is constant."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def _rowwise_kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of two (B, n) arrays (as scipy's ``kendalltau``); NaN
    where a row is constant. O(B n^2) for n <= 300, scipy's O(n log n) per row above."""
    if x.shape[1] > 300:
        return np.array([stats.kendalltau(a, b).statistic for a, b in zip(x, y)])
    out = []
    step = max(1, 4_000_000 // x.shape[1] ** 2)
    for start in range(0, len(x), step):
        sx = np.sign(x[start:start + step, :, None] - x[start:start + step, None, :])
        sy = np.sign(y[start:start + step, :, None] - y[start:start + step, None, :])
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append((sx * sy).sum(axis=(1, 2))
                       / np.sqrt((sx * sx).sum(axis=(1, 2)) * (sy * sy).sum(axis=(1, 2))))
    return np.concatenate(out)


def bootstrap_correlations(x: pd.Series | np.ndarray, y: pd.Series | np.ndarray, *,
                           resamples: int = 1000, confidence: float = 0.95,
                           seed: int = 0) -> dict[str, float]:
    """Pearson r, Spearman rho and Kendall tau-b of the finite (x, y) pairs, each with a
    percentile bootstrap confidence interval (pairs resampled with replacement ``resamples``
    times; resamples where one side is constant are left out).

    Returns:
        ``n`` (finite pairs), ``pearson``, ``pearson_low``, ``pearson_high``, and the same for
        ``spearman`` and ``kendall``; NaN where fewer than 3 pairs are left or a side is constant.
    """
    x, y = _finite_pairs(pd.Series(np.asarray(x, dtype=float)),
                         pd.Series(np.asarray(y, dtype=float)))
    result: dict[str, float] = {"n": len(x)}
    names = ("pearson", "spearman", "kendall")
    for name in names:
        result |= {name: float("nan"), f"{name}_low": float("nan"), f"{name}_high": float("nan")}
    if not _varies(x, y):
        return result
    result["pearson"] = float(stats.pearsonr(x, y).statistic)
    result["spearman"] = float(stats.spearmanr(x, y).statistic)
    result["kendall"] = float(stats.kendalltau(x, y).statistic)
    index = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    xb, yb = x[index], y[index]
    boots = {"pearson": _rowwise_pearson(xb, yb),
             "spearman": _rowwise_pearson(stats.rankdata(xb, axis=1), stats.rankdata(yb, axis=1)),
             "kendall": _rowwise_kendall(xb, yb)}
    tail = (1 - confidence) / 2 * 100
    for name, values in boots.items():
        values = values[np.isfinite(values)]
        if values.size:
            result[f"{name}_low"], result[f"{name}_high"] = (
                float(v) for v in np.percentile(values, [tail, 100 - tail]))
    return result
