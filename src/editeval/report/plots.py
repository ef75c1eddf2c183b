"""The report's figures (matplotlib's Agg canvas directly: no display, no pyplot state; PNG files): score by task and method with error
bars, and score against NFE per method with the cost-quality front. (The user study's figures,
human ratings against LMM Score, are :mod:`editeval.study.analyze`'s.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from editeval.report.build import ALL_TASKS

DPI = 110


def _colours(methods: list[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _task_label(task: str) -> str:
    return "all tasks" if task == ALL_TASKS else task.replace("_", " ")


def score_by_task(table: pd.DataFrame, column: str, label: str, methods: list[str],
                  path: Path) -> Path:
    """Grouped bars: per task (and all tasks), one bar per method at the mean of ``column``
    (``{column}_mean``) with its standard deviation (``{column}_std``) as the error bar.

    Args:
        table: :func:`editeval.report.build.leaderboard_table`. column: a score's prefix
            (``lmm`` or a metric label). label: the axis label. methods: the bars' order.
        path: the PNG to write.
    """
    tasks = list(dict.fromkeys(table["task"]))
    tasks = [t for t in tasks if t != ALL_TASKS] + [ALL_TASKS]
    colours = _colours(methods)
    width = 0.8 / max(len(methods), 1)
    fig, ax = _figure(max(8.0, 1.1 * len(tasks) + 0.09 * len(tasks) * len(methods)), 4.5)
    x = np.arange(len(tasks))
    for i, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("task").reindex(tasks)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, rows[f"{column}_mean"], width,
               yerr=rows[f"{column}_std"], capsize=2, label=method, color=colours[method],
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, [_task_label(t) for t in tasks], rotation=20, ha="right")
    ax.set_ylabel(label)
    ax.set_title(f"{label} by task and method (mean ± std over samples)")
    ax.legend(fontsize="small", ncols=max(1, len(methods) // 10 + 1), loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def cost_quality_front(costs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the points on the cost-quality front (no other point costs as little or less
    and scores higher), by increasing cost.

    Args:
        costs: float (n,), e.g. NFE per edit (lower is better). scores: float (n,), higher is
            better. Points with a NaN are never on the front.
    """
    order = [i for i in np.argsort(costs, kind="stable")
             if np.isfinite(costs[i]) and np.isfinite(scores[i])]
    front, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return np.array(front, dtype=int)


def score_against_nfe(table: pd.DataFrame, column: str, label: str, methods: list[str],
                      path: Path) -> Path:
    """One point per method: its mean NFE per edit (uncached: the method's own cost, where the
    run records it) against its mean ``column`` over all tasks, with the std as the error bar;
    the cost-quality front joins the methods no cheaper method beats. A log NFE axis where the
    NFEs span more than a factor of 10."""
    rows = table[table["task"] == ALL_TASKS].set_index("method").reindex(methods)
    nfe = rows["uncached_nfe"].fillna(rows["nfe"]).to_numpy(dtype=float)
    mean = rows[f"{column}_mean"].to_numpy(dtype=float)
    std = rows[f"{column}_std"].to_numpy(dtype=float)
    colours = _colours(methods)
    fig, ax = _figure(7.5, 5)
    for i, method in enumerate(methods):
        if np.isfinite(nfe[i]) and np.isfinite(mean[i]):
            ax.errorbar(nfe[i], mean[i], yerr=std[i], fmt="o", capsize=3, color=colours[method],
                        label=method)
            ax.annotate(method, (nfe[i], mean[i]), textcoords="offset points",
                        xytext=(5, 5 if i % 2 == 0 else -12), fontsize="small")  # alternate
    front = cost_quality_front(nfe, mean)
    if len(front) > 1:
        ax.step(nfe[front], mean[front], where="post", color="grey", linestyle="--",
                linewidth=1, label="cost-quality front")
    finite = nfe[np.isfinite(nfe) & (nfe > 0)]
    if finite.size and finite.max() / finite.min() > 10:
        ax.set_xscale("log")
    ax.set_xlabel("NFE per edit (denoiser evaluations)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against cost (all tasks; mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)
