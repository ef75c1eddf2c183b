"""The leaderboard of a scored run, in the format of the survey's Leaderboard.md.

Per task and method: the mean and standard deviation (population, ddof 0) over samples of S_all,
where a sample's S_all is the mean over its successfully parsed repeats; ``n`` samples with a score;
``failures``: judged items without a score over all repeats, and that count by kind:
``parse_failures`` (the answer held no valid scores), ``refusals`` (the judge or its provider
declined) and ``transport_errors`` (no answer came back: connection failure, timeout, HTTP error,
or a reply that is not a chat completion; asked again on a rerun); ``repeat_spread``: the mean over
samples of the standard deviation of S_all across repeats (population, 0 with one repeat).

Rows are ranked by the mean as shown (two decimals), best first; equal shown means share a rank
(1, 1, 3); a method with no score at all has no rank.
"""

from __future__ import annotations

import pandas as pd

from editeval.core.samples import TASKS
from editeval.judge.backends import FAILURE_KINDS, public_judge_name
from editeval.run import Run

KIND_COLUMNS = {status: kind.replace(" ", "_") + "s" for status, kind in FAILURE_KINDS.items()}
COLUMNS = ["task", "rank", "method", "mean", "std", "n", "failures", "items", "failure_rate",
           *KIND_COLUMNS.values(), "repeat_spread"]


def _shown(mean: float) -> float:
    """The mean as the leaderboard prints it (two decimals); NaN stays NaN."""
    return mean if pd.isna(mean) else float(f"{mean:.2f}")


def _pick(keys: pd.DataFrame, judge: str | None) -> pd.DataFrame:
    """The (judge, protocol, mode) rows that ``judge`` names: its full name (credentials in it
    ignored) or, when that matches nothing, ``openai:MODEL`` without the URL."""
    if judge is None:
        return keys
    names = keys["judge"].map(public_judge_name)
    wanted = public_judge_name(judge)
    exact = keys[names == wanted]
    return exact if len(exact) else keys[names.str.partition("@")[0] == wanted]


def judgements(run: Run, judge: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The stored judgements of one judge (rows of ``ResultStore.judgements``) and its identity
    (``judge``, ``protocol_version``, ``mode``).

    ``judge``: a stored judge's name, or ``openai:MODEL`` when one stored judge has that model;
    None when the run has one judge, or one judge that scored anything (a judge whose every
    request failed, such as an unreachable server, is not a choice to make).

    Raises:
        ValueError: the run holds no judgements, or several judges/protocols and ``judge`` does not
            pick exactly one (the one-line message lists them).
    """
    frame = pd.DataFrame(run.store.judgements())
    if frame.empty:
        raise ValueError(f"{run.path} holds no judge scores yet; run `editeval score {run.path} "
                         "--judge ...` first")
    stored = frame[["judge", "protocol_version", "mode"]].drop_duplicates()
    keys = _pick(stored, judge)
    if judge is None and len(keys) > 1:
        scored = frame.loc[frame["status"] == "ok", list(stored.columns)].drop_duplicates()
        if len(scored) == 1:
            keys = scored
    if len(keys) != 1:
        shown = public_judge_name(judge) if judge else ""
        problem = ("pick one judge with --judge; this run has" if not judge else
                   f"--judge {shown} matches no judge of this run; it has" if keys.empty else
                   f"--judge {shown} matches {len(keys)} judges; give one of")
        listed = "; ".join(f"{public_judge_name(name)} ({version}, {mode})"
                           for name, version, mode in (keys if len(keys) else stored).itertuples(
                               index=False))
        raise ValueError(f"{problem}: {listed}")
    identity = keys.iloc[0].to_dict()
    return frame.merge(keys, on=list(identity)), identity


def leaderboard(run: Run, judge: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The leaderboard table (columns ``COLUMNS``) and the identity of the judge it is from
    (``judge`` as in :func:`judgements`).

    Raises:
        ValueError: as :func:`judgements`.
    """
    frame, identity = judgements(run, judge)
    ok = frame[frame["status"] == "ok"]
    per_job = ok.groupby(["task", "method", "job_id"])["s_all"].agg(
        mean="mean", spread=lambda v: v.std(ddof=0)).reset_index()
    rows = []
    for (task, method), items in frame.groupby(["task", "method"]):
        jobs = per_job[(per_job["task"] == task) & (per_job["method"] == method)]
        failures = int((items["status"] != "ok").sum())
        rows.append({
            "task": task, "method": method, "mean": jobs["mean"].mean(),
            "std": jobs["mean"].std(ddof=0), "n": len(jobs), "failures": failures,
            "items": len(items), "failure_rate": failures / len(items),
            **{column: int((items["status"] == status).sum())
               for status, column in KIND_COLUMNS.items()},
            "repeat_spread": jobs["spread"].mean(),
        })
    table = pd.DataFrame(rows)
    table["shown"] = table["mean"].map(_shown)
    table["task_order"] = table["task"].map({t: i for i, t in enumerate(TASKS)})
    table = table.sort_values(["task_order", "shown", "method"], ascending=[True, False, True],
                              na_position="last")
    table["rank"] = table.groupby("task")["shown"].rank(method="min", ascending=False).astype(
        "Int64")
    return table[COLUMNS].reset_index(drop=True), identity


def _rate(count: int, items: int) -> str:
    return f"{count / items:.1%} ({count}/{items})"


def to_markdown(table: pd.DataFrame, identity: dict) -> str:
    """Leaderboard.md: one section per task, ranked; then, for a model judge, the rate of each kind
    of failure per method (the oracle reads pixels and parses nothing)."""
    judge = public_judge_name(identity["judge"])
    lines = ["# Leaderboard", "",
             (f"LMM Score (S_all = 0.4 acc + 0.3 pre + 0.2 qua + 0.1 real) by `{judge}`, "
              f"protocol `{identity['protocol_version']}`, {identity['mode']} mode."), ""]
    for task, rows in table.groupby("task", sort=False):
        lines += [f"## {task.replace('_', ' ').title()}", "",
                  "| Rank | Method | Mean ↑ | Std ↓ | n | Failures |", "|---|---|---|---|---|---|"]
        for row in rows.itertuples():
            rank = "-" if pd.isna(row.rank) else str(row.rank)
            mean = "-" if pd.isna(row.mean) else f"{row.mean:.2f}"
            std = "-" if pd.isna(row.std) else f"{row.std:.2f}"
            lines.append(f"| {rank} | {row.method} | {mean} | {std} | {row.n} | "
                         f"{row.failures}/{row.items} |")
        lines.append("")
    if identity["judge"] == "oracle":
        return "\n".join(lines)
    kinds = list(KIND_COLUMNS.values())
    per_method = table.groupby("method")[[*kinds, "items"]].sum()
    lines += ["## Failures per method", "",
              "| Method | " + " | ".join(k.replace("_", " ").capitalize() for k in kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for method, row in per_method.iterrows():
        lines.append(f"| {method} | " + " | ".join(_rate(row[k], row["items"]) for k in kinds)
                     + " |")
    lines.append("")
    lines.append("Transport errors: no answer came back (connection, timeout, HTTP error, or a reply "
                 "that is not a chat completion); `editeval score` asks again on a rerun.")
    return "\n".join(lines) + "\n"
