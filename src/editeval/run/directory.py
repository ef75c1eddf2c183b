"""A benchmark run directory as one object: :class:`Run`.

Layout::

    RUN_DIR/config.json          what the run is (dataset, model, methods, parameters)
    RUN_DIR/results.sqlite       one row per job, judge scores, metric values (:mod:`.store`)
    RUN_DIR/images/METHOD/TASK/N_seedS.png           edited images, at the source's size
    RUN_DIR/intermediates/METHOD/TASK/N_seedS/...    what methods produced besides the image
    RUN_DIR/inversions/KEY.pt    inversions shared by the run's methods
    RUN_DIR/judge_cache/         the judge's raw requests and responses

``editeval bench`` creates a run (:meth:`Run.for_config`, then :meth:`Run.save_config`);
``editeval score``, ``leaderboard``, ``verify`` and every later report open it with
:meth:`Run.open`. Nothing else reads these files by hand.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from editeval.core.samples import Dataset, Sample
from editeval.data.datasets import load_dataset
from editeval.diffusion.inversion_cache import InversionCache
from editeval.run.config import IDENTITY_KEYS, RunConfig, RunConfigError
from editeval.run.intermediates import atomic_write, load_intermediates
from editeval.run.store import ResultRow, ResultStore

CONFIG_FILE = "config.json"
STORE_FILE = "results.sqlite"


class NotARunError(ValueError):
    """A path is not a run directory (it has no ``config.json``)."""


class Run:
    """One run directory: its config, results store, samples, images, caches and intermediates.

    Use :meth:`open` for an existing run and :meth:`for_config` for one to create or resume; close
    it (or use it as a context manager) to close the store.

    Attributes:
        path: the run directory.
        config: the stored configuration (``config.json`` as a dict; see :class:`RunConfig`).
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]) -> None:
        self.path = Path(path)
        self.config = config
        self._store: ResultStore | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """The existing run in ``path``.

        Raises:
            NotARunError: ``path`` holds no ``config.json`` (the message says how to make one).
        """
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise NotARunError(f"{path} is not a run directory (no {CONFIG_FILE}); run "
                               f"`editeval bench ... --out {path}` first")
        return cls(path, json.loads((path / CONFIG_FILE).read_text()))

    @classmethod
    def for_config(cls, config: RunConfig) -> Run:
        """The run ``config`` describes, in ``config.out``; nothing is written until
        :meth:`save_config` or a record.

        Raises:
            RunConfigError: ``config.out`` holds a run of another dataset, model or parameters.
        """
        record = config.to_json()
        stored = Path(config.out) / CONFIG_FILE
        if stored.is_file():
            previous = json.loads(stored.read_text())
            for key in IDENTITY_KEYS:
                if previous.get(key) != record.get(key):
                    raise RunConfigError(
                        f"{config.out} holds a run with {key}={previous.get(key)!r}, not "
                        f"{record.get(key)!r}; resume it with the same {key}, or pass a new --out")
        return cls(config.out, record)

    def save_config(self) -> None:
        """Write ``config.json`` (atomically), creating the directory."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.config, indent=2, sort_keys=True)
        atomic_write(self.path / CONFIG_FILE, lambda handle: handle.write(text.encode()))

    @property
    def model(self) -> str:
        """The model the run's edits were made with (suite, short name, path or hub id)."""
        return self.config["model"]

    @cached_property
    def dataset(self) -> Dataset:
        """The run's dataset, loaded once.

        Raises:
            DatasetError: the dataset cannot be loaded (moved or deleted since the run).
        """
        return load_dataset(self.config["dataset"], self.config.get("data_dir"),
                            self.config.get("prompts_file"))

    @cached_property
    def samples(self) -> dict[str, Sample]:
        """The dataset's samples by id."""
        return {sample.id: sample for sample in self.dataset.samples}

    @property
    def store(self) -> ResultStore:
        """The results store (opened on first use, created if absent)."""
        if self._store is None:
            self._store = ResultStore(self.path)
        return self._store

    def finished(self, retry_failed: bool = True) -> set[str]:
        """Ids of jobs that need no rerun (see :meth:`ResultStore.finished`); reads an existing
        store only, so planning a new run creates nothing."""
        if self._store is None and not (self.path / STORE_FILE).exists():
            return set()
        return self.store.finished(retry_failed)

    def rows(self, status: str | None = None) -> list[ResultRow]:
        """The stored jobs (``status`` "done" or "failed" to filter), ordered by job id."""
        return [row for row in self.store.rows() if status is None or row.status == status]

    def image_path(self, row: ResultRow) -> Path:
        """The absolute path of a done job's edited image."""
        return self.path / row.image_path

    def intermediates(self, row: ResultRow) -> dict[str, Any]:
        """A job's intermediates with their files read back (see :mod:`.intermediates`)."""
        return load_intermediates(row.intermediates, self.path)

    @cached_property
    def inversion_cache(self) -> InversionCache:
        """The inversions shared by the run's methods (``RUN_DIR/inversions``)."""
        return InversionCache(self.path / "inversions")

    @property
    def judge_cache_dir(self) -> Path:
        """Where model judges cache their requests and responses."""
        return self.path / "judge_cache"

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
