"""What a benchmark run is: :class:`RunConfig`, stored as the run directory's ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

# What must match for a run directory to be resumed with another command line.
IDENTITY_KEYS = ("dataset", "model", "params")


class RunConfigError(ValueError):
    """A run directory was created with a different dataset, model or method parameters, or
    cannot be made where it is asked for (a file is in the way)."""


@dataclass
class RunConfig:
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

    def to_json(self) -> dict[str, Any]:
        """The config as stored in ``config.json`` (absolute paths, editeval's version)."""
        record = asdict(self)
        for key in ("out", "data_dir", "prompts_file"):
            record[key] = None if record[key] is None else str(Path(record[key]).resolve())
        record["editeval_version"] = version("editeval")
        return record
