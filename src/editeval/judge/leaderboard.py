"""The leaderboard of a scored run, in the format of the survey's Leaderboard.md.

Per task and method: the mean and standard deviation (population, ddof 0) over samples of S_all,
where a sample's S_all is the mean over its successfully parsed repeats; ``n`` samples with a score;
``failures``: judged items without a score (parse failures, refusals, errors) over all repeats;
``repeat_spread``: the mean over samples of the standard deviation of S_all across repeats
(population, 0 with one repeat). Rows are ranked by mean, best first.
"""

from __future__ import annotations

import pandas as pd

from editeval.core.samples import TASKS
from editeval.run import Run

COLUMNS = ["task", "rank", "method", "mean", "std", "n", "failures", "items", "failure_rate",
           "repeat_spread"]


def leaderboard(run: Run, judge: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The leaderboard table and the identity of the judge it is from.

    Raises:
        ValueError: the run holds no judgements, or several judges/protocols and ``judge`` does not
            pick one (the message lists them).
    """
    frame = pd.DataFrame(run.store.judgements())
    if frame.empty:
        raise ValueError(f"{run.path} holds no judge scores yet; run `editeval score {run.path} "
                         "--judge ...` first")
    keys = frame[["judge", "protocol_version", "mode"]].drop_duplicates()
    if judge is not None:
        keys = keys[keys["judge"] == judge]
    if len(keys) != 1:
        listed = "; ".join(" / ".join(k) for k in keys.itertuples(index=False))
        raise ValueError(f"pick one judge with --judge; this run has: {listed or 'none matching'}")
    identity = keys.iloc[0].to_dict()
    frame = frame.merge(keys, on=list(identity))
    ok = frame[frame["status"] == "ok"]
    per_job = ok.groupby(["task", "method", "job_id"])["s_all"].agg(
        mean="mean", spread=lambda v: v.std(ddof=0)).reset_index()
    rows = []
    for (task, method), jobs in per_job.groupby(["task", "method"]):
        items = frame[(frame["task"] == task) & (frame["method"] == method)]
        failures = int((items["status"] != "ok").sum())
        rows.append({
            "task": task, "method": method, "mean": jobs["mean"].mean(),
            "std": jobs["mean"].std(ddof=0), "n": len(jobs), "failures": failures,
            "items": len(items), "failure_rate": failures / len(items),
            "repeat_spread": jobs["spread"].mean(),
        })
    scored = {(r["task"], r["method"]) for r in rows}
    for (task, method), items in frame.groupby(["task", "method"]):  # nothing parsed at all
        if (task, method) not in scored:
            rows.append({"task": task, "method": method, "mean": float("nan"),
                         "std": float("nan"), "n": 0, "failures": len(items), "items": len(items),
                         "failure_rate": 1.0, "repeat_spread": float("nan")})
    table = pd.DataFrame(rows)
    table["task_order"] = table["task"].map({t: i for i, t in enumerate(TASKS)})
    table = table.sort_values(["task_order", "mean"], ascending=[True, False], na_position="last")
    table["rank"] = table.groupby("task").cumcount() + 1
    return table[COLUMNS].reset_index(drop=True), identity


def to_markdown(table: pd.DataFrame, identity: dict) -> str:
    """Leaderboard.md: one section per task, ranked; then, for a model judge, the rate of replies
    per method that could not be parsed (the oracle reads pixels and parses nothing)."""
    lines = ["# Leaderboard", "",
             f"LMM Score (S_all = 0.4 acc + 0.3 pre + 0.2 qua + 0.1 real) by `{identity['judge']}`,"
             f" protocol `{identity['protocol_version']}`, {identity['mode']} mode.", ""]
    for task, rows in table.groupby("task", sort=False):
        lines += [f"## {task.replace('_', ' ').title()}", "",
                  "| Rank | Method | Mean ↑ | Std ↓ | n | Failures |", "|---|---|---|---|---|---|"]
        for row in rows.itertuples():
            mean = "-" if pd.isna(row.mean) else f"{row.mean:.2f}"
            std = "-" if pd.isna(row.std) else f"{row.std:.2f}"
            lines.append(f"| {row.rank} | {row.method} | {mean} | {std} | {row.n} | "
                         f"{row.failures}/{row.items} |")
        lines.append("")
    if identity["judge"] == "oracle":
        return "\n".join(lines)
    per_method = table.groupby("method")[["failures", "items"]].sum()
    lines += ["## Parse failures per method", "", "| Method | Failure rate |", "|---|---|"]
    for method, row in per_method.iterrows():
        lines.append(f"| {method} | {row['failures'] / row['items']:.1%} "
                     f"({row['failures']}/{row['items']}) |")
    return "\n".join(lines) + "\n"
