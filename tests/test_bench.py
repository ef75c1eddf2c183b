"""The bench runner on real EditEval v1 images with the tiny suite: resume after SIGKILL, failures."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from editeval.bench import run_bench
from editeval.editing import EditInputWarning
from editeval.run import Run, RunConfig, RunConfigError


def bench_command(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "editeval.cli", "bench", "--dataset", "editeval-v1",
            "--data-dir", str(data_dir), "--methods", "sdedit,instructpix2pix", "--model", "tiny",
            "--out", str(out), "--limit", "1", *extra]


def done_rows(out: Path) -> int:
    try:
        with sqlite3.connect(out / "results.sqlite") as db:
            return db.execute("SELECT COUNT(*) FROM results WHERE status='done'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(editeval_v1_dir, tmp_path):
    out = tmp_path / "run"
    # two jobs: a quick SDEdit one, then an InstructPix2Pix one slow enough for the kill, sent as
    # soon as the first is recorded, to land in it; one torch thread, as the README advises on a
    # busy machine (all three runs alike, so their edits agree)
    command = bench_command(editeval_v1_dir, out, "--set", "sdedit.num_inference_steps=2",
                            "--set", "instructpix2pix.num_inference_steps=20")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)
    # generous limits: on 2 cores oversubscribed by other jobs, one resume took over 300 s
    deadline = time.monotonic() + 600
    while done_rows(out) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = done_rows(out)
    assert killed_at == 1, f"the kill did not land mid-run ({killed_at} jobs done)"
    with sqlite3.connect(out / "results.sqlite") as db:
        finished = db.execute("SELECT job_id, finished_at FROM results").fetchall()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stderr
    with Run.open(out) as run:
        rows = run.rows()
    assert len(rows) == 2
    assert len({row.job_id for row in rows}) == 2
    assert {row.status for row in rows} == {"done"}
    assert {row.method for row in rows} == {"sdedit", "instructpix2pix"}
    assert {row.nfe for row in rows if row.method == "instructpix2pix"} == {60}
    assert {row.nfe for row in rows if row.method == "sdedit"} == {2}
    images = sorted(p for p in (out / "images").rglob("*") if p.is_file())
    assert len(images) == 2  # no duplicates, no leftover temporary files
    for row in rows:
        with Image.open(out / row.image_path) as image:
            assert image.size == (1024, 1024)  # stored at the source's size
    assert f"{2 - killed_at} done" in resumed.stdout.replace("\n", " ")
    with sqlite3.connect(out / "results.sqlite") as db:  # the job done before the kill: not redone
        assert set(finished) <= set(db.execute("SELECT job_id, finished_at FROM results"))

    again = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0 and "Nothing to run: all 2 jobs are finished" in again.stderr


def test_failed_job_is_recorded_and_the_run_goes_on(editeval_v1_dir, tmp_path):
    config = RunConfig(dataset="editeval-v1", methods=["sdedit"], model="tiny",
                         out=tmp_path / "run", data_dir=editeval_v1_dir, limit=2,
                         params={"sdedit": {"num_inference_steps": 4}})
    first = run_bench(config)
    assert (first.done, first.failed) == (2, 0)
    # a bad image for one sample: that job fails with a readable error, the other one is done
    broken = tmp_path / "broken"
    broken.mkdir()
    for child in editeval_v1_dir.iterdir():
        (broken / child.name).symlink_to(child)
    (broken / "object_addition").unlink()
    (broken / "object_addition").mkdir()
    (broken / "object_addition" / "1.jpg").write_bytes(b"not a jpeg")
    (broken / "object_addition" / "3.jpg").symlink_to(editeval_v1_dir / "object_addition" / "3.jpg")
    config.data_dir, config.out = broken, tmp_path / "run2"
    second = run_bench(config)
    assert (second.done, second.failed) == (1, 1)
    error = second.errors["sdedit/object_addition/1/seed0"]
    assert error.startswith("ImageLoadError") and "1.jpg" in error
    with Run.open(config.out) as run:
        statuses = {row.sample_id: row.status for row in run.rows()}
    assert statuses == {"object_addition/1": "failed", "object_addition/3": "done"}
    # --skip-failed leaves it alone; the default retries it
    config.retry_failed = False
    assert run_bench(config).skipped == 2
    config.retry_failed = True
    assert run_bench(config).failed == 1


def test_resuming_with_another_model_is_refused(editeval_v1_dir, tmp_path):
    config = RunConfig(dataset="editeval-v1", methods=["sdedit"], model="tiny",
                         out=tmp_path / "run", data_dir=editeval_v1_dir, limit=1,
                         params={"sdedit": {"num_inference_steps": 2}})
    run_bench(config)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["model"] == "tiny" and stored["params"] == {"sdedit": {"num_inference_steps": 2}}
    config.model = "sd15"
    with pytest.raises(RunConfigError, match="model='tiny'"):
        run_bench(config)


def test_unknown_parameter_fails_before_any_job(editeval_v1_dir, tmp_path):
    config = RunConfig(dataset="editeval-v1", methods=["sdedit"], model="tiny",
                         out=tmp_path / "run", data_dir=editeval_v1_dir,
                         params={"sdedit": {"steps": 2}})
    with pytest.raises(ValueError, match="no parameter steps"):
        run_bench(config)
    assert not (tmp_path / "run").exists()


def test_bench_on_the_toy_split(tmp_path):
    """Toy samples carry masks (full ones for style change): mask-free methods must not care."""
    config = RunConfig(dataset="editeval-toy", methods=["sdedit"], model="tiny",
                         out=tmp_path / "run", data_dir=tmp_path / "toy",
                         tasks=["style_change"], limit=3,
                         params={"sdedit": {"num_inference_steps": 2}})
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        summary = run_bench(config)
    assert (summary.done, summary.failed) == (3, 0)
    with Run.open(config.out) as run:
        sizes = {Image.open(run.image_path(row)).size for row in run.rows()}
        notes = [run.intermediates(row).get("warnings") for row in run.rows()]
    assert sizes == {(64, 64)}
    # every sample carries a mask, an instruction and a source prompt, which SDEdit does not use:
    # in a benchmark that is no news, so neither the rows nor the run warn (a runner that passed
    # edit()'s ignored-input warnings through would show one per job)
    assert notes == [None, None, None] and summary.warned == {}
    assert not [w for w in shown if issubclass(w.category, EditInputWarning)]


def test_eta_counts_each_method_at_its_own_pace():
    from editeval.bench.runner import remaining_seconds

    # a: 2 jobs done at 1 s and 3 s (mean 2), b: 1 job at 10 s; 1 a-job and 2 b-jobs left
    assert remaining_seconds({"a": [1.0, 3.0], "b": [10.0]}, {"a": 1, "b": 2}) == 22.0
    # a method not yet run is estimated at the mean of every finished job (14 / 3 s)
    assert remaining_seconds({"a": [1.0, 3.0], "b": [10.0]}, {"c": 3}) == pytest.approx(14.0)
    assert remaining_seconds({}, {"a": 5}) == 0.0


# --- writes that fail, and exit codes: the recording runner without a model --------------------

@pytest.fixture(scope="module")
def toy_split():
    """The editeval-toy split in the editeval cache (built on first use, before any test patches
    image writing)."""
    from editeval.toyworld.dataset import default_root, load_editeval_toy

    load_editeval_toy(default_root())
    return default_root()


@pytest.fixture
def stand_in_edit(monkeypatch):
    """`editeval bench` with no model loaded and SDEdit replaced by a stand-in that returns a grey
    64x64 edit at once (or raises the exception the returned dict holds for a sample id): the
    runner's recording is under test here, not editing."""
    from editeval.bench import execute
    from editeval.core.types import EditResult

    failing: dict[str, Exception] = {}

    def edit(request, method, *, pipe, inversion_cache):
        sample_id = f"{request.task}/{Path(request.image).stem}"
        if sample_id in failing:
            raise failing[sample_id]
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        return EditResult(image=image, model_image=image, method=method, model="tiny", nfe=1,
                          uncached_nfe=1, wall_seconds=0.0, params={}, seed=request.seed)

    monkeypatch.setattr(execute, "load_pipeline", lambda *args, **kwargs: object())
    monkeypatch.setattr(execute, "edit", edit)
    return failing


def toy_bench(toy_split: Path, out: Path, *extra: str):
    from typer.testing import CliRunner

    from editeval.cli import app

    return CliRunner().invoke(app, ["bench", "--dataset", "editeval-toy", "--data-dir",
                                    str(toy_split), "--methods", "sdedit", "--model", "tiny",
                                    "--tasks", "style_change", "--limit", "3", "--out", str(out),
                                    *extra])


def failing_image_writes(monkeypatch, code: int, calls: set[int] | None = None) -> list:
    """Make PIL's ``Image.save`` raise ``OSError(code)`` while writing (on the given 1-based calls,
    or on every call); returns the list of calls made."""
    made: list = []
    original = Image.Image.save

    def save(self, fp, *args, **kwargs):
        made.append(fp)
        if calls is None or len(made) in calls:
            raise OSError(code, os.strerror(code))
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    return made


def stored(out: Path) -> dict[str, tuple[str, str | None]]:
    with Run.open(out) as run:
        return {row.sample_id: (row.status, row.error) for row in run.rows()}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_disk_that_takes_no_more_stops_the_run_in_one_line(toy_split, stand_in_edit,
                                                             monkeypatch, tmp_path, code):
    out = tmp_path / "run"
    writes = failing_image_writes(monkeypatch, code)
    result = toy_bench(toy_split, out)
    assert not isinstance(result.exception, OSError), result.exception  # no traceback
    assert result.exit_code == 1 and "Traceback" not in result.output
    # the finished edit that could not be written is recorded as that job's failure, with the
    # path and the OS error; the run stopped there instead of failing the next two jobs alike
    image = out / "images" / "sdedit" / "style_change" / "1_seed0.png"
    assert stored(out) == {"style_change/1": (
        "failed", f"cannot write {image}: [Errno {code}] {os.strerror(code)}")}
    assert len(writes) == 1
    (line,) = [line for line in result.output.splitlines() if "stopped" in line]
    assert os.strerror(code) in line and "2 jobs not run" in line and "resume" in line
    assert not list(out.rglob(".tmp-*"))  # no temporary file left behind


def test_a_full_disk_during_an_edit_stops_the_run(toy_split, stand_in_edit, tmp_path):
    # an edit that writes (the run's inversion cache) and finds the disk full
    cached = tmp_path / "run" / "inversions" / "key.pt"
    stand_in_edit["style_change/1"] = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cached))
    result = toy_bench(toy_split, tmp_path / "run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert stored(tmp_path / "run") == {"style_change/1": (
        "failed", f"OSError: [Errno 28] No space left on device: '{cached}'")}
    (line,) = [line for line in result.output.splitlines() if "stopped" in line]
    assert "2 jobs not run" in line


def test_a_refused_image_write_fails_that_job_and_the_run_goes_on(toy_split, stand_in_edit,
                                                                  monkeypatch, tmp_path):
    out = tmp_path / "run"
    failing_image_writes(monkeypatch, errno.EACCES, calls={1})  # a per-file error: no stop
    result = toy_bench(toy_split, out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    image = out / "images" / "sdedit" / "style_change" / "1_seed0.png"
    assert stored(out) == {
        "style_change/1": ("failed", f"cannot write {image}: [Errno 13] Permission denied"),
        "style_change/2": ("done", None), "style_change/3": ("done", None)}
    assert "1 of 3 jobs failed" in result.output and "stopped" not in result.output


def test_a_store_that_cannot_be_written_stops_the_run_in_one_line(toy_split, stand_in_edit,
                                                                  monkeypatch, tmp_path):
    # SQLite reports a full disk as SQLITE_FULL ("database or disk is full"), not as an OSError
    class FullDisk(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("INSERT OR REPLACE INTO results"):
                err = sqlite3.OperationalError("database or disk is full")
                err.sqlite_errorcode = 13  # SQLITE_FULL
                raise err
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: connect(*a, factory=FullDisk, **k))
    out = tmp_path / "run"
    result = toy_bench(toy_split, out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.exception
    (line,) = [line for line in result.output.splitlines() if "stopped" in line]
    assert "database or disk is full" in line and str(out / "results.sqlite") in line
    assert "sdedit/style_change/1/seed0 is not recorded" in line and "2 jobs not run" in line
    assert stored(out) == {}


def test_a_store_on_a_read_only_disk_is_one_line(toy_split, stand_in_edit, monkeypatch, tmp_path):
    out = tmp_path / "run"
    assert toy_bench(toy_split, out).exit_code == 0

    # a run directory on a disk mounted read-only since: SQLite cannot make the WAL's -shm file
    class ReadOnlyDisk(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode"):
                err = sqlite3.OperationalError("unable to open database file")
                err.sqlite_errorcode = 14  # SQLITE_CANTOPEN
                raise err
            return super().execute(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect",
                        lambda *a, **k: connect(*a, factory=ReadOnlyDisk, **k))
    result = toy_bench(toy_split, out, "--limit", "4")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.exception
    assert result.output.strip() == ("error: [Errno 13] Permission denied (SQLite: unable to "
                                     f"open database file): '{out / 'results.sqlite'}'")


def test_bench_exits_non_zero_when_a_job_failed_in_this_call(toy_split, stand_in_edit, tmp_path):
    out = tmp_path / "run"
    stand_in_edit["style_change/2"] = ValueError("stand-in failure on style_change/2")
    first = toy_bench(toy_split, out)
    assert first.exit_code == 1 and "Traceback" not in first.output
    assert "1 of 3 jobs failed" in first.output
    error = "ValueError: stand-in failure on style_change/2"
    assert stored(out)["style_change/2"] == ("failed", error)
    # the failure is skipped on request: nothing failed in this call
    assert toy_bench(toy_split, out, "--skip-failed").exit_code == 0
    # retried and done now: this call has no failure, whatever earlier calls had
    stand_in_edit.clear()
    again = toy_bench(toy_split, out)
    assert again.exit_code == 0 and "jobs failed" not in again.output
    assert {status for status, _ in stored(out).values()} == {"done"}


def test_bench_out_that_is_a_file_is_one_line(toy_split, stand_in_edit, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for out in (taken, taken / "run"):
        result = toy_bench(toy_split, out)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.exception
        assert len(result.output.strip().splitlines()) == 1
        assert f"{taken} is a file, not a folder" in result.output
    assert taken.read_text() == "mine"
    model = tmp_path / "unet"  # a folder with a config.json that is not a run's
    model.mkdir()
    (model / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    result = toy_bench(toy_split, model)
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {model} is not a run directory (its config.json is not a run's: it names no "
        "dataset and model)")
    assert [p.name for p in model.iterdir()] == ["config.json"]
