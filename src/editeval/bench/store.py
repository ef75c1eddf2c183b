"""The results store of a run directory: one SQLite row per finished job, images beside it.

Layout of a run directory::

    RUN_DIR/config.json          what the run is (dataset, model, methods, parameters)
    RUN_DIR/results.sqlite       one row per job: done (with NFE, time, image) or failed (with error)
    RUN_DIR/images/METHOD/TASK/N_seedS.png

``results.sqlite`` also holds ``judge_scores`` (LMM Score judgements), ``metric_scores`` (one value of
one classic metric by one backbone per job, NULL for NaN) and ``metric_set_scores`` (FID and KID per
method and task), filled by ``editeval score``.

A row is written only after its image is in place (written to a temporary name, then renamed), in
one transaction, so a run killed at any moment leaves either a complete job or no trace of it, and
the job id is the primary key, so nothing is ever duplicated.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

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
    finished_at  TEXT NOT NULL
)
"""

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

# What must match for a run directory to be resumed with another command line.
IDENTITY_KEYS = ("dataset", "model", "params")


class RunConfigError(ValueError):
    """A run directory was created with a different dataset, model or method parameters."""


@dataclass(frozen=True)
class ResultRow:
    """One job's outcome, as stored."""

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


class ResultStore:
    """Results of one run directory (created if absent)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.run_dir / "results.sqlite", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against process crashes
        self._db.execute(SCHEMA)
        self._db.execute(JUDGE_SCHEMA)
        self._db.execute(METRIC_SCHEMA)
        self._db.execute(METRIC_SET_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.json`` on first use; later, refuse a config whose identity differs.

        Raises:
            RunConfigError: the directory holds a run of another dataset, model or parameters.
        """
        path = self.run_dir / "config.json"
        if path.exists():
            stored = json.loads(path.read_text())
            for key in IDENTITY_KEYS:
                if stored.get(key) != config.get(key):
                    raise RunConfigError(
                        f"{self.run_dir} holds a run with {key}={stored.get(key)!r}, not "
                        f"{config.get(key)!r}; resume it with the same {key}, or pass a new --out"
                    )
        _atomic_write_text(path, json.dumps(dict(config), indent=2, sort_keys=True))

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
                    image: Image.Image, nfe: int, wall_seconds: float, model: str,
                    params: Mapping[str, Any]) -> Path:
        """Write the image atomically, then its row; returns the image's absolute path."""
        relative = self.image_path(method, sample_id, seed)
        target = self.run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._write(job_id, method, sample_id, task, seed, "done", str(relative), nfe,
                    wall_seconds, model, json.dumps(dict(params), sort_keys=True), None)
        return target

    def record_failed(self, *, job_id: str, method: str, sample_id: str, task: str, seed: int,
                      error: str) -> None:
        """Record a failed job with its error message."""
        self._write(job_id, method, sample_id, task, seed, "failed", None, None, None, None, None,
                    error)

    def _write(self, *values: Any) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._db.execute(
            "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, now),
        )

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
        for row in self._db.execute("SELECT * FROM results ORDER BY job_id"):
            values = list(row)
            values[10] = json.loads(values[10]) if values[10] else None
            yield ResultRow(*values)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
