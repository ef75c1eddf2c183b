"""The results store of a run directory: one SQLite row per finished job, images beside it.

:class:`editeval.run.Run` owns a run directory and opens its store; nothing else should. Tables:

- ``results``: one row per job: done (image path, NFE spent, uncached NFE, backward passes, wall
  seconds, the effective parameters, the method's intermediates as JSON) or failed (the error);
- ``judge_scores`` (LMM Score judgements), ``metric_scores`` (one value of one classic metric by
  one backbone per job, NULL for NaN) and ``metric_set_scores`` (FID and KID per method and task),
  filled by ``editeval score``.

A row is written only after its image (and its intermediates' files) are in place (written to a
temporary name, then renamed), in one transaction, so a run killed at any moment leaves either a
complete job or no trace of it, and the job id is the primary key, so nothing is ever duplicated.
Commands that only read open the store read-only: they create and change nothing.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image

from editeval.core.files import atomic_write
from editeval.run.intermediates import store_intermediates

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    job_id       TEXT PRIMARY KEY,
    method       TEXT NOT NULL,
    sample_id    TEXT NOT NULL,
    task         TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    image_path   TEXT,
    nfe          INTEGER,
    wall_seconds REAL,
    model        TEXT,
    params       TEXT,
    error        TEXT,
    finished_at  TEXT NOT NULL,
    uncached_nfe INTEGER,
    intermediates TEXT,
    backward_passes INTEGER
)
"""
# columns added after the first release, with their types: an older store gains them on open
ADDED_COLUMNS = {"uncached_nfe": "INTEGER", "intermediates": "TEXT",
                 "backward_passes": "INTEGER"}

JUDGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS judge_scores (
    job_id           TEXT NOT NULL,
    judge            TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    mode             TEXT NOT NULL,
    repeat           INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('ok', 'parse_failed', 'refused', 'error')),
    accuracy         INTEGER,
    preservation     INTEGER,
    quality          INTEGER,
    realism          INTEGER,
    s_all            REAL,
    position         INTEGER,
    group_size       INTEGER,
    message          TEXT,
    raw              TEXT,
    cache_key        TEXT,
    created_at       TEXT NOT NULL,
    PRIMARY KEY (job_id, judge, protocol_version, mode, repeat)
)
"""

METRIC_SCHEMA = """
CREATE TABLE IF NOT EXISTS metric_scores (
    job_id     TEXT NOT NULL,
    metric     TEXT NOT NULL,
    backbone   TEXT NOT NULL,
    region     TEXT NOT NULL,
    value      REAL,
    note       TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (job_id, metric, backbone)
)
"""

METRIC_SET_SCHEMA = """
CREATE TABLE IF NOT EXISTS metric_set_scores (
    method      TEXT NOT NULL,
    task        TEXT NOT NULL,
    metric      TEXT NOT NULL,
    backbone    TEXT NOT NULL,
    n           INTEGER NOT NULL,
    value       REAL,
    std         REAL,
    jobs_digest TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (method, task, metric, backbone)
)
"""

SCHEMAS = {"results": SCHEMA, "judge_scores": JUDGE_SCHEMA, "metric_scores": METRIC_SCHEMA,
           "metric_set_scores": METRIC_SET_SCHEMA}
STORE_FILE = "results.sqlite"
# SQLite's primary result codes (an extended code's low byte) for a store that cannot take a
# write, as the OS errors they stand for (SQLITE_CANTOPEN: see ResultStore._raise_disk_error),
# and their messages (Python 3.10's errors carry no code)
SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 8, 10, 13, 14
_SQLITE_ERRNOS = {SQLITE_FULL: errno.ENOSPC, SQLITE_READONLY: errno.EROFS, SQLITE_IOERR: errno.EIO}
_SQLITE_MESSAGES = {"database or disk is full": SQLITE_FULL, "disk I/O error": SQLITE_IOERR,
                    "attempt to write a readonly database": SQLITE_READONLY,
                    "unable to open database file": SQLITE_CANTOPEN}


def _sqlite_code(err: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``err`` (from its message on Python 3.10)."""
    code = getattr(err, "sqlite_errorcode", None)
    return _SQLITE_MESSAGES.get(str(err)) if code is None else code & 0xFF


@dataclass(frozen=True)
class ResultRow:
    """One job's outcome, as stored.

    ``nfe`` is what the edit spent in this run (an inversion reused from the run's cache costs 0);
    ``uncached_nfe`` what it costs on its own, ``backward_passes`` the backward passes through
    the denoiser (each ``None`` in rows written before it was recorded).
    ``intermediates`` is the method's intermediates as stored: JSON values as they are, a file's
    value as a reference (see :mod:`editeval.run.intermediates`); ``Run.intermediates`` loads them.
    """

    job_id: str
    method: str
    sample_id: str
    task: str
    seed: int
    status: str
    image_path: str | None
    nfe: int | None
    wall_seconds: float | None
    model: str | None
    params: dict[str, Any] | None
    error: str | None
    finished_at: str
    uncached_nfe: int | None
    intermediates: dict[str, Any] | None
    backward_passes: int | None


class ResultStore:
    """Results of one run directory; open it through :class:`editeval.run.Run`.

    Args:
        run_dir: the run directory; for writing, it and ``results.sqlite`` are created if absent
            (and an older store gains the newer columns).
        readonly: open for reading only: nothing is created or changed (a store of an older
            release reads as if it had the newer tables and columns, empty).

    Raises:
        OSError: for writing, the disk refuses the store (read-only, full, no permission);
            ``filename`` is ``results.sqlite``.
        sqlite3.OperationalError: ``readonly`` and there is no ``results.sqlite`` to open.
    """

    def __init__(self, run_dir: str | os.PathLike, readonly: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_FILE
        if readonly:
            self._open_readonly()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # created here with 0666 less the umask (SQLite's own default is 0644 less it); its -wal
        # and -shm files take the same mode
        os.close(os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666))
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against process crashes
            for schema in SCHEMAS.values():
                self._db.execute(schema)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as err:
            self._raise_disk_error(err)

    def _open_readonly(self) -> None:
        uri = self.path.resolve().as_uri()
        self._db = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
        try:
            self._shadow_missing_schema()
        except sqlite3.OperationalError as err:
            if _sqlite_code(err) != SQLITE_CANTOPEN:
                raise
            # a WAL store on a read-only disk, where its -shm file cannot be made: nothing can
            # change the store there, so it is read as it is
            self._db.close()
            self._db = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
            self._shadow_missing_schema()

    def _raise_disk_error(self, err: sqlite3.OperationalError) -> NoReturn:
        """Raise a write SQLite refused because of the disk as the ``OSError`` it stands for
        (``filename``: the store), and any other error as it is."""
        code = _sqlite_code(err)
        if code == SQLITE_CANTOPEN:  # the folder refuses the WAL's -wal or -shm file
            read_only = hasattr(os, "statvfs") and os.statvfs(self.run_dir).f_flag & os.ST_RDONLY
            code = errno.EROFS if read_only else errno.EACCES
        else:
            code = _SQLITE_ERRNOS.get(code)
        if code is None:
            raise err
        raise OSError(code, f"{os.strerror(code)} (SQLite: {err})", str(self.path)) from err

    def _shadow_missing_schema(self) -> None:
        """Give a read-only connection to an older store the current tables and columns, as
        empty temporary tables and a temporary view (in memory; the file is not touched)."""
        tables = {name for (name,) in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        for name, schema in SCHEMAS.items():
            if name not in tables:
                self._db.execute(schema.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE"))
        have = {row[1] for row in self._db.execute("PRAGMA main.table_info(results)")}
        missing = [column for column in ADDED_COLUMNS if have and column not in have]
        if missing:
            added = ", ".join(f"NULL AS {column}" for column in missing)
            self._db.execute(f"CREATE TEMP VIEW results AS SELECT *, {added} FROM main.results")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finished(self, retry_failed: bool = True) -> set[str]:
        """Ids of jobs that need no rerun: done ones whose image exists (and failed ones unless
        ``retry_failed``)."""
        rows = self._db.execute("SELECT job_id, status, image_path FROM results").fetchall()
        return {
            job_id
            for job_id, status, image_path in rows
            if (status == "done" and (self.run_dir / image_path).exists())
            or (status == "failed" and not retry_failed)
        }

    def image_path(self, method: str, sample_id: str, seed: int) -> Path:
        """Relative path of a job's image inside the run directory."""
        return Path("images") / method / f"{sample_id}_seed{seed}.png"

    def record_done(self, *, job_id: str, method: str, sample_id: str, task: str, seed: int,
                    image: Image.Image, nfe: int, uncached_nfe: int, wall_seconds: float,
                    model: str, params: Mapping[str, Any],
                    intermediates: Mapping[str, Any] | None = None,
                    backward_passes: int | None = None) -> Path:
        """Write the image and the intermediates' files atomically, then the row; returns the
        image's absolute path. ``intermediates`` are stored by
        :func:`editeval.run.intermediates.store_intermediates` under ``intermediates/<job>/``.

        Raises:
            OSError: a file or the row cannot be written (``filename``: the image, intermediate
                or ``results.sqlite``); no row is written then.
        """
        relative = self.image_path(method, sample_id, seed)
        target = self.run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda handle: image.save(handle, format="PNG"))
        stored = store_intermediates(intermediates or {}, self.run_dir,
                                     Path("intermediates") / method / f"{sample_id}_seed{seed}")
        self._write(job_id, method, sample_id, task, seed, "done", str(relative), nfe,
                    wall_seconds, model, json.dumps(dict(params), sort_keys=True), None,
                    uncached_nfe, json.dumps(stored, sort_keys=True), backward_passes)
        return target

    def record_failed(self, *, job_id: str, method: str, sample_id: str, task: str, seed: int,
                      error: str) -> None:
        """Record a failed job with its error message.

        Raises:
            OSError: the row cannot be written (``filename``: ``results.sqlite``).
        """
        self._write(job_id, method, sample_id, task, seed, "failed", None, None, None, None, None,
                    error, None, None, None)

    def _write(self, *values: Any) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        *head, uncached_nfe, intermediates, backward_passes = values
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO results (job_id, method, sample_id, task, seed, status, "
                "image_path, nfe, wall_seconds, model, params, error, finished_at, uncached_nfe, "
                "intermediates, backward_passes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?)",
                (*head, now, uncached_nfe, intermediates, backward_passes),
            )
        except sqlite3.OperationalError as err:  # a full or read-only disk: as an OSError
            self._raise_disk_error(err)

    def judged(self, judge: str, protocol_version: str, mode: str) -> set[tuple[str, int]]:
        """(job id, repeat) pairs that hold a final judgement (ok, parse failure or refusal; an
        ``error``, such as a network failure, is retried)."""
        rows = self._db.execute(
            "SELECT job_id, repeat FROM judge_scores WHERE judge=? AND protocol_version=? AND "
            "mode=? AND status != 'error'", (judge, protocol_version, mode))
        return {(job_id, repeat) for job_id, repeat in rows}

    def record_judgement(self, *, job_id: str, judge: str, protocol_version: str, mode: str,
                         repeat: int, status: str, scores: Mapping[str, int] | None,
                         s_all: float | None, position: int, group_size: int, message: str,
                         raw: str, cache_key: str | None) -> None:
        """Store one image's judgement (replacing an earlier one of the same key)."""
        scores = scores or {}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._db.execute(
            "INSERT OR REPLACE INTO judge_scores VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, judge, protocol_version, mode, repeat, status, scores.get("accuracy"),
             scores.get("preservation"), scores.get("quality"), scores.get("realism"), s_all,
             position, group_size, message, raw, cache_key, now))

    def judgements(self) -> list[dict[str, Any]]:
        """All judgements joined with their jobs' method, task and sample."""
        cursor = self._db.execute(
            "SELECT j.*, r.method, r.task, r.sample_id, r.seed FROM judge_scores j "
            "JOIN results r ON r.job_id = j.job_id ORDER BY j.job_id, j.repeat")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def metric_computed(self, metric: str, backbone: str) -> set[str]:
        """Ids of jobs that hold a value (a number or NaN) of ``metric`` by ``backbone``."""
        rows = self._db.execute("SELECT job_id FROM metric_scores WHERE metric=? AND backbone=?",
                                (metric, backbone))
        return {job_id for (job_id,) in rows}

    def record_metric_values(self, values: Iterable[tuple[str, str, str, str, float, str | None]]
                             ) -> None:
        """Store (job id, metric, backbone, region, value, note) rows in one transaction; a NaN
        value is stored as NULL (SQLite has no NaN) and read back as NaN."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO metric_scores VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job, metric, backbone, region, None if value != value else float(value), note,
                  now) for job, metric, backbone, region, value, note in values])

    def metric_values(self) -> list[dict[str, Any]]:
        """All per-image metric values joined with their jobs' method, task, sample and seed."""
        cursor = self._db.execute(
            "SELECT m.*, r.method, r.task, r.sample_id, r.seed FROM metric_scores m "
            "JOIN results r ON r.job_id = m.job_id ORDER BY m.metric, m.job_id")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor]
        for row in rows:
            row["value"] = float("nan") if row["value"] is None else row["value"]
        return rows

    def set_metric_digest(self, method: str, task: str, metric: str, backbone: str) -> str | None:
        """The digest of the jobs a stored set metric was computed over, or None."""
        row = self._db.execute(
            "SELECT jobs_digest FROM metric_set_scores WHERE method=? AND task=? AND metric=? AND "
            "backbone=?", (method, task, metric, backbone)).fetchone()
        return row[0] if row else None

    def record_set_metric(self, *, method: str, task: str, metric: str, backbone: str, n: int,
                          value: float, std: float | None, jobs_digest: str) -> None:
        """Store a set metric (FID, KID) of ``n`` edits of ``method`` on ``task`` (or ``all``)."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._db.execute(
            "INSERT OR REPLACE INTO metric_set_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (method, task, metric, backbone, n, value, std, jobs_digest, now))

    def set_metric_values(self) -> list[dict[str, Any]]:
        """All stored set metrics."""
        cursor = self._db.execute("SELECT * FROM metric_set_scores ORDER BY metric, method, task")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def rows(self) -> Iterator[ResultRow]:
        """All stored rows, ordered by job id."""
        cursor = self._db.execute("SELECT * FROM results ORDER BY job_id")
        names = [d[0] for d in cursor.description]
        for values in cursor:
            row = dict(zip(names, values))
            for key in ("params", "intermediates"):
                row[key] = json.loads(row[key]) if row[key] else None
            yield ResultRow(**row)
