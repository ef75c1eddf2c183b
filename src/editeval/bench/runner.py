"""Run methods over a dataset: one job per (method, sample, seed), resumable.

``run_bench`` loads each model kind the methods need once, skips jobs the run directory already
holds, records every other job as done (image, NFE, time) or failed (error message) and goes on,
so the same call after a crash or a kill picks up where it stopped.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from editeval import __version__
from editeval.bench.store import ResultStore
from editeval.diffusion.inversion_cache import InversionCache
from editeval.editing import edit
from editeval.core.registry import get_method
from editeval.core.types import EditRequest
from editeval.data.datasets import load_dataset
from editeval.core.samples import Sample


@dataclass(frozen=True)
class Job:
    """One edit of a run."""

    method: str
    sample: Sample
    seed: int

    @property
    def job_id(self) -> str:
        return f"{self.method}/{self.sample.id}/seed{self.seed}"


def plan_jobs(samples: Sequence[Sample], methods: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """All (method, sample, seed) jobs, method-major so each model stays hot."""
    return [Job(m, s, seed) for m in methods for s in samples for seed in seeds]


@dataclass
class BenchConfig:
    """What to run; everything a run directory needs to be resumed.

    Attributes:
        dataset: dataset name (``editeval-v1``). data_dir / prompts_file: where it is.
        methods: registry names. model: suite, short name, path or hub id.
        out: the run directory. tasks: restrict to these tasks (all when empty).
        limit: at most this many samples (in dataset order, after the task filter).
        per_task: at most this many samples of each task (before ``limit``).
        seeds: one job per seed. params: per-method parameter overrides ({method: {name: value}}).
        device / dtype: passed to ``load_pipeline``. retry_failed: rerun jobs that failed before.
    """

    dataset: str
    methods: list[str]
    model: str
    out: Path
    data_dir: Path | None = None
    prompts_file: Path | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    per_task: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    retry_failed: bool = True

    def identity(self) -> dict[str, Any]:
        """The part of the config stored in ``config.json``."""
        record = asdict(self)
        for key in ("out", "data_dir", "prompts_file"):
            record[key] = None if record[key] is None else str(Path(record[key]).resolve())
        record["editeval_version"] = __version__
        return record


@dataclass
class BenchSummary:
    """Counts after a run: jobs planned, skipped as already finished, done and failed now."""

    planned: int
    skipped: int
    done: int
    failed: int
    missing_images: list[str]
    errors: dict[str, str]  # job id -> error, for jobs that failed in this call


def run_bench(config: BenchConfig, console: Console | None = None) -> BenchSummary:
    """Run (or resume) the benchmark described by ``config``; see the module docstring.

    Raises:
        DatasetError, KeyError (unknown method), ValueError (bad parameters), RunConfigError,
        ModelNotAvailableError: before any job runs.
    """
    from editeval.models import ModelNotAvailableError, load_pipeline

    console = console or Console(stderr=True, soft_wrap=True)  # log lines stay whole
    cards = {name: get_method(name).card for name in config.methods}
    for name in config.params:
        if name not in cards:
            raise ValueError(f"parameters given for {name!r}, which is not among --methods")
    for name, card in cards.items():
        card.resolve_params(config.params.get(name, {}))  # unknown names fail before the run
    dataset = load_dataset(config.dataset, config.data_dir, config.prompts_file)
    samples = dataset.select(config.tasks or None, config.limit, config.per_task)
    jobs = plan_jobs(samples, config.methods, config.seeds)
    finished: set[str] = set()
    if (config.out / "results.sqlite").exists():
        with ResultStore(config.out) as store:
            store.check_config(config.identity())
            finished = store.finished(config.retry_failed)
    pending = [job for job in jobs if job.job_id not in finished]
    summary = BenchSummary(len(jobs), len(jobs) - len(pending), 0, 0, dataset.missing, {})
    if not pending:
        console.print(f"Nothing to run: all {len(jobs)} jobs are finished in {config.out}"
                      + ("" if config.retry_failed else " or failed earlier (--skip-failed)."))
        return summary
    # every model before anything is written, so a missing one leaves no half-made run directory
    pipes, missing = {}, []
    for kind in sorted({cards[job.method].model_kind for job in pending}):
        try:
            pipes[kind] = load_pipeline(config.model, kind, device=config.device,
                                        dtype=config.dtype)
        except ModelNotAvailableError as err:
            missing.append(str(err))
    if missing:
        raise ModelNotAvailableError("\n".join(missing))

    with ResultStore(config.out) as store:
        store.check_config(config.identity())
        inversions = InversionCache(store.run_dir / "inversions")  # shared by the run's methods
        spent: dict[str, list[float]] = defaultdict(list)  # wall seconds per job, by method
        left = Counter(job.method for job in pending)
        with _progress(console) as progress:
            task = progress.add_task("editing", total=len(jobs), completed=summary.skipped,
                                     eta="-:--:--")
            for number, job in enumerate(pending, start=summary.skipped + 1):
                progress.update(task, description=f"{job.method} {job.sample.id}")
                started = time.perf_counter()
                _run_job(job, pipes[cards[job.method].model_kind], config, store, summary,
                         inversions)
                spent[job.method].append(time.perf_counter() - started)
                left[job.method] -= 1
                eta = remaining_seconds(spent, left)
                progress.update(task, advance=1, eta=_clock(eta))
                if not console.is_terminal:  # a log file gets one line per job instead of a bar
                    elapsed = progress.tasks[0].elapsed or 0.0
                    console.print(f"[{number}/{len(jobs)}] {job.job_id} "
                                  f"{'failed' if job.job_id in summary.errors else 'done'}; "
                                  f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s", highlight=False)
    return summary


def _run_job(job: Job, pipe: Any, config: BenchConfig, store: ResultStore,
             summary: BenchSummary, inversions: InversionCache) -> None:
    sample = job.sample
    keys = dict(job_id=job.job_id, method=job.method, sample_id=sample.id, task=sample.task,
                seed=job.seed)
    request = EditRequest(
        image=sample.image_path,
        source_prompt=sample.source_prompt,
        target_prompt=sample.target_prompt,
        instruction=sample.instruction,
        task=sample.task,
        mask=sample.mask_path,
        seed=job.seed,
        params=config.params.get(job.method, {}),
    )
    try:
        result = edit(request, job.method, pipe=pipe, inversion_cache=inversions)
    except Exception as err:  # recorded as a failed row with its message, then the run goes on
        message = f"{type(err).__name__}: {err}"
        if os.environ.get("EDITEVAL_TRACEBACKS"):
            message += "\n" + traceback.format_exc()
        store.record_failed(**keys, error=message)
        summary.failed += 1
        summary.errors[job.job_id] = message
        return
    store.record_done(**keys, image=result.image, nfe=result.nfe,
                      wall_seconds=result.wall_seconds, model=result.model, params=result.params)
    summary.done += 1


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
    """Per method: jobs done and failed, mean NFE and mean wall seconds of the done ones."""
    stats: dict[str, Counter] = {}
    for row in rows:
        entry = stats.setdefault(row.method, Counter())
        entry[row.status] += 1
        if row.status == "done":
            entry["nfe"] += row.nfe
            entry["wall"] += row.wall_seconds
    return {
        method: {
            "done": c["done"],
            "failed": c["failed"],
            "mean_nfe": c["nfe"] / c["done"] if c["done"] else float("nan"),
            "mean_seconds": c["wall"] / c["done"] if c["done"] else float("nan"),
        }
        for method, c in stats.items()
    }
