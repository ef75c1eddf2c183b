"""The benchmark runner: every method on every sample and seed, resumable."""

from editeval.bench.runner import BenchConfig, BenchSummary, Job, plan_jobs, run_bench
from editeval.bench.store import ResultStore, RunConfigError

__all__ = ["BenchConfig", "BenchSummary", "Job", "ResultStore", "RunConfigError", "plan_jobs",
           "run_bench"]
