"""The run directory as one object: intermediates and both NFE costs stored with every edit, the
plan's up-front input checks, method plugins, and the denoiser-agnostic NFE counter."""

from __future__ import annotations

import errno
import math
import os
import sqlite3
import sys
import textwrap
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from editeval.bench import PlanError, plan_run, run_bench
from editeval.cli import app
from editeval.core import registry
from editeval.core.nfe import count_nfe, denoiser
from editeval.core.registry import MethodCard, Paper, check_signature, register_method
from editeval.core.samples import TASKS
from editeval.core.types import MethodOutput
from editeval.run import NotARunError, Run, RunConfig
from editeval.run.intermediates import load_intermediates, store_intermediates

STEPS = 3  # inference steps of every method here: plumbing on the tiny model, not quality


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("toy")


def _bench(out, toy_dir, methods):
    params = {m: {"num_inference_steps": STEPS} for m in methods}
    config = RunConfig(dataset="editeval-toy", methods=methods, model="tiny", out=out,
                       data_dir=toy_dir, tasks=["object_replacement"], limit=1, params=params)
    summary = run_bench(config)
    assert summary.failed == 0, summary.errors
    with Run.open(out) as run:
        return {row.method: row for row in run.rows()}


def test_uncached_nfe_does_not_depend_on_the_run_order(toy_dir, tmp_path):
    # p2p and negative-prompt inversion share the DDIM inversion (STEPS NFE) through the run's
    # cache: whichever runs second spends STEPS fewer. The uncached NFE is each method's own cost
    # (inversion STEPS + 4 * STEPS for both branches with guidance) in either order; an
    # implementation that stored the spent NFE there would give 4 * STEPS to the second method.
    forward = _bench(tmp_path / "a", toy_dir, ["p2p", "negative-prompt-inversion"])
    backward = _bench(tmp_path / "b", toy_dir, ["negative-prompt-inversion", "p2p"])
    own = 5 * STEPS
    for rows in (forward, backward):
        assert {m: row.uncached_nfe for m, row in rows.items()} == {
            "p2p": own, "negative-prompt-inversion": own}
    assert (forward["p2p"].nfe, forward["negative-prompt-inversion"].nfe) == (own, own - STEPS)
    assert (backward["p2p"].nfe, backward["negative-prompt-inversion"].nfe) == (own - STEPS, own)
    assert forward["p2p"].intermediates["inversion_cached"] is False
    assert forward["negative-prompt-inversion"].intermediates["inversion_cached"] is True


def test_intermediates_are_stored_with_the_edit_and_read_back(toy_dir, tmp_path):
    rows = _bench(tmp_path / "run", toy_dir, ["p2p", "aidi"])
    p2p = rows["p2p"].intermediates  # JSON values, as the method returned them
    assert p2p["inversion"] == "ddim" and p2p["null_text_iterations"] == 0
    assert len(p2p["blend_words"]) == 2 and all(isinstance(w, list) for w in p2p["blend_words"])
    region = rows["aidi"].intermediates["edit_region"]  # a tensor: a file referenced from the row
    assert region["type"] == "tensor" and region["$file"].startswith(
        "intermediates/aidi/object_replacement/")
    with Run.open(tmp_path / "run") as run:
        loaded = run.intermediates(rows["aidi"])
    assert isinstance(loaded["edit_region"], torch.Tensor)
    assert list(loaded["edit_region"].shape) == region["shape"]
    assert loaded["inversion_cached"] is False


def test_intermediates_round_trip_every_kind(tmp_path):
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    array = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    mask = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8), "L")
    values = {"cached": True, "words": ("a", "b"), "nested": {"k": [1, 2.5]}, "latents": tensor,
              "map": array, "mask": mask, "nan": float("nan"), "object": object()}
    stored = store_intermediates(values, tmp_path, tmp_path.joinpath("x").relative_to(tmp_path))
    assert stored["words"] == ["a", "b"] and stored["nested"] == {"k": [1, 2.5]}
    assert stored["nan"]["$unstored"] == "float"  # JSON has no NaN: kept as its repr, not dropped
    assert stored["object"]["$unstored"] == "object"
    back = load_intermediates(stored, tmp_path)
    assert torch.equal(back["latents"], tensor)
    assert np.array_equal(back["map"], array) and back["map"].dtype == np.uint8
    assert np.array_equal(np.asarray(back["mask"]), np.asarray(mask)) and back["mask"].mode == "L"
    assert back["cached"] is True and back["words"] == ["a", "b"]
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic writes leave no temporary files


def test_an_older_store_gains_the_new_columns(tmp_path):
    # a results table as the first release wrote it: no uncached_nfe, intermediates or
    # backward_passes
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        db.execute("CREATE TABLE results (job_id TEXT PRIMARY KEY, method TEXT NOT NULL, "
                   "sample_id TEXT NOT NULL, task TEXT NOT NULL, seed INTEGER NOT NULL, "
                   "status TEXT NOT NULL, image_path TEXT, nfe INTEGER, wall_seconds REAL, "
                   "model TEXT, params TEXT, error TEXT, finished_at TEXT NOT NULL)")
        db.execute("INSERT INTO results VALUES ('m/t/1/seed0', 'm', 't/1', 't', 0, 'done', "
                   "'images/m/t/1_seed0.png', 50, 1.5, 'tiny', '{}', NULL, 'now')")
    (tmp_path / "config.json").write_text('{"dataset": "editeval-toy", "model": "tiny"}')
    with Run.open(tmp_path, readonly=True) as run:  # a reader sees it as it is, changing nothing
        before = _files(tmp_path)
        (row,) = run.rows()
        assert run.store.judgements() == [] and run.store.metric_values() == []
        assert _files(tmp_path) == before
    assert (row.nfe, row.uncached_nfe, row.intermediates, row.backward_passes) == (50, None, None,
                                                                                  None)
    with Run.open(tmp_path) as run:
        (row,) = run.rows()
    assert (row.nfe, row.uncached_nfe, row.intermediates, row.backward_passes) == (50, None, None,
                                                                                  None)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
    assert {"uncached_nfe", "intermediates", "backward_passes"} <= columns


# --- planning: inputs checked against the dataset before anything runs -----------------------

@pytest.fixture
def mask_method(monkeypatch):
    """A method that requires a mask, registered for this test only."""
    registry.load_plugins()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    card = MethodCard(
        name="test-needs-mask", title="needs a mask", paper=Paper("t", "v", 2024, "0000.00000"),
        strategy="training-free", subcategory=None, inputs=("mask",), model_kind="text-to-image",
        tasks=TASKS, defaults={"strength": 0.5}, nfe_formula="0")

    @register_method(card)
    def needs_mask(pipe, inputs, generator, *, strength):
        return MethodOutput(inputs.image)

    return card.name


def test_a_method_that_needs_a_mask_is_refused_on_a_dataset_without_masks(
        mask_method, editeval_v1_dir, toy_dir, tmp_path):
    config = RunConfig(dataset="editeval-v1", methods=["sdedit", "test-needs-mask"],
                       model="tiny", out=tmp_path / "v1", data_dir=editeval_v1_dir)
    with pytest.raises(PlanError, match=r"'test-needs-mask' needs mask, which 42 of the 42 "
                                        r"selected samples of 'editeval-v1' lack"):
        run_bench(config)
    assert not (tmp_path / "v1").exists()  # refused up front: nothing written
    # the toy world has a mask for every pair: the same method plans there
    toy = RunConfig(dataset="editeval-toy", methods=["test-needs-mask"], model="tiny",
                    out=tmp_path / "toy", data_dir=toy_dir)
    with Run.for_config(toy) as run:
        assert len(plan_run(toy, run).pending) == 210


def test_commands_refuse_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(NotARunError):
        Run.open(tmp_path)
    for command in (["score", str(tmp_path)], ["leaderboard", str(tmp_path)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2
        assert "is not a run directory" in result.output and "Traceback" not in result.output


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("config", [
    '{"_class_name": "UNet2DConditionModel", "sample_size": 64}',  # a diffusers model folder
    "not json at all",
    "[1, 2]",
])
def test_reading_commands_create_nothing_in_a_folder_that_is_not_a_run(tmp_path, config):
    (tmp_path / "config.json").write_text(config)
    before = _files(tmp_path)
    for command in (["leaderboard", str(tmp_path)], ["score", str(tmp_path)],
                    ["leaderboard", str(tmp_path / "absent")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.exception
        assert "is not a run directory" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert _files(tmp_path) == before  # no results.sqlite, no folder, nothing changed
    assert not (tmp_path / "absent").exists()


def test_leaderboard_of_a_file_is_one_line(tmp_path):
    taken = tmp_path / "results.csv"
    taken.write_text("a,b\n")
    result = CliRunner().invoke(app, ["leaderboard", str(taken)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == (f"error: {taken} is a file, not a run directory; pass the "
                                     "folder `editeval bench` made")
    assert taken.read_text() == "a,b\n"


def test_a_store_on_a_read_only_disk_reads(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"dataset": "editeval-toy", "model": "tiny"}')
    with Run.open(tmp_path) as run:
        run.store.record_failed(job_id="m/t/1/seed0", method="m", sample_id="t/1", task="t",
                                seed=0, error="boom")

    # a WAL store on a read-only disk: a read-only connection cannot make the -shm file
    class NoSharedMemory(sqlite3.Connection):
        def execute(self, sql, *args):
            err = sqlite3.OperationalError("unable to open database file")
            err.sqlite_errorcode = 14  # SQLITE_CANTOPEN
            raise err

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda database, *a, **k: connect(
        database, *a, **k, **({"factory": NoSharedMemory} if "mode=ro" in str(database) else {})))
    with Run.open(tmp_path, readonly=True) as run:
        assert [(row.job_id, row.error) for row in run.rows()] == [("m/t/1/seed0", "boom")]


def test_leaderboard_of_a_run_without_results_creates_nothing(tmp_path):
    # a run killed before its first job was recorded holds config.json only
    (tmp_path / "config.json").write_text('{"dataset": "editeval-toy", "model": "tiny"}')
    result = CliRunner().invoke(app, ["leaderboard", str(tmp_path)])
    assert result.exit_code == 2 and "holds no results yet" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


# --- the registry: parameters declared once, methods from entry points ------------------------

def _card(name, **defaults):
    return MethodCard(name=name, title=name, paper=Paper("t", "v", 2024, "0000.00000"),
                      strategy="training-free", subcategory=None, inputs=(),
                      model_kind="text-to-image", tasks=TASKS, defaults=defaults, nfe_formula="0")


def test_a_function_whose_parameters_differ_from_its_card_is_refused():
    def extra(pipe, inputs, generator, *, strength, steps):
        pass

    def own_default(pipe, inputs, generator, *, strength=0.3):
        pass

    def missing(pipe, inputs, generator, *, strength):
        pass

    def passes_on(pipe, inputs, generator, *, strength, **params):
        pass

    with pytest.raises(ValueError, match="takes steps, which the card's defaults lack"):
        check_signature(_card("a", strength=0.5), extra)
    with pytest.raises(ValueError, match="gives strength a default of its own"):
        check_signature(_card("b", strength=0.5), own_default)
    with pytest.raises(ValueError, match="does not take guidance_scale"):
        check_signature(_card("c", strength=0.5, guidance_scale=7.5), missing)
    check_signature(_card("d", strength=0.5, guidance_scale=7.5), passes_on)


def test_every_built_in_method_comes_through_the_entry_point_group():
    points = {p.value for p in registry.entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert "editeval.methods" in points
    assert {"sdedit", "instructpix2pix", "p2p"} <= {card.name for card in registry.list_methods()}


def test_a_third_party_plugin_registers_and_a_broken_one_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "plugin_ok.py").write_text(textwrap.dedent("""
        from editeval.core import MethodCard, MethodOutput, Paper, register_method
        from editeval.core.samples import TASKS

        CARD = MethodCard(name="plugin-copy", title="copy", paper=Paper("t", "v", 2024, "1"),
                          strategy="training-free", subcategory=None, inputs=(),
                          model_kind="text-to-image", tasks=TASKS, defaults={}, nfe_formula="0")

        @register_method(CARD)
        def copy(pipe, inputs, generator):
            return MethodOutput(inputs.image)
    """))
    (tmp_path / "plugin_broken.py").write_text("raise ImportError('needs a library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [EntryPoint("ok", "plugin_ok", registry.ENTRY_POINT_GROUP),
              EntryPoint("broken", "plugin_broken", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: points)
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.warns(UserWarning, match=r"plugin 'broken' \(plugin_broken\) failed to import"):
        card = registry.get_method("plugin-copy").card
    assert card.title == "copy"
    sys.modules.pop("plugin_ok", None)


# --- NFE at any denoiser ---------------------------------------------------------------------

class _Transformer(torch.nn.Module):
    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None):
        return hidden_states


def test_nfe_is_counted_at_a_transformer_denoiser():
    class Pipe:  # a transformer-based pipeline has no unet
        transformer = _Transformer()

    module = denoiser(Pipe())
    with count_nfe(module) as counter:
        module(hidden_states=torch.zeros(2, 4, 8, 8), timestep=1)  # a CFG batch of 2
        module(torch.zeros(1, 4, 8, 8))
    assert (counter.nfe, counter.calls) == (3, 2)
    with pytest.raises(TypeError, match="neither a unet nor a transformer"):
        denoiser(object())
    assert math.isclose(counter.uncached, 3)


# --- files follow the user's umask -----------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_file_of_a_run_follows_the_umask(tmp_path, umask, mode):
    from editeval.core.files import atomic_write
    from editeval.diffusion.inversion_cache import InversionCache

    previous = os.umask(umask)
    try:
        config = RunConfig(dataset="editeval-toy", methods=["sdedit"], model="tiny",
                           out=tmp_path / "run")
        with Run.for_config(config) as run:
            run.save_config()
            image = Image.new("RGB", (8, 8), (10, 20, 30))
            run.store.record_done(
                job_id="sdedit/style_change/1/seed0", method="sdedit",
                sample_id="style_change/1", task="style_change", seed=0, image=image, nfe=1,
                uncached_nfe=1, wall_seconds=0.1, model="tiny", params={},
                intermediates={"latents": torch.zeros(2), "map": np.zeros(2), "mask": image})
            _, hit = run.inversion_cache.get_or_compute("k" * 64, lambda: {"z": torch.ones(3)})
            assert not hit
            atomic_write(run.path / "plain.bin", lambda handle: handle.write(b"x"))
            modes = {str(p.relative_to(run.path)): oct(p.stat().st_mode & 0o777)
                     for p in run.path.rglob("*") if p.is_file()}
    finally:
        os.umask(previous)
    assert {"config.json", "results.sqlite", "images/sdedit/style_change/1_seed0.png",
            "intermediates/sdedit/style_change/1_seed0/latents.pt",
            "intermediates/sdedit/style_change/1_seed0/map.npy",
            "intermediates/sdedit/style_change/1_seed0/mask.png",
            f"inversions/{'k' * 64}.pt", "plain.bin"} <= set(modes)
    assert set(modes.values()) == {oct(mode)}, modes
    assert InversionCache(tmp_path / "run" / "inversions").get_or_compute(
        "k" * 64, lambda: {"z": torch.zeros(3)})[1]  # the cached file reads back


def test_a_failed_atomic_write_names_the_file_and_leaves_nothing(tmp_path):
    from editeval.core.files import atomic_write

    def full(handle):
        handle.write(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "a.png"
    with pytest.raises(OSError) as raised:
        atomic_write(target, full)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []
