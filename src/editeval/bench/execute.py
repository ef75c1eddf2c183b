"""Executing a run's jobs: the :class:`Executor` interface and the local executor.

An executor makes edits and hands back an :class:`Outcome` per job; it never writes the run's
store (the runner records each outcome as it arrives, :mod:`editeval.bench.record`). The local
executor edits one job after another in this process, with each model kind loaded once; the Ray
executor (:mod:`editeval.bench.ray_executor`) spreads them over the workers of a Ray cluster.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from editeval.bench.plan import Job
from editeval.core.registry import get_method
from editeval.core.types import EditRequest, EditResult
from editeval.editing import EditInputWarning, edit
from editeval.models import ModelNotAvailableError, load_pipeline
from editeval.run import Run, RunConfig


@dataclass
class Outcome:
    """What one job gave: an :class:`EditResult`, or the error that stopped it (one line, with the
    traceback when ``EDITEVAL_TRACEBACKS`` is set) and, when that error was an ``OSError``, its
    ``errno`` (a full or read-only disk stops the run:
    :data:`~editeval.core.files.DISK_FULL_ERRNOS`)."""

    job: Job
    result: EditResult | None = None
    error: str | None = None
    os_errno: int | None = None


class ExecutorError(RuntimeError):
    """An executor cannot run the jobs at all: its cluster cannot be reached or has no room for
    its workers, or a worker died while loading a model."""


class Executor(Protocol):
    """Runs jobs and yields their outcomes (in any order)."""

    def prepare(self, config: RunConfig, model_kinds: set[str]) -> None:
        """Get ready to run jobs of these model kinds; raise before anything is written if a
        model is unavailable (:class:`~editeval.models.ModelNotAvailableError`) or the jobs
        cannot run at all (:class:`ExecutorError`)."""

    def execute(self, jobs: Iterable[Job], run: Run, config: RunConfig) -> Iterator[Outcome]:
        """Run ``jobs`` and yield an outcome for each."""


class LocalExecutor:
    """One job after another in this process; each model kind is loaded once in :meth:`prepare`."""

    def __init__(self) -> None:
        self.pipes: dict[str, Any] = {}

    def prepare(self, config: RunConfig, model_kinds: set[str]) -> None:
        missing = []
        for kind in sorted(model_kinds - set(self.pipes)):
            try:
                self.pipes[kind] = load_pipeline(config.model, kind, device=config.device,
                                                 dtype=config.dtype)
            except ModelNotAvailableError as err:
                missing.append(str(err))
        if missing:
            raise ModelNotAvailableError("\n".join(missing))

    def execute(self, jobs: Iterable[Job], run: Run, config: RunConfig) -> Iterator[Outcome]:
        for job in jobs:
            pipe = self.pipes[get_method(job.method).card.model_kind]
            yield run_job(job, pipe, config, run.inversion_cache)


def run_job(job: Job, pipe: Any, config: RunConfig, inversion_cache: Any) -> Outcome:
    """Edit one job; any exception becomes the outcome's error, so one bad job never stops a run."""
    sample = job.sample
    request = EditRequest(
        image=sample.image_path,
        source_prompt=sample.source_prompt,
        target_prompt=sample.target_prompt,
        instruction=sample.instruction,
        task=sample.task,
        mask=sample.mask_path,
        from_dataset=True,
        seed=job.seed,
        params=config.params.get(job.method, {}),
    )
    try:
        with warnings.catch_warnings():  # kept in the result and its row; the runner sums them up
            warnings.simplefilter("ignore", EditInputWarning)
            return Outcome(job, result=edit(request, job.method, pipe=pipe,
                                            inversion_cache=inversion_cache))
    except Exception as err:  # recorded as a failed row with its message, then the run goes on
        message = f"{type(err).__name__}: {err}"
        if os.environ.get("EDITEVAL_TRACEBACKS"):
            message += "\n" + traceback.format_exc()
        return Outcome(job, error=message,
                       os_errno=err.errno if isinstance(err, OSError) else None)
