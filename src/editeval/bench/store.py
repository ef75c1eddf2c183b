"""The results store of a run directory: one SQLite row per finished job, images beside it.

Layout of a run directory::

    RUN_DIR/config.json          what the run is (dataset, model, methods, parameters)
    RUN_DIR/results.sqlite       one row per job: done (with NFE, time, image) or failed (with error)
    RUN_DIR/images/METHOD/TASK/N_seedS.png

A row is written only after its image is in place (written to a temporary name, then renamed), in
one transaction, so a run killed at any moment leaves either a complete job or no trace of it, and
the job id is the primary key, so nothing is ever duplicated.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping
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
