"""The Ray executor on a local Ray instance with 2 CPUs (workers at one torch thread each; a worker
process pays ~5 s of imports and model loading, so the driver test uses one): the local executor's
rows and bit-identical images; a worker killed mid-job has its job retried; a job
that kills every worker it runs on is recorded as failed with the reason; a driver killed mid-run is
resumed by the same command, or by the local executor, with nothing lost or duplicated."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from editeval.bench import ExecutorError, run_bench
from editeval.cli import app
from editeval.core import registry
from editeval.run import Run, RunConfig
from test_bench import done_rows  # the recorded jobs of a run being killed

ray = pytest.importorskip("ray")

from editeval.bench.ray_executor import RayExecutor, _check_reachable

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> str:
    """A local Ray instance with 2 CPUs for the module's tests; its address.

    Its workers get the test methods of ``ray_faults.py`` as a user's workers get a plugin
    package's: a folder on their ``PYTHONPATH`` holds a ``*.dist-info`` that declares the module in
    the ``editeval.methods`` entry point group. Workers inherit the environment of the Ray instance,
    which is this process's when it starts it."""
    plugin = tmp_path_factory.mktemp("plugin")
    info = plugin / "editeval_ray_faults-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: editeval-ray-faults\n"
                                   "Version: 0.0\n")
    (info / "entry_points.txt").write_text("[editeval.methods]\nfaults = ray_faults\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(
            [str(plugin), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
        patch.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def fault_methods():
    """The test methods registered in this process too (the driver plans with their cards)."""
    registry.load_plugins()
    import ray_faults

    yield ray_faults
    for card in (ray_faults.KILL_ONCE, ray_faults.KILL_ALWAYS):
        registry._REGISTRY.pop(card.name, None)
    sys.modules.pop("ray_faults", None)


def stored(out: Path) -> dict[str, tuple]:
    """job id -> (status, NFE, uncached NFE, parameters, intermediates, error, image bytes)."""
    with Run.open(out, readonly=True) as run:
        return {row.job_id: (row.status, row.nfe, row.uncached_nfe, row.params,
                             row.intermediates, row.error,
                             run.image_path(row).read_bytes() if row.status == "done" else None)
                for row in run.rows()}


def files(out: Path) -> list[str]:
    """The run's image files (and any temporary file left behind)."""
    return sorted(str(p.relative_to(out)) for p in (out / "images").rglob("*") if p.is_file())


def test_ray_gives_the_local_executors_rows_and_images(ray_cluster, tmp_path):
    methods = ["sdedit", "instructpix2pix", "p2p"]  # two model kinds; p2p caches its inversions
    local = RunConfig(dataset="editeval-toy", methods=methods, model="toy", out=tmp_path / "local",
                      limit=3, params={name: {"num_inference_steps": 4} for name in methods})
    assert run_bench(local).done == 9
    executor = RayExecutor(workers=2)
    summary = run_bench(replace(local, out=tmp_path / "ray"), executor=executor)
    assert (summary.done, summary.failed) == (9, 0)
    ours, theirs = stored(tmp_path / "ray"), stored(tmp_path / "local")
    assert len(ours) == 9 and {row[0] for row in ours.values()} == {"done"}
    assert ours == theirs  # same rows, NFE and intermediates, byte-identical PNGs
    assert {row[1] for job, row in ours.items() if job.startswith("p2p/")} == {20}  # 4 + 4 * 4
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    # the workers kept the inversions in the run directory, one per sample, as the local run did
    inversions = sorted(p.name for p in (tmp_path / "ray" / "inversions").iterdir())
    assert len(inversions) == 3
    assert inversions == sorted(p.name for p in (tmp_path / "local" / "inversions").iterdir())
    # each model kind loaded once per worker at most, the instruction model by one worker only
    assert executor.loads["instruction"] == 1 and 1 <= executor.loads["text-to-image"] <= 2


def test_a_worker_killed_mid_job_has_its_job_retried(ray_cluster, fault_methods, tmp_path):
    marker = tmp_path / "killed"  # the first sigkill-once edit anywhere creates it, then dies
    sdedit = {"num_inference_steps": 2}
    config = RunConfig(dataset="editeval-toy", methods=["sigkill-once"], model="tiny",
                       out=tmp_path / "ray", limit=3,
                       params={"sigkill-once": {**sdedit, "marker": str(marker)}})
    summary = run_bench(config, executor=RayExecutor(workers=2))
    assert marker.exists()  # a worker died mid-job
    assert (summary.done, summary.failed) == (3, 0), summary.errors
    rows = stored(tmp_path / "ray")
    assert len(rows) == 3 and {row[0] for row in rows.values()} == {"done"}
    assert len(files(tmp_path / "ray")) == 3  # no duplicate, no temporary file
    # every edit, the retried one included, is SDEdit's own, as the local executor makes it
    reference = replace(config, methods=["sdedit"], params={"sdedit": sdedit},
                        out=tmp_path / "local")
    run_bench(reference)
    expected = {job.removeprefix("sdedit/"): row[-1]
                for job, row in stored(tmp_path / "local").items()}
    assert {job.removeprefix("sigkill-once/"): row[-1] for job, row in rows.items()} == expected


def test_a_job_that_kills_every_worker_fails_after_the_retries(ray_cluster, fault_methods,
                                                               tmp_path):
    config = RunConfig(dataset="editeval-toy", methods=["sdedit", "sigkill-always"],
                       model="tiny", out=tmp_path / "ray", limit=1,
                       params={"sdedit": {"num_inference_steps": 2}})
    summary = run_bench(config, executor=RayExecutor(workers=2, retries=1))
    assert (summary.done, summary.failed) == (1, 1)  # the run went on with the other job
    job = "sigkill-always/object_addition/1/seed0"
    assert summary.errors[job].startswith(
        "WorkerDied: the Ray worker running this job died 2 times (killed, out of memory or "
        "crashed; its log is in the Ray session's logs folder on its machine); last: Actor")
    rows = stored(tmp_path / "ray")
    assert rows[job][0] == "failed" and rows[job][-2] == summary.errors[job]
    assert rows["sdedit/object_addition/1/seed0"][0] == "done"


def test_a_method_the_workers_lack_stops_the_run_before_anything_is_written(
        ray_cluster, fault_methods, monkeypatch, tmp_path):
    card = replace(fault_methods.KILL_ALWAYS, name="driver-only")  # registered here only
    monkeypatch.setitem(registry._REGISTRY, card.name,
                        registry.RegisteredMethod(card, fault_methods.sigkill_always))
    config = RunConfig(dataset="editeval-toy", methods=["driver-only"], model="tiny",
                       out=tmp_path / "ray", limit=1)
    with pytest.raises(ExecutorError) as caught:
        run_bench(config, executor=RayExecutor(workers=1))
    assert str(caught.value) == (
        f"the Ray workers on {socket.gethostname()} lack driver-only: install the packages that "
        "provide these methods on every machine")
    assert not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_under_either_executor(ray_cluster, tmp_path):
    out = tmp_path / "run"
    options = ["--dataset", "editeval-toy", "--methods", "sdedit", "--model", "toy", "--limit",
               "6", "--set", "sdedit.num_inference_steps=30", "--out", str(out)]
    command = [sys.executable, "-m", "editeval.cli", "bench", *options, "--executor", "ray",
               "--ray-address", ray_cluster, "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while done_rows(out) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = done_rows(out)
    assert 1 <= killed_at < 6, f"the kill did not land mid-run ({killed_at} jobs done)"
    with sqlite3.connect(out / "results.sqlite") as db:
        before = set(db.execute("SELECT job_id, finished_at FROM results"))
    shutil.copytree(out, tmp_path / "copy")

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6 - killed_at} done and 0 failed now, {killed_at} finished before" in (
        resumed.stdout.replace("\n", " "))
    local = CliRunner().invoke(app, ["bench", *options[:-1], str(tmp_path / "copy")])
    assert local.exit_code == 0, local.output
    for run in (out, tmp_path / "copy"):
        rows = stored(run)
        assert len(rows) == 6 and {row[0] for row in rows.values()} == {"done"}
        assert len(files(run)) == 6  # 0 lost, 0 duplicated, no temporary file
        with sqlite3.connect(run / "results.sqlite") as db:  # what was done before: not redone
            assert before <= set(db.execute("SELECT job_id, finished_at FROM results"))
    assert ({job: row[-1] for job, row in stored(out).items()}
            == {job: row[-1] for job, row in stored(tmp_path / "copy").items()})


def test_executor_options_are_checked_before_anything_loads(monkeypatch, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["bench", "--out", str(out), "--workers", "2"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --ray-address and --workers need --executor ray"
    result = CliRunner().invoke(app, ["bench", "--out", str(out), "--executor", "dask"])
    assert (result.exit_code, result.output.strip()) == (
        2, "error: --executor 'dask': use local or ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = CliRunner().invoke(app, ["bench", "--out", str(out), "--executor", "ray"])
    assert (result.exit_code, result.output.strip()) == (
        2, "error: --executor ray needs Ray, which is not installed: pip install 'editeval[ray]'")
    assert not out.exists()


def test_an_unreachable_cluster_is_one_line():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ExecutorError) as caught:
        _check_reachable(f"127.0.0.1:{port}")
    assert str(caught.value) == (
        f"cannot reach the Ray cluster at 127.0.0.1:{port} (Connection refused); start its head "
        "with `ray start --head` and pass the address it prints, or leave --ray-address out to "
        "start a local Ray instance")
