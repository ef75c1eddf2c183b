"""The user study's tables, kept in the run's ``results.sqlite`` beside the edits and scores.

Tables (created on first use; WAL journal, so a server killed at any moment loses nothing that
was acknowledged):

- ``study_settings``: ``k`` (raters per unit) and ``layout`` (``survey`` or ``per-edit``);
- ``study_edits``: one row per finished edit in the study: an opaque ``edit_key`` (what raters'
  pages and forms name; never the job id, which holds the method's name) and its ``unit``;
- ``study_raters``: id, name, the link ``token`` (``secrets.token_urlsafe``, 32 characters), the
  form token ``csrf``, ``simulated`` (1 for :mod:`editeval.study.simulate`'s raters), creation and
  revocation times;
- ``study_assignments``: (rater, unit, position): what each rater is asked to rate, in order
  (:mod:`editeval.study.assign`);
- ``study_ratings``: one row per (rater, job): the four factors, integers 1-10 (checked by SQLite
  too), the layout and the time. (rater, job) is the primary key: a duplicate cannot be stored.

Every rating page is written in one ``BEGIN IMMEDIATE`` transaction, after
:meth:`StudyStore.record_unit` has checked it; :class:`RatingRefused` says why one was not.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from editeval.core.lmm_score import FACTORS
from editeval.run import Run
from editeval.run.directory import STORE_FILE
from editeval.study.assign import plan

LAYOUTS = ("survey", "per-edit")
DEFAULT_K = 3

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS study_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS study_edits (
        edit_key TEXT PRIMARY KEY,
        job_id   TEXT NOT NULL UNIQUE,
        unit     TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS study_edits_unit ON study_edits (unit)",
    """CREATE TABLE IF NOT EXISTS study_raters (
        rater_id   INTEGER PRIMARY KEY,
        name       TEXT NOT NULL,
        token      TEXT NOT NULL UNIQUE,
        csrf       TEXT NOT NULL,
        simulated  INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        revoked_at TEXT)""",
    """CREATE TABLE IF NOT EXISTS study_assignments (
        rater_id INTEGER NOT NULL REFERENCES study_raters (rater_id),
        unit     TEXT NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (rater_id, unit))""",
    """CREATE TABLE IF NOT EXISTS study_ratings (
        rater_id     INTEGER NOT NULL REFERENCES study_raters (rater_id),
        job_id       TEXT NOT NULL,
        accuracy     INTEGER NOT NULL CHECK (accuracy BETWEEN 1 AND 10),
        preservation INTEGER NOT NULL CHECK (preservation BETWEEN 1 AND 10),
        quality      INTEGER NOT NULL CHECK (quality BETWEEN 1 AND 10),
        realism      INTEGER NOT NULL CHECK (realism BETWEEN 1 AND 10),
        layout       TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        PRIMARY KEY (rater_id, job_id))""",
]


class StudyError(ValueError):
    """An operator's request the study cannot take (unknown rater, layout change after ratings)."""


class RatingRefused(ValueError):
    """A submitted rating page was not stored; ``status`` is the HTTP status that says why (400
    malformed, 403 not this rater's, 409 already rated)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Rater:
    """One rater: ``token`` is their private link's secret, ``csrf`` their forms' token."""

    rater_id: int
    name: str
    token: str
    csrf: str
    simulated: bool
    created_at: str
    revoked_at: str | None


@dataclass(frozen=True)
class StudyEdit:
    """One edit in the study: the opaque key raters see, the run's job id, and its unit."""

    edit_key: str
    job_id: str
    unit: str


@dataclass(frozen=True)
class Progress:
    """A rater's work: ``done`` units of ``total`` held; ``next_unit`` the first unfinished one."""

    done: int
    total: int
    next_unit: str | None


_RATER_COLUMNS = "rater_id, name, token, csrf, simulated, created_at, revoked_at"


def _rater(row: tuple) -> Rater:
    return Rater(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _unit(layout: str, sample_id: str, seed: int, edit_key: str) -> str:
    return f"{sample_id} seed {seed}" if layout == "survey" else edit_key


def study_exists(run: Run) -> bool:
    """Whether the run's store holds a user study (read only: creates nothing)."""
    path = run.path / STORE_FILE
    if not path.exists():
        return False
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT 1 FROM sqlite_master WHERE name='study_ratings'").fetchone() \
            is not None
    finally:
        db.close()


class StudyStore:
    """The user study of one run; thread-safe (one connection behind a lock).

    Open it on a :class:`~editeval.run.Run` (``readonly``: for reading a study that exists, see
    :func:`study_exists`); ``close`` it (or use it as a context manager).
    """

    def __init__(self, run: Run, readonly: bool = False) -> None:
        self.run = run
        self._lock = threading.Lock()
        path = run.path / STORE_FILE
        if readonly:  # reports and analyses: nothing is created or changed
            self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False)
            return
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=10000")  # `editeval score` may write meanwhile
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against process crashes
        with self._write():
            for statement in SCHEMA:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One writer transaction (taken at once: concurrent writers queue, none fails later)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # settings and edits ---------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """``k`` and ``layout`` (defaults until :meth:`configure` sets them)."""
        stored = dict(self._read("SELECT key, value FROM study_settings"))
        return {"k": int(stored.get("k", DEFAULT_K)), "layout": stored.get("layout", "survey")}

    def configure(self, k: int | None = None, layout: str | None = None) -> dict[str, Any]:
        """Set ``k`` and/or the layout, and add the run's finished edits not yet in the study.

        Raises:
            StudyError: ``k`` < 1, an unknown layout, or a new layout once ratings exist.
        """
        current = self.settings()
        if k is not None and k < 1:
            raise StudyError(f"--k must be at least 1 (raters per edit), not {k}")
        if layout is not None and layout not in LAYOUTS:
            raise StudyError(f"unknown layout {layout!r}; use {' or '.join(LAYOUTS)}")
        relayout = layout is not None and layout != current["layout"]
        if relayout and self._read("SELECT 1 FROM study_ratings LIMIT 1"):
            raise StudyError(f"this study already has ratings in the {current['layout']} layout;"
                             f" it cannot change to {layout}")
        layout = layout or current["layout"]
        rows = {row.job_id: row for row in self.run.rows("done")}
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO study_settings VALUES (?, ?)",
                           [("k", str(k or current["k"])), ("layout", layout)])
            if relayout:
                db.execute("DELETE FROM study_assignments")
                for edit_key, job_id in db.execute(
                        "SELECT edit_key, job_id FROM study_edits").fetchall():
                    row = rows.get(job_id)
                    if row is not None:
                        db.execute("UPDATE study_edits SET unit=? WHERE edit_key=?",
                                   (_unit(layout, row.sample_id, row.seed, edit_key), edit_key))
            known = {job for (job,) in db.execute("SELECT job_id FROM study_edits")}
            for row in rows.values():
                if row.job_id not in known:
                    edit_key = secrets.token_urlsafe(9)
                    db.execute("INSERT INTO study_edits VALUES (?, ?, ?)",
                               (edit_key, row.job_id,
                                _unit(layout, row.sample_id, row.seed, edit_key)))
        return self.settings()

    def edits(self) -> list[StudyEdit]:
        """Every edit in the study, ordered by unit and key."""
        return [StudyEdit(*row) for row in self._read(
            "SELECT edit_key, job_id, unit FROM study_edits ORDER BY unit, edit_key")]

    def edit(self, edit_key: str) -> StudyEdit | None:
        """The edit with this key, or None."""
        found = self._read("SELECT edit_key, job_id, unit FROM study_edits WHERE edit_key=?",
                           (edit_key,))
        return StudyEdit(*found[0]) if found else None

    def units(self) -> list[str]:
        """Every unit, ordered by their first job id (so a plan depends on the jobs only, not
        on the random edit keys)."""
        return [u for (u,) in self._read(
            "SELECT unit FROM study_edits GROUP BY unit ORDER BY MIN(job_id), unit")]

    # raters -----------------------------------------------------------------------------------

    def add_raters(self, count: int, *, simulated: bool = False,
                   prefix: str = "rater") -> list[Rater]:
        """Create ``count`` raters with fresh private tokens, then re-plan the assignment.

        Raises:
            StudyError: ``count`` < 1, or the study has no edits (run ``editeval bench`` first).
        """
        if count < 1:
            raise StudyError(f"the number of raters must be at least 1, not {count}")
        if not self.units():
            raise StudyError(f"{self.run.path} has no finished edits to rate; run "
                             "`editeval bench` first")
        created = []
        with self._write() as db:
            start = db.execute("SELECT COALESCE(MAX(rater_id), 0) FROM study_raters").fetchone()[0]
            for rater_id in range(start + 1, start + count + 1):
                rater = Rater(rater_id, f"{prefix} {rater_id}", secrets.token_urlsafe(24),
                              secrets.token_urlsafe(24), simulated, _now(), None)
                db.execute("INSERT INTO study_raters VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (rater.rater_id, rater.name, rater.token, rater.csrf,
                            int(rater.simulated), rater.created_at, None))
                created.append(rater)
        self.replan()
        return created

    def raters(self) -> list[Rater]:
        """All raters, revoked ones included, by id."""
        return [_rater(row) for row in self._read(
            f"SELECT {_RATER_COLUMNS} FROM study_raters ORDER BY rater_id")]

    def rater_by_token(self, token: str) -> Rater | None:
        """The rater whose link holds ``token`` (revoked or not), or None."""
        rows = self._read(f"SELECT {_RATER_COLUMNS} FROM study_raters WHERE token=?", (token,))
        return _rater(rows[0]) if rows else None

    def revoke(self, rater_id: int) -> None:
        """Revoke a rater's link (their ratings stay) and hand their unstarted units to others.

        Raises:
            StudyError: no such rater.
        """
        with self._write() as db:
            changed = db.execute("UPDATE study_raters SET revoked_at=? WHERE rater_id=? AND "
                                 "revoked_at IS NULL", (_now(), rater_id)).rowcount
            if not changed and not db.execute("SELECT 1 FROM study_raters WHERE rater_id=?",
                                              (rater_id,)).fetchone():
                raise StudyError(f"no rater {rater_id} in this study; `editeval study raters "
                                 f"{self.run.path}` lists them")
        self.replan()

    # assignment -------------------------------------------------------------------------------

    def _rated_units(self) -> dict[int, set[str]]:
        rated: dict[int, set[str]] = defaultdict(set)
        for rater_id, unit in self._read(
                "SELECT DISTINCT r.rater_id, e.unit FROM study_ratings r "
                "JOIN study_edits e ON e.job_id = r.job_id"):
            rated[rater_id].add(unit)
        return rated

    def replan(self) -> dict[str, int]:
        """Re-run :func:`editeval.study.assign.plan` over the active raters; returns the units
        that cannot reach ``k`` raters (unit -> raters missing)."""
        settings = self.settings()
        active = [r.rater_id for r in self.raters() if r.revoked_at is None]
        assigned: dict[int, list[str]] = defaultdict(list)
        for rater_id, unit in self._read(
                "SELECT rater_id, unit FROM study_assignments ORDER BY rater_id, position"):
            assigned[rater_id].append(unit)
        result = plan(self.units(), settings["k"], active, assigned, self._rated_units())
        with self._write() as db:
            db.execute("DELETE FROM study_assignments")
            db.executemany("INSERT INTO study_assignments VALUES (?, ?, ?)",
                           [(rater, unit, position) for rater, units in result.assigned.items()
                            for position, unit in enumerate(units)])
        return result.shortfall

    def progress(self, rater_id: int) -> Progress:
        """How far a rater is: units held, finished, and the first one left."""
        rows = self._read(
            "SELECT a.unit, COUNT(e.edit_key), COUNT(r.job_id) FROM study_assignments a "
            "JOIN study_edits e ON e.unit = a.unit LEFT JOIN study_ratings r "
            "ON r.job_id = e.job_id AND r.rater_id = a.rater_id WHERE a.rater_id = ? "
            "GROUP BY a.unit ORDER BY a.position", (rater_id,))
        left = [unit for unit, edits, rated in rows if rated < edits]
        return Progress(len(rows) - len(left), len(rows), left[0] if left else None)

    def holds(self, rater_id: int, unit: str) -> bool:
        """Whether ``unit`` is assigned to the rater."""
        return bool(self._read("SELECT 1 FROM study_assignments WHERE rater_id=? AND unit=?",
                               (rater_id, unit)))

    def unrated_edits(self, rater_id: int, unit: str) -> list[StudyEdit]:
        """The unit's edits the rater has not rated yet, in an order fixed per rater and unit
        (shuffled: positions carry no information about the method)."""
        rows = self._read(
            "SELECT e.edit_key, e.job_id, e.unit FROM study_edits e WHERE e.unit = ? AND NOT "
            "EXISTS (SELECT 1 FROM study_ratings r WHERE r.rater_id = ? AND r.job_id = e.job_id) "
            "ORDER BY e.edit_key", (unit, rater_id))
        edits = [StudyEdit(*row) for row in rows]
        random.Random(f"{rater_id}/{unit}").shuffle(edits)
        return edits

    # ratings ----------------------------------------------------------------------------------

    def record_unit(self, rater_id: int, ratings: Mapping[str, Mapping[str, Any]]) -> int:
        """Store one rating page: edit key -> {factor: integer 1-10}, for exactly the edits of
        one unit held by the rater that they have not rated yet; all or nothing, in one writer
        transaction. Returns the number of ratings stored.

        Raises:
            RatingRefused: 400 for an unknown edit, a missing or extra factor, a value that is not
                an integer 1-10, edits of several units or a page left incomplete; 403 for a unit
                not assigned to this rater or a revoked rater; 409 when the page was rated before.
        """
        if not ratings:
            raise RatingRefused(400, "no ratings in the form")
        edits = {}
        for key in ratings:
            edit = self.edit(key)
            if edit is None:
                raise RatingRefused(400, f"unknown edit id {key!r}")
            edits[key] = edit
        values = {key: _checked(scores) for key, scores in ratings.items()}
        units = {edit.unit for edit in edits.values()}
        if len(units) != 1:
            raise RatingRefused(400, "a form rates the edits of one page only")
        unit = units.pop()
        layout = self.settings()["layout"]
        now = _now()
        with self._write() as db:
            active = db.execute("SELECT revoked_at IS NULL FROM study_raters WHERE rater_id=?",
                                (rater_id,)).fetchone()
            if not active or not active[0]:
                raise RatingRefused(403, "this rater link has been revoked")
            if not db.execute("SELECT 1 FROM study_assignments WHERE rater_id=? AND unit=?",
                              (rater_id, unit)).fetchone():
                raise RatingRefused(403, "this page is not assigned to you")
            rated = {job for (job,) in db.execute(
                "SELECT r.job_id FROM study_ratings r JOIN study_edits e ON e.job_id = r.job_id "
                "WHERE r.rater_id=? AND e.unit=?", (rater_id, unit))}
            if any(edit.job_id in rated for edit in edits.values()):
                raise RatingRefused(409, "you have already rated this page")
            total = db.execute("SELECT COUNT(*) FROM study_edits WHERE unit=?",
                               (unit,)).fetchone()[0]
            if len(rated) + len(edits) != total:
                raise RatingRefused(400, f"rate every edit on the page: {total - len(rated)} "
                                         f"to rate, {len(edits)} given")
            db.executemany(
                "INSERT INTO study_ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(rater_id, edits[key].job_id, *(values[key][f] for f in FACTORS), layout, now)
                 for key in edits])
        return len(edits)

    def ratings(self) -> list[dict[str, Any]]:
        """Every rating with its rater (id, simulated) and job id, by rater and job."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT r.rater_id, t.simulated, r.job_id, e.edit_key, r.accuracy, "
                "r.preservation, r.quality, r.realism, r.layout, r.created_at FROM study_ratings r "
                "JOIN study_raters t ON t.rater_id = r.rater_id "
                "JOIN study_edits e ON e.job_id = r.job_id ORDER BY r.rater_id, r.job_id")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]


def _checked(scores: Mapping[str, Any]) -> dict[str, int]:
    """The four factors as integers 1-10, or :class:`RatingRefused` (400)."""
    if set(scores) != set(FACTORS):
        missing = sorted(set(FACTORS) - set(scores))
        extra = sorted(set(scores) - set(FACTORS))
        raise RatingRefused(400, "each edit needs " + ", ".join(FACTORS) + (
            f"; missing {', '.join(missing)}" if missing else "") + (
            f"; unknown {', '.join(extra)}" if extra else ""))
    checked = {}
    for factor in FACTORS:
        value = scores[factor]
        text = str(value)
        if isinstance(value, bool) or not (text.isascii() and text.isdigit()) \
                or not 1 <= int(text) <= 10:
            raise RatingRefused(400, f"{factor} must be an integer from 1 to 10, not {text[:20]!r}")
        checked[factor] = int(text)
    return checked
