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
:meth:`Run.open` (``readonly=True`` for commands that only read: they create and change
nothing). Nothing else reads these files by hand. Files are written with
:func:`editeval.core.files.atomic_write`, with the permissions the user's umask gives.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from editeval.core.files import atomic_write
from editeval.core.samples import Dataset, Sample
from editeval.data.datasets import load_dataset
from editeval.diffusion.inversion_cache import InversionCache
from editeval.run.config import IDENTITY_KEYS, RunConfig, RunConfigError
from editeval.run.intermediates import load_intermediates
from editeval.run.store import STORE_FILE, ResultRow, ResultStore

CONFIG_FILE = "config.json"


class NotARunError(ValueError):
    """A path is not a run directory (no folder, no run's ``config.json``), or, for reading, a run
    that holds no results yet."""


class Run:
    """One run directory: its config, results store, samples, images, caches and intermediates.

    Use :meth:`open` for an existing run and :meth:`for_config` for one to create or resume; close
    it (or use it as a context manager) to close the store.

    Attributes:
        path: the run directory.
        config: the stored configuration (``config.json`` as a dict; see :class:`RunConfig`).
        readonly: opened for reading only (:meth:`open`): the store is read, never written.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any],
                 readonly: bool = False) -> None:
        self.path = Path(path)
        self.config = config
        self.readonly = readonly
        self._store: ResultStore | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, readonly: bool = False) -> Run:
        """The existing run in ``path``; nothing is created or written when ``path`` is not one.

        Args:
            readonly: for commands that only read (``leaderboard``, reports): the store is opened
                read-only and must exist; nothing in the run directory is created or changed.

        Raises:
            NotARunError: ``path`` is a file, or holds no run's ``config.json`` (a JSON object
                naming the dataset and model); or ``readonly`` and the run has no results yet.
                The message says what to do.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotARunError(f"{path} is a file, not a run directory; pass the folder "
                               "`editeval bench` made")
        hint = f"run `editeval bench ... --out {path}` first"
        config = _stored_config(path)
        if config is None:
            raise NotARunError(f"{path} is not a run directory (no {CONFIG_FILE}); {hint}")
        if readonly and not (path / STORE_FILE).is_file():
            raise NotARunError(f"{path} holds no results yet (no {STORE_FILE}); {hint}")
        return cls(path, config, readonly)

    @classmethod
    def for_config(cls, config: RunConfig) -> Run:
        """The run ``config`` describes, in ``config.out``; nothing is written until
        :meth:`save_config` or a record.

        Raises:
            RunConfigError: ``config.out`` holds a run of another dataset, model or parameters,
                or it (or a folder above it) is a file.
            NotARunError: ``config.out`` holds a ``config.json`` that is not a run's.
        """
        out = Path(config.out)
        for folder in (out, *out.parents):  # the nearest existing one must be a folder
            if folder.exists():
                if not folder.is_dir():
                    raise RunConfigError(f"cannot make the run directory {out}: {folder} is a "
                                         "file, not a folder; pass another --out")
                break
        record = config.to_json()
        previous = _stored_config(out)
        if previous is not None:
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
        """The results store (opened on first use; created if absent unless the run was opened
        read-only)."""
        if self._store is None:
            self._store = ResultStore(self.path, readonly=self.readonly)
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


def _stored_config(path: Path) -> dict[str, Any] | None:
    """The run configuration in ``path / config.json``, or ``None`` when there is none.

    Raises:
        NotARunError: there is a ``config.json``, but not a run's (unreadable, not JSON, or not
            an object naming the dataset and model: a model folder's, say).
    """
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotARunError(f"{path} is not a run directory ({CONFIG_FILE} cannot be read: "
                           f"{err})") from None
    if not (isinstance(config, dict) and {"dataset", "model"} <= config.keys()):
        raise NotARunError(f"{path} is not a run directory (its {CONFIG_FILE} is not a run's: "
                           "it names no dataset and model)")
    return config
