"""A benchmark run directory: :class:`Run` owns its config, results store, samples, images,
inversion cache, judge cache and intermediates; every command opens runs through it."""

from editeval.run.config import RunConfig, RunConfigError
from editeval.run.directory import NotARunError, Run
from editeval.run.store import ResultRow, ResultStore

__all__ = ["NotARunError", "ResultRow", "ResultStore", "Run", "RunConfig", "RunConfigError"]
