"""Recording outcomes: the single writer of a run's results (the executors never write)."""

from __future__ import annotations

from dataclasses import replace

from editeval.bench.execute import Outcome
from editeval.run import Run


def record(run: Run, outcome: Outcome) -> Outcome:
    """Store one outcome in ``run``: the image, intermediates and row of a done job (both NFE
    costs and the backward passes), or the error of a failed one; returns the outcome as stored.

    A done job whose image, intermediates or row cannot be written is stored as failed instead,
    its error naming the file and the OS error (``cannot write PATH: [Errno 28] No space left on
    device``), with that ``os_errno``.

    Raises:
        OSError: not even the failure could be stored (the results store cannot be written).
    """
    job, result = outcome.job, outcome.result
    keys = dict(job_id=job.job_id, method=job.method, sample_id=job.sample.id,
                task=job.sample.task, seed=job.seed)
    if result is None:
        run.store.record_failed(**keys, error=outcome.error or "unknown error")
        return outcome
    try:
        run.store.record_done(**keys, image=result.image, nfe=result.nfe,
                              uncached_nfe=result.uncached_nfe, wall_seconds=result.wall_seconds,
                              backward_passes=result.backward_passes,
                              model=result.model, params=result.params,
                              intermediates=result.intermediates)
    except OSError as err:
        error = write_error(err, f"the edit of {job.job_id}")
        run.store.record_failed(**keys, error=error)
        return replace(outcome, result=None, error=error, os_errno=err.errno)
    return outcome


def write_error(err: OSError, what: str) -> str:
    """``cannot write PATH: [Errno N] REASON`` for a write that failed (``what`` when the error
    names no file)."""
    detail = (f"[Errno {err.errno}] {err.strerror}" if err.errno is not None
              else f"{type(err).__name__}: {err}")  # e.g. PIL: an image mode PNG cannot hold
    return f"cannot write {err.filename or what}: {detail}"
