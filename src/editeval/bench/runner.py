"""Run methods over a dataset: one job per (method, sample, seed), resumable.

``run_bench`` plans the run (:mod:`.plan`: jobs, what is finished, every method's inputs checked
against the dataset), has an executor make the edits (:mod:`.execute`; the local one loads each
model kind once) and records every outcome as it arrives (:mod:`.record`) as done (image, NFE spent
and uncached, time, intermediates) or failed (error message), so the same call after a crash or a
kill picks up where it stopped.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from editeval.bench.execute import Executor, LocalExecutor
from editeval.bench.plan import plan_run
from editeval.bench.record import record, write_error
from editeval.core.files import DISK_FULL_ERRNOS
from editeval.run import Run, RunConfig


@dataclass
class BenchSummary:
    """Counts after a run: jobs planned, skipped as already finished, done and failed now; and,
    when the run directory could take no more writes (a full or read-only disk, a used-up quota),
    why the run stopped and how many jobs it did not run."""

    planned: int
    skipped: int
    done: int
    failed: int
    missing_images: list[str]
    errors: dict[str, str]  # job id -> error, for jobs that failed in this call
    stopped: str | None = None
    not_run: int = 0
    # method -> (jobs done now whose inputs gave warnings, the first such warning); each job's
    # warnings are stored with its row, so the run prints one line per method, not one per job
    warned: dict[str, tuple[int, str]] = field(default_factory=dict)


def run_bench(config: RunConfig, console: Console | None = None,
              executor: Executor | None = None) -> BenchSummary:
    """Run (or resume) the benchmark described by ``config``; see the module docstring.

    A job whose files cannot be written is recorded as failed with the path and the OS error;
    when the disk can take no more (:data:`~editeval.core.files.DISK_FULL_ERRNOS`), or not even a
    failure can be recorded, the run stops there and says why in ``summary.stopped``.

    Args:
        executor: makes the edits; default a :class:`~editeval.bench.execute.LocalExecutor`.

    Raises:
        DatasetError, KeyError (unknown method), ValueError (bad parameters), PlanError (a method
        needs an input the dataset lacks), RunConfigError, ModelNotAvailableError: before any job
        runs and before anything is written. OSError: ``config.json`` cannot be written.
    """
    console = console or Console(stderr=True, soft_wrap=True)  # log lines stay whole
    executor = executor or LocalExecutor()
    with Run.for_config(config) as run:
        plan = plan_run(config, run)
        summary = BenchSummary(len(plan.jobs), plan.skipped, 0, 0, plan.missing_images, {})
        if not plan.pending:
            console.print(f"Nothing to run: all {len(plan.jobs)} jobs are finished in {config.out}"
                          + ("" if config.retry_failed else " or failed earlier (--skip-failed)."))
            return summary
        # every model before anything is written, so a missing one leaves no half-made run directory
        executor.prepare(config, {plan.cards[job.method].model_kind for job in plan.pending})
        run.save_config()
        spent: dict[str, list[float]] = defaultdict(list)  # wall seconds per job, by method
        left = Counter(job.method for job in plan.pending)
        with _progress(console) as progress:
            task = progress.add_task("editing", total=len(plan.jobs), completed=plan.skipped,
                                     eta="-:--:--")
            started = time.perf_counter()
            for number, outcome in enumerate(executor.execute(plan.pending, run, config),
                                             start=plan.skipped + 1):
                job = outcome.job
                try:
                    outcome = record(run, outcome)
                except OSError as err:  # the store itself takes no more
                    summary.stopped = (f"{write_error(err, 'the results')}; {job.job_id} is "
                                       "not recorded")
                    summary.not_run = len(plan.pending) - summary.done - summary.failed - 1
                    break
                if outcome.error is None:
                    summary.done += 1
                    if outcome.result.warnings:
                        count, first = summary.warned.get(job.method, (0, outcome.result.warnings[0]))
                        summary.warned[job.method] = (count + 1, first)
                else:
                    summary.failed += 1
                    summary.errors[job.job_id] = outcome.error
                now = time.perf_counter()
                spent[job.method].append(now - started)
                started = now
                left[job.method] -= 1
                eta = remaining_seconds(spent, left)
                progress.update(task, advance=1, eta=_clock(eta),
                                description=f"{job.method} {job.sample.id}")
                if not console.is_terminal:  # a log file gets one line per job instead of a bar
                    elapsed = progress.tasks[0].elapsed or 0.0
                    console.print(f"[{number}/{len(plan.jobs)}] {job.job_id} "
                                  f"{'failed' if outcome.error else 'done'}; "
                                  f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s", highlight=False)
                if outcome.os_errno in DISK_FULL_ERRNOS:  # every later write would fail alike
                    summary.stopped = f"{outcome.error} ({job.job_id} is recorded as failed)"
                    summary.not_run = len(plan.pending) - summary.done - summary.failed
                    break
    return summary


def remaining_seconds(spent: Mapping[str, Sequence[float]], left: Mapping[str, int]) -> float:
    """Wall seconds the jobs still to run should take: ``left[method]`` jobs each at that
    method's mean of ``spent`` (seconds per finished job) so far, and a method with none finished
    yet at the mean of all finished jobs. Methods cost very differently (SDEdit 50 UNet
    evaluations, PnP over 1000), and jobs run method by method, so one overall rate misleads."""
    everything = [seconds for values in spent.values() for seconds in values]
    if not everything:
        return 0.0
    overall = sum(everything) / len(everything)
    return sum(count * (sum(spent[method]) / len(spent[method]) if spent.get(method) else overall)
               for method, count in left.items())


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )


def summarize(rows: Iterable[Any]) -> dict[str, Mapping[str, float]]:
    """Per method: jobs done and failed, and over the done ones the mean NFE spent, the mean
    uncached NFE and the mean backward passes through the denoiser (each over the rows that
    record it) and the mean wall seconds."""
    stats: dict[str, Counter] = {}
    for row in rows:
        entry = stats.setdefault(row.method, Counter())
        entry[row.status] += 1
        if row.status == "done":
            entry["nfe"] += row.nfe
            entry["wall"] += row.wall_seconds
            if row.uncached_nfe is not None:
                entry["uncached"] += row.uncached_nfe
                entry["with_uncached"] += 1
            if row.backward_passes is not None:
                entry["backward"] += row.backward_passes
                entry["with_backward"] += 1
    return {
        method: {
            "done": c["done"],
            "failed": c["failed"],
            "mean_nfe": c["nfe"] / c["done"] if c["done"] else float("nan"),
            "mean_uncached_nfe": (c["uncached"] / c["with_uncached"] if c["with_uncached"]
                                  else float("nan")),
            "mean_backward": (c["backward"] / c["with_backward"] if c["with_backward"]
                              else float("nan")),
            "mean_seconds": c["wall"] / c["done"] if c["done"] else float("nan"),
        }
        for method, c in stats.items()
    }
