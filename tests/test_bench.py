"""The bench runner on real EditEval v1 images with the tiny suite: resume after SIGKILL, failures."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from editeval.bench import run_bench
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
    summary = run_bench(config)
    assert (summary.done, summary.failed) == (3, 0)
    with Run.open(config.out) as run:
        sizes = {Image.open(run.image_path(row)).size for row in run.rows()}
    assert sizes == {(64, 64)}


def test_eta_counts_each_method_at_its_own_pace():
    from editeval.bench.runner import remaining_seconds

    # a: 2 jobs done at 1 s and 3 s (mean 2), b: 1 job at 10 s; 1 a-job and 2 b-jobs left
    assert remaining_seconds({"a": [1.0, 3.0], "b": [10.0]}, {"a": 1, "b": 2}) == 22.0
    # a method not yet run is estimated at the mean of every finished job (14 / 3 s)
    assert remaining_seconds({"a": [1.0, 3.0], "b": [10.0]}, {"c": 3}) == pytest.approx(14.0)
    assert remaining_seconds({}, {"a": 5}) == 0.0
