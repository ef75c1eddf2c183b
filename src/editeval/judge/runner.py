"""Scoring a run directory with a judge: grouping, shuffling, concurrency, repeats, resume.

``score_run`` reads the finished edits of a run, forms requests (comparative: one per sample and
seed over all methods' outputs, in an order shuffled per request and recorded; per-image: one per
edit), sends them with at most ``concurrency`` in flight, and stores every image's judgement in the
run's ``results.sqlite`` (table ``judge_scores``) with the judge, protocol version, mode, repeat and
raw answer. Items already judged are skipped, so a crashed or interrupted scoring resumes where it
stopped; together with the response cache, a rerun sends no request for them.

Every answer is recorded, failures included (a parse failure, a refusal, or a transport error: the
request got no answer; transport errors are asked again on a rerun). When the judge's server cannot
be reached (:class:`~editeval.judge.backends.JudgeUnreachable`) or the request budget is spent, no
new request starts; those in flight finish and are recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from editeval.core.lmm_score import overall
from editeval.judge.backends import (
    FAILURE_KINDS,
    BudgetExhausted,
    JudgeAnswer,
    JudgeRequest,
    JudgeUnreachable,
)
from editeval.judge.protocol import MODES, Protocol
from editeval.run import ResultStore, Run


@dataclass
class ScoreSummary:
    """Requests made in one call and how their items ended.

    ``statuses``: items judged in this call per status (``ok`` or a key of ``FAILURE_KINDS``);
    ``skipped_items``: judged before; ``not_judged``: items left for a rerun because the budget
    was spent or the run was stopped; ``stopped``: why the run was stopped (the judge's server
    cannot be reached), else None.
    """

    requests: int = 0
    skipped_items: int = 0
    statuses: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    budget_exhausted: bool = False
    not_judged: int = 0
    stopped: str | None = None

    def describe(self) -> str:
        """``"5 ok, 1 parse failure, 2 transport errors"`` (``"none"`` when nothing was judged)."""
        parts = [f"{self.statuses['ok']} ok"] if self.statuses.get("ok") else []
        for status, kind in FAILURE_KINDS.items():
            count = self.statuses.get(status, 0)
            if count:
                parts.append(f"{count} {kind}{'s' * (count > 1)}")
        return ", ".join(parts) or "none"


def _groups(rows: list[Any], mode: str) -> list[list[Any]]:
    if mode == "per-image":
        return [[row] for row in rows]
    by_sample: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for row in rows:
        by_sample[(row.sample_id, row.seed)].append(row)
    return [sorted(group, key=lambda r: r.method) for _, group in sorted(by_sample.items())]


def _shuffled(group: list[Any], repeat: int, seed: int) -> list[Any]:
    """The group in a random order that depends only on its jobs, the repeat and the seed."""
    digest = hashlib.sha256(json.dumps([[r.job_id for r in group], repeat, seed]).encode())
    order = list(group)
    random.Random(digest.hexdigest()).shuffle(order)
    return order


def score_run(run: Run, backend: Any, protocol: Protocol = Protocol(), *,
              concurrency: int = 4, repeats: int = 1, seed: int = 0,
              console: Console | None = None) -> ScoreSummary:
    """Judge every finished edit of ``run`` ``repeats`` times (see the module docstring).

    Raises:
        ValueError: unknown mode. DatasetError: the run's dataset cannot be loaded.
        (An unreachable server does not raise: see ``ScoreSummary.stopped``.)
    """
    if protocol.mode not in MODES:
        raise ValueError(f"unknown mode {protocol.mode!r}; expected one of {', '.join(MODES)}")
    return asyncio.run(_score(run, backend, protocol, concurrency, repeats, seed,
                              console or Console(stderr=True, soft_wrap=True)))


async def _score(run: Run, backend: Any, protocol: Protocol, concurrency: int, repeats: int,
                 seed: int, console: Console) -> ScoreSummary:
    summary = ScoreSummary()
    samples = run.samples
    store = run.store
    rows = run.rows("done")
    done = store.judged(backend.name, protocol.version, protocol.mode)
    todo = []
    for group in _groups(rows, protocol.mode):
        for repeat in range(repeats):
            if all((r.job_id, repeat) in done for r in group):
                summary.skipped_items += len(group)
            else:
                todo.append((_shuffled(group, repeat, seed), repeat))
    gate = asyncio.Semaphore(concurrency)
    budget_before = backend.budget.used

    async def one(group: list[Any], repeat: int) -> tuple[list[Any], int, JudgeAnswer | None]:
        async with gate:
            if summary.budget_exhausted or summary.stopped:
                return group, repeat, None
            request = JudgeRequest(samples[group[0].sample_id],
                                   [run.image_path(r) for r in group], repeat)
            try:
                return group, repeat, await backend.judge(request, protocol)
            except BudgetExhausted:
                summary.budget_exhausted = True
                return group, repeat, None
            except JudgeUnreachable as err:  # this request is recorded; no new one starts
                summary.stopped = str(err)
                return group, repeat, JudgeAnswer("error", message=str(err))

    unit = "edits" if protocol.mode == "per-image" else "samples"  # one request each
    progress = Progress(TextColumn(f"[bold]judging {unit}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=console, transient=True,
                        disable=not console.is_terminal)  # a log gets the summary line only
    try:
        with progress:
            task = progress.add_task("judging", total=len(todo))
            for finished in asyncio.as_completed([one(g, r) for g, r in todo]):
                group, repeat, answer = await finished
                progress.advance(task)
                if answer is not None:
                    _record(store, backend.name, protocol, group, repeat, answer, summary)
                else:
                    summary.not_judged += len(group)
    finally:
        await backend.close()
    summary.requests = backend.budget.used - budget_before
    return summary


def _record(store: ResultStore, judge: str, protocol: Protocol, group: list[Any], repeat: int,
            answer: JudgeAnswer, summary: ScoreSummary) -> None:
    for position, row in enumerate(group, start=1):
        scores = answer.scores[position - 1].as_dict() if answer.status == "ok" else None
        store.record_judgement(
            job_id=row.job_id, judge=judge, protocol_version=protocol.version,
            mode=protocol.mode, repeat=repeat, status=answer.status, scores=scores,
            s_all=overall(scores) if scores else None, position=position,
            group_size=len(group), message=answer.message, raw=answer.raw,
            cache_key=answer.cache_key)
        summary.statuses[answer.status] += 1
