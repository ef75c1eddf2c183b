"""What a user study says: agreement between raters, and how well LMM Score and the classic
metrics follow the human ratings.

- :func:`ratings_table`: every rating (rater, edit, method, task, the four factors 1-10, the
  overall S_all = 0.4 acc + 0.3 pre + 0.2 qua + 0.1 real of the rating), as exported to CSV;
- :func:`human_mean_ratings`: the human mean per edit (the study's ground truth);
- :func:`agreement`: Krippendorff's alpha per factor and for S_all (interval level, the
  ``krippendorff`` package; raters x edits, missing ratings left out; 1 = perfect agreement,
  0 = no better than chance);
- :func:`correlations`: Pearson, Spearman and Kendall (tau-b) correlation, with percentile
  bootstrap confidence intervals over edits, of LMM Score's S_all (against the human S_all), each
  of its four factors (against the same human factor) and every classic metric stored in the run
  (against the human S_all), over all edits and per task;
- :func:`analyze`: all of it written to a folder, with the survey's two figures: LMM Score
  against the human ratings per task (``lmm_vs_human.png``) and LMM Score against CLIPScore as
  predictors of the human ratings (``lmm_vs_clipscore.png``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from editeval.core.lmm_score import FACTORS, WEIGHTS
from editeval.core.samples import TASKS
from editeval.judge.leaderboard import judgements
from editeval.metrics.correlation import bootstrap_correlations
from editeval.metrics.scoring import METRICS
from editeval.run import Run
from editeval.study.store import StudyStore, study_exists

RATING_COLUMNS = ["rater_id", "simulated", "job_id", "method", "task", "sample_id", "seed",
                  *FACTORS, "overall", "layout", "created_at"]
MEAN_COLUMNS = ["job_id", "method", "task", "sample_id", "seed", *FACTORS, "overall",
                "n_ratings"]
ALL_TASKS = "all"
LMM = "LMM Score"
CLIPSCORE = "clip_t"


def _s_all(frame: pd.DataFrame) -> pd.Series:
    """S_all of each row's four factors (exact: computed in tenths)."""
    return sum(WEIGHTS[f] * frame[f] for f in FACTORS) / 10


def ratings_table(run: Run) -> pd.DataFrame:
    """Every stored rating, with its edit's method, task, sample and seed and the rating's S_all
    (columns :data:`RATING_COLUMNS`); empty when the run has no study. Reads only."""
    if not study_exists(run):
        return pd.DataFrame(columns=RATING_COLUMNS)
    with StudyStore(run, readonly=True) as store:
        ratings = pd.DataFrame(store.ratings())
    if ratings.empty:
        return pd.DataFrame(columns=RATING_COLUMNS)
    jobs = pd.DataFrame([{"job_id": r.job_id, "method": r.method, "task": r.task,
                          "sample_id": r.sample_id, "seed": r.seed} for r in run.rows("done")])
    table = ratings.merge(jobs, on="job_id", how="left")
    table["overall"] = _s_all(table)
    table["simulated"] = table["simulated"].astype(bool)
    return table[RATING_COLUMNS]


def human_mean_ratings(run: Run) -> pd.DataFrame:
    """The human mean ratings per edit: one row per rated edit with ``job_id``, ``method``,
    ``task``, ``sample_id`` (e.g. ``texture_change/3``), ``seed``, the mean of each of the four
    factors (1..10, float), ``overall`` (the mean of the ratings' S_all, 1..10) and ``n_ratings``
    (int); ordered by task, sample, seed and method. Empty (same columns) when the run has no
    user study or no ratings yet. Reads only: a run opened read-only works."""
    ratings = ratings_table(run)
    if ratings.empty:
        return pd.DataFrame(columns=MEAN_COLUMNS)
    keys = ["job_id", "method", "task", "sample_id", "seed"]
    means = ratings.groupby(keys)[[*FACTORS, "overall"]].mean()
    means["n_ratings"] = ratings.groupby(keys).size()
    means = means.reset_index()
    means["task_order"] = means["task"].map(lambda t: TASKS.index(t) if t in TASKS else len(TASKS))
    return means.sort_values(["task_order", "sample_id", "seed", "method"])[MEAN_COLUMNS] \
        .reset_index(drop=True)


def lmm_scores(run: Run, judge: str | None = None) -> tuple[pd.DataFrame, dict]:
    """LMM Score per edit: ``job_id``, the four factors and ``s_all``, each the mean over the
    judge's successfully parsed repeats; and the judge's identity (judge, protocol, mode).

    Raises:
        ValueError: no judge scores, or several judges and ``judge`` does not pick one.
    """
    frame, identity = judgements(run, judge)
    ok = frame[frame["status"] == "ok"]
    return ok.groupby("job_id")[[*FACTORS, "s_all"]].mean().reset_index(), identity


def agreement(ratings: pd.DataFrame) -> pd.DataFrame:
    """Krippendorff's alpha (interval) per factor and for S_all (``overall``): columns
    ``factor``, ``alpha`` (NaN with fewer than 2 raters on an edit), ``raters``, ``edits`` (rated
    at least twice, the ones alpha uses) and ``ratings``."""
    import krippendorff

    rows = []
    shared = ratings.groupby("job_id")["rater_id"].nunique()
    for factor in (*FACTORS, "overall"):
        matrix = ratings.pivot_table(index="rater_id", columns="job_id", values=factor)
        alpha = float("nan")
        if (shared >= 2).any() and matrix.shape[0] >= 2:
            values = matrix.to_numpy(dtype=float)
            if np.unique(values[np.isfinite(values)]).size > 1:
                alpha = float(krippendorff.alpha(reliability_data=values,
                                                 level_of_measurement="interval"))
        rows.append({"factor": factor, "alpha": alpha, "raters": int(ratings["rater_id"].nunique()),
                     "edits": int((shared >= 2).sum()), "ratings": len(ratings)})
    return pd.DataFrame(rows)


def _metric_columns(run: Run) -> pd.DataFrame:
    """One column per stored ``metric@backbone``, indexed by job id (NaN kept)."""
    values = pd.DataFrame(run.store.metric_values())
    if values.empty:
        return pd.DataFrame()
    wide = values.assign(column=values["metric"] + "@" + values["backbone"]).pivot(
        index="job_id", columns="column", values="value")
    order = sorted(wide.columns, key=lambda c: (METRICS.index(c.split("@")[0]), c))
    return wide[order]


def correlations(human: pd.DataFrame, lmm: pd.DataFrame | None, metrics: pd.DataFrame, *,
                 resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                 ) -> pd.DataFrame:
    """Correlation of each automatic score with the human mean, over all edits (``task`` =
    ``all``) and per task.

    Args:
        human: :func:`human_mean_ratings`.
        lmm: :func:`lmm_scores`' table, or None (no judge).
        metrics: classic metric values, one ``metric@backbone`` column per metric, indexed by
            job id.
    Returns:
        One row per (score, task): ``score`` (``LMM Score``, ``LMM accuracy``, ... or
        ``metric@backbone``), ``human`` (the human column it is compared with: ``overall`` or a
        factor), ``task``, ``n`` and the output of
        :func:`editeval.metrics.correlation.bootstrap_correlations`.
    """
    frame = human.set_index("job_id")
    pairs: list[tuple[str, pd.Series, str]] = []
    if lmm is not None and not lmm.empty:
        scores = lmm.set_index("job_id")
        pairs.append((LMM, scores["s_all"], "overall"))
        pairs += [(f"LMM {f}", scores[f], f) for f in FACTORS]
    pairs += [(column, metrics[column], "overall") for column in metrics.columns]
    tasks = [t for t in TASKS if t in set(frame["task"])] + sorted(set(frame["task"]) - set(TASKS))
    rows = []
    for name, score, target in pairs:
        aligned = score.reindex(frame.index)
        for task in (ALL_TASKS, *tasks):
            keep = frame.index if task == ALL_TASKS else frame.index[frame["task"] == task]
            stats = bootstrap_correlations(aligned.loc[keep], frame.loc[keep, target],
                                           resamples=resamples, confidence=confidence, seed=seed)
            rows.append({"score": name, "human": target, "task": task, **stats})
    return pd.DataFrame(rows)


def plot_lmm_vs_human(human: pd.DataFrame, lmm: pd.DataFrame, table: pd.DataFrame,
                      path: str | os.PathLike) -> Path:
    """The survey's first figure: per task, LMM Score's S_all (x) against the human mean S_all
    (y), one point per edit, with Pearson's r and its confidence interval; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    joined = human.merge(lmm, on="job_id", how="inner")
    tasks = [t for t in dict.fromkeys(joined["task"])]
    columns = min(4, max(1, len(tasks)))
    rows = -(-len(tasks) // columns) if tasks else 1
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows),
                                squeeze=False)
    found = table[table["score"] == LMM].set_index("task")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        part = joined[joined["task"] == task]
        ax.scatter(part["s_all"], part["overall"], s=14, alpha=0.7)
        ax.plot([1, 10], [1, 10], color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlim=(0.5, 10.5), ylim=(0.5, 10.5), xlabel="LMM Score", ylabel="human mean")
        r = found.loc[task] if task in found.index else None
        title = task.replace("_", " ")
        if r is not None and r["pearson"] == r["pearson"]:
            title += f"\nr = {r['pearson']:.2f} [{r['pearson_low']:.2f}, {r['pearson_high']:.2f}]"
        ax.set_title(title, fontsize=9)
    figure.suptitle("LMM Score against the user study (S_all per edit)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_lmm_vs_clipscore(table: pd.DataFrame, path: str | os.PathLike) -> Path | None:
    """The survey's second figure: per task and over all tasks, Pearson's r with the human mean
    S_all of LMM Score and of CLIPScore (``clip_t``), with bootstrap confidence intervals; a PNG
    at ``path``, or None when the run has no LMM Score or no CLIPScore."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clip = [s for s in dict.fromkeys(table["score"]) if s.split("@")[0] == CLIPSCORE]
    if LMM not in set(table["score"]) or not clip:
        return None
    tasks = list(dict.fromkeys(table["task"]))
    figure, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 3.6))
    width = 0.38
    for offset, (name, label) in enumerate(((LMM, LMM), (clip[0], "CLIPScore"))):
        rows = table[table["score"] == name].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) + (offset - 0.5) * width
        err = np.vstack([rows["pearson"] - rows["pearson_low"],
                         rows["pearson_high"] - rows["pearson"]])  # r = 1: rounding below 0
        ax.bar(x, rows["pearson"], width, label=label, yerr=np.clip(np.nan_to_num(err), 0, None),
               capsize=3)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(np.arange(len(tasks)), [t.replace("_", "\n") for t in tasks], fontsize=8)
    ax.set(ylabel="Pearson r with the user study", ylim=(-1, 1))
    ax.legend()
    ax.set_title("LMM Score and CLIPScore against the user study")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


@dataclass
class Analysis:
    """What :func:`analyze` computed and wrote (``files``: name -> path)."""

    ratings: pd.DataFrame
    means: pd.DataFrame
    agreement: pd.DataFrame
    correlations: pd.DataFrame
    judge: dict | None
    files: dict[str, Path] = field(default_factory=dict)


def analyze(run: Run, out: str | os.PathLike | None = None, *, judge: str | None = None,
            resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Analysis:
    """Agreement and correlations of the run's study, written to ``out`` (default
    ``RUN_DIR/study``): ``ratings.csv`` (every rating), ``human_means.csv``, ``agreement.csv``,
    ``correlations.csv`` and the two figures (the second only with CLIPScore in the run).

    Raises:
        ValueError: the run has no ratings yet (the message says how to get them), or several
            judges and ``judge`` does not pick one.
    """
    ratings = ratings_table(run)
    if ratings.empty:
        raters = 0
        if study_exists(run):
            with StudyStore(run, readonly=True) as store:
                raters = len(store.raters())
        first = (f"its {raters} rater{'s' * (raters != 1)} have rated nothing yet; serve the study "
                 f"with `editeval study serve {run.path}` and send them their links "
                 f"(`editeval study raters {run.path}`)" if raters else
                 f"create raters with `editeval study add-raters {run.path} N` and serve the "
                 f"study with `editeval study serve {run.path}`")
        raise ValueError(f"{run.path} holds no ratings yet; {first}")
    means = human_mean_ratings(run)
    lmm, identity = (None, None)
    if run.store.judgements() or judge is not None:
        lmm, identity = lmm_scores(run, judge)
    table = correlations(means, lmm, _metric_columns(run), resamples=resamples,
                         confidence=confidence, seed=seed)
    result = Analysis(ratings, means, agreement(ratings), table, identity)
    folder = Path(out) if out is not None else run.path / "study"
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("ratings", ratings), ("human_means", means),
                        ("agreement", result.agreement), ("correlations", table)):
        frame.to_csv(folder / f"{name}.csv", index=False)
        result.files[f"{name}.csv"] = folder / f"{name}.csv"
    if lmm is not None:
        result.files["lmm_vs_human.png"] = plot_lmm_vs_human(means, lmm, table,
                                                             folder / "lmm_vs_human.png")
        second = plot_lmm_vs_clipscore(table, folder / "lmm_vs_clipscore.png")
        if second is not None:
            result.files["lmm_vs_clipscore.png"] = second
    return result


def _ci(row: pd.Series, name: str) -> str:
    if pd.isna(row[name]):
        return "-"
    low, high = row[f"{name}_low"], row[f"{name}_high"]
    return f"{row[name]:+.2f}" if pd.isna(low) else f"{row[name]:+.2f} [{low:+.2f}, {high:+.2f}]"


def to_markdown(result: Analysis, confidence: float = 0.95) -> str:
    """The analysis as Markdown: agreement, every score's correlation over all tasks, and LMM
    Score's per task (the full table is ``correlations.csv``)."""
    lines = ["## Agreement between raters (Krippendorff's alpha, interval)", "",
             "| factor | alpha | raters | edits rated twice or more | ratings |",
             "|---|---|---|---|---|"]
    for row in result.agreement.itertuples():
        alpha = "-" if row.alpha != row.alpha else f"{row.alpha:.3f}"
        lines.append(f"| {row.factor} | {alpha} | {row.raters} | {row.edits} | {row.ratings} |")
    head = ["", f"## Correlation with the human mean ({confidence:.0%} bootstrap intervals)", "",
            "| score | human | task | n | Pearson r | Spearman rho | Kendall tau |",
            "|---|---|---|---|---|---|---|"]
    table = result.correlations
    shown = table[(table["task"] == ALL_TASKS) | (table["score"] == LMM)] if not table.empty \
        else table
    lines += head
    for _, row in shown.iterrows():
        lines.append(f"| {row['score']} | {row['human']} | {row['task']} | {row['n']} | "
                     f"{_ci(row, 'pearson')} | {_ci(row, 'spearman')} | {_ci(row, 'kendall')} |")
    if table.empty:
        lines.append("| (no LMM Score or metrics in the run) | | | | | | |")
    return "\n".join(lines) + "\n"
