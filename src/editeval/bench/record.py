"""Recording outcomes: the single writer of a run's results (the executors never write)."""

from __future__ import annotations

from editeval.bench.execute import Outcome
from editeval.run import Run


def record(run: Run, outcome: Outcome) -> None:
    """Store one outcome in ``run``: the image, intermediates and row of a done job (both NFE
    costs), or the error of a failed one."""
    job, result = outcome.job, outcome.result
    keys = dict(job_id=job.job_id, method=job.method, sample_id=job.sample.id,
                task=job.sample.task, seed=job.seed)
    if result is None:
        run.store.record_failed(**keys, error=outcome.error or "unknown error")
        return
    run.store.record_done(**keys, image=result.image, nfe=result.nfe,
                          uncached_nfe=result.uncached_nfe, wall_seconds=result.wall_seconds,
                          model=result.model, params=result.params,
                          intermediates=result.intermediates)
