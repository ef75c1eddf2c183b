"""The benchmark runner: plan a run's jobs, execute them (in this process, or on a Ray cluster with
:class:`editeval.bench.ray_executor.RayExecutor`, imported from there: it needs Ray; any executor
plugs in through :class:`~editeval.bench.execute.Executor`), record every outcome, resumably."""

from editeval.bench.execute import Executor, ExecutorError, LocalExecutor, Outcome
from editeval.bench.plan import Job, Plan, PlanError, plan_jobs, plan_run
from editeval.bench.runner import BenchSummary, run_bench, summarize

__all__ = ["BenchSummary", "Executor", "ExecutorError", "Job", "LocalExecutor", "Outcome", "Plan",
           "PlanError", "plan_jobs", "plan_run", "run_bench", "summarize"]
