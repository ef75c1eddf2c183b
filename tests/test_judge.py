"""LMM Score against a real scripted HTTP server on 127.0.0.1, and with the toy oracle."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from judge_server import (
    EMPTY_BODY,
    NO_CHOICES,
    NOT_JSON,
    JudgeServer,
    chat,
    closed_port_url,
    images_of,
    rate_limited,
    scores_json,
    stalled,
)
from PIL import Image
from typer.testing import CliRunner

from editeval import cli
from editeval.cli import app
from editeval.core.samples import Sample
from editeval.data import load_dataset, load_image
from editeval.run import Run, RunConfig
from editeval.judge import (
    OpenAICompatibleBackend,
    Protocol,
    leaderboard,
    make_backend,
    overall,
    parse_scores,
    score_run,
    to_markdown,
)
from editeval.judge.backends import JudgeRequest
from editeval.judge.parsing import ParseFailure

FOX = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lmm_example"
# the survey's published sub-scores (acc, pre, qua, real) and S_all for the fox example
PUBLISHED = {
    "6_SINE.png": ((6, 7, 5, 6), 6.1),
    "6_proxedit.png": ((6, 8, 7, 6), 6.8),
    "6_null_text.png": ((8, 9, 9, 8), 8.5),
    "6_LEDITS_PLUSPLUS.png": ((7, 7, 7, 7), 7.0),
    "6_InstructionPix2Pix.png": ((6, 10, 7, 6), 7.4),
    "6_edict.png": ((1, 2, 1, 1), 1.3),
    "6_DDS.png": ((7, 8, 7, 6), 7.2),
    "6_AIDI.png": ((9, 9, 6, 7), 8.2),
}


def _thumb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BOX), dtype=float)


def test_fox_replay_gives_the_published_scores():
    if not FOX.is_dir():
        pytest.skip(f"the LMM Score example is not at {FOX}")
    references = {name: _thumb(load_image(FOX / name)) for name in PUBLISHED}

    def reply(body, call):
        rows = []
        for image in images_of(body):
            name = min(references, key=lambda n: np.mean((references[n] - _thumb(image)) ** 2))
            rows.append(PUBLISHED[name][0])
        return 200, {}, chat(scores_json(rows)), 0.0

    order = list(PUBLISHED)
    random.Random(3).shuffle(order)
    sample = Sample("background_change/6", "background_change", FOX / "6_src.jpg", "", "",
                    "Change the snowland to a beach.")
    with JudgeServer(reply) as server:
        backend = OpenAICompatibleBackend("fake-gpt", server.url)
        answer = asyncio.run(backend.judge(JudgeRequest(sample, [FOX / n for n in order]),
                                           Protocol()))
    assert answer.status == "ok"
    assert [overall(s.as_dict()) for s in answer.scores] == [PUBLISHED[n][1] for n in order]
    by_name = dict(zip(order, (overall(s.as_dict()) for s in answer.scores)))
    assert [by_name[n] for n in PUBLISHED] == [6.1, 6.8, 8.5, 7.0, 7.4, 1.3, 7.2, 8.2]
    sent = images_of(server.bodies[0])
    assert len(sent) == 8 and all(image.mode == "RGB" for image in sent)
    assert max(max(image.size) for image in sent) <= 512
    assert "Change the snowland to a beach." in server.bodies[0]["messages"][-1]["content"][-1]["text"]


@pytest.mark.parametrize("text, reason", [
    (scores_json([(5, 5, 5, 5)]), "no scores for image(s) [2]"),
    (scores_json([(11, 5, 5, 5), (5, 5, 5, 5)]), "accuracy is 11"),
    ("The second image is clearly better, I would give it an 8.", "no JSON object"),
    ('{"scores": [{"image": 1, "accuracy": 7, "preservation": 8', "no JSON object"),
    (scores_json([(7, 5, 5, 5), (7, 5, 5, 5)]).replace('"accuracy": 7,', '"accuracy": 7.5,', 1),
     "7.5"),
])
def test_malformed_answers_are_failures_not_scores(text, reason):
    with pytest.raises(ParseFailure, match=re.escape(reason)) as info:
        parse_scores(text, 2)
    assert info.value.raw == text


def test_lenient_only_where_unambiguous():
    text = 'Here: {"scores": [{"image": 2, "S_acc": "9", "S_pre": 8.0, "S_qua": 7, "S_real": 6},' \
           ' {"Image": 1, "accuracy": 1, "preservation": 2, "quality": 3, "realism": 4}]}'
    first, second = parse_scores(text, 2)
    assert first.as_dict() == {"accuracy": 1, "preservation": 2, "quality": 3, "realism": 4}
    assert second.as_dict() == {"accuracy": 9, "preservation": 8, "quality": 7, "realism": 6}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("toy")
    load_dataset("editeval-toy", directory)
    return directory


@pytest.fixture
def toy_run(toy_dir, tmp_path) -> Path:
    """A run directory with two fake methods on 3 toy samples: `alpha` returns the ground-truth
    target (a perfect edit), `beta` the unchanged source."""
    samples = load_dataset("editeval-toy", toy_dir).select(["texture_change"], limit=3)
    with Run.for_config(RunConfig(dataset="editeval-toy", methods=["alpha", "beta"],
                                  model="fake", out=tmp_path / "run", data_dir=toy_dir)) as run:
        run.save_config()
        for method, attribute in (("alpha", "target_image_path"), ("beta", "image_path")):
            for sample in samples:
                run.store.record_done(job_id=f"{method}/{sample.id}/seed0", method=method,
                                      sample_id=sample.id, task=sample.task, seed=0,
                                      image=Image.open(getattr(sample, attribute)), nfe=0,
                                      uncached_nfe=0, wall_seconds=0.0, model="fake", params={})
    return run.path


def _valid(body, call):
    return 200, {}, chat(scores_json([(5 + i % 5, 6, 7, 8) for i in range(len(images_of(body)))])), 0.0


def test_retry_after_429_then_success(toy_run):
    def reply(body, call):
        if call == 0:
            return 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}, 0.0
        return _valid(body, call)

    with JudgeServer(reply) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url)
        start = time.monotonic()
        summary = score_run(Run.open(toy_run), backend, Protocol(mode="per-image"), concurrency=1)
        elapsed = time.monotonic() - start
    assert dict(summary.statuses) == {"ok": 6}
    assert len(server.bodies) == 7 and summary.requests == 7
    assert elapsed >= 1.0  # waited as the server asked


def test_timeout_then_success(toy_run):
    # the first request stalls far beyond the client's timeout (2 s, which a prompt answer meets
    # on a loaded machine too), but only until the client has given up and retried, so that the
    # test takes the timeout, not the stall
    retried = threading.Event()

    def reply(body, call):
        if call == 0:
            retried.wait(60)
        else:
            retried.set()
        return _valid(body, call)

    with JudgeServer(reply) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url, timeout=2.0)
        backend.backoff = 0.01
        summary = score_run(Run.open(toy_run), backend, Protocol(), concurrency=1)
    assert dict(summary.statuses) == {"ok": 6}  # comparative: 3 requests of 2 images
    assert len(server.bodies) == 4


def test_failures_and_refusals_are_recorded_with_raw_text(toy_run):
    answers = ["prose only, no scores", scores_json([(11, 1, 1, 1)])]

    def reply(body, call):
        if call < 2:
            return 200, {}, chat(answers[call]), 0.0
        if call == 2:
            return 400, {}, {"error": {"code": "content_filter",
                                       "message": "The prompt was filtered."}}, 0.0
        return _valid(body, call)

    with JudgeServer(reply) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url)
        summary = score_run(Run.open(toy_run), backend, Protocol(mode="per-image"), concurrency=1)
    assert dict(summary.statuses) == {"parse_failed": 2, "refused": 1, "ok": 3}
    with Run.open(toy_run) as run:
        store = run.store
        rows = store.judgements()
    failed = [r for r in rows if r["status"] == "parse_failed"]
    assert {r["raw"] for r in failed} == set(answers)
    assert all(r["s_all"] is None and r["accuracy"] is None for r in failed)
    refused = [r for r in rows if r["status"] == "refused"]
    assert refused[0]["message"] == "The prompt was filtered."
    table, _ = leaderboard(Run.open(toy_run))
    assert table["failures"].sum() == 3 and table["items"].sum() == 6
    assert table["parse_failures"].sum() == 2 and table["refusals"].sum() == 1
    assert table["transport_errors"].sum() == 0


def test_leaderboard_reports_failures_by_kind(toy_run):
    """A transport error is never counted as a parse failure."""
    def reply(body, call):
        if call == 0:
            return 200, {}, chat("prose only"), 0.0
        if call == 1:
            return 400, {}, {"error": {"code": "content_filter", "message": "filtered"}}, 0.0
        if call == 2:
            return 503, {}, {"error": {"message": "overloaded"}}, 0.0
        return _valid(body, call)

    with JudgeServer(reply) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url,
                               retry_total=0.0)
        summary = score_run(Run.open(toy_run), backend, Protocol(mode="per-image"), concurrency=1)
    assert dict(summary.statuses) == {"parse_failed": 1, "refused": 1, "error": 1, "ok": 3}
    assert summary.describe() == "3 ok, 1 parse failure, 1 refusal, 1 transport error"
    table, identity = leaderboard(Run.open(toy_run))
    kinds = ["parse_failures", "refusals", "transport_errors", "failures", "items"]
    assert table[kinds].sum().tolist() == [1, 1, 1, 3, 6]
    assert (table["failures"] == table[kinds[:3]].sum(axis=1)).all()
    markdown = to_markdown(table, identity)
    assert "| Method | Parse failures | Refusals | Transport errors |" in markdown
    assert "Parse failures per method" not in markdown
    for row in table.itertuples():  # which method met which reply depends on the request order
        rates = [f"{count / 3:.1%} ({count}/3)"
                 for count in (row.parse_failures, row.refusals, row.transport_errors)]
        assert f"| {row.method} | {' | '.join(rates)} |" in markdown
    assert "33.3% (1/3)" in markdown


def _judged(run: Path) -> int:
    try:
        with sqlite3.connect(run / "results.sqlite") as db:
            return db.execute("SELECT COUNT(*) FROM judge_scores").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_crash_half_way_then_resume_sends_nothing_twice(toy_run):
    killed = threading.Event()

    def reply(body, call):
        if call >= 2:  # the first run's third request hangs until that run is killed mid-request
            killed.wait(60)
        return _valid(body, call)

    with JudgeServer(reply) as server:
        command = [sys.executable, "-m", "editeval.cli", "score", str(toy_run), "--judge",
                   "openai:fake", "--base-url", server.url, "--mode", "per-image",
                   "--concurrency", "1"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _judged(toy_run) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed.set()
        judged = _judged(toy_run)
        cached = len(list((toy_run / "judge_cache").rglob("*.json")))
        assert 2 <= judged < 6
        sent_before = len(server.bodies)
        resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert len(server.bodies) - sent_before == 6 - cached  # finished items: no new request
        assert _judged(toy_run) == 6
        again = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert len(server.bodies) - sent_before == 6 - cached
        assert "0 requests sent" in again.stderr


def test_api_key_is_sent_but_never_stored(toy_run, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with JudgeServer(_valid) as server:
        score_run(Run.open(toy_run), make_backend("openai:fake", Run.open(toy_run), base_url=server.url), Protocol())
    assert all(h["Authorization"] == f"Bearer {secret}" for h in server.headers)
    for path in toy_run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_rescoring_hits_the_cache(toy_run):
    with JudgeServer(_valid) as server:
        first = score_run(Run.open(toy_run), make_backend("openai:fake", Run.open(toy_run), base_url=server.url),
                          Protocol())
        with sqlite3.connect(toy_run / "results.sqlite") as db:  # lose the scores, keep the cache
            db.execute("DELETE FROM judge_scores")
        second = score_run(Run.open(toy_run), make_backend("openai:fake", Run.open(toy_run), base_url=server.url),
                           Protocol())
    assert first.requests == 3 and second.requests == 0 and len(server.bodies) == 3
    assert dict(second.statuses) == {"ok": 6}


def test_repeats_report_their_spread(toy_run):
    def reply(body, call):
        n = len(images_of(body))
        value = 4 + 2 * (body["seed"] % 2)  # seed 0 -> 4, seed 1 -> 6
        return 200, {}, chat(scores_json([(value, value, value, value)] * n)), 0.0

    with JudgeServer(reply) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url, temperature=0.7)
        summary = score_run(Run.open(toy_run), backend, Protocol(), repeats=2)
    assert summary.requests == 6
    assert {b["temperature"] for b in server.bodies} == {0.7}
    assert {b["seed"] for b in server.bodies} == {0, 1}
    table, identity = leaderboard(Run.open(toy_run))
    assert list(table["mean"]) == [5.0, 5.0]
    assert list(table["repeat_spread"]) == [1.0, 1.0]  # population std of (4, 6)
    assert "| alpha | 0.0% (0/6) | 0.0% (0/6) | 0.0% (0/6) |" in to_markdown(table, identity)


def test_oracle_judge_and_leaderboard(toy_run, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(toy_run), "--judge", "oracle"])
    assert result.exit_code == 0, result.output
    assert "| 1 | alpha | 10.00 | 0.00 | 3 | 0/3 |" in result.output
    assert "computed by the oracle from ground truth (no model requests)" in result.output
    assert "edits judged now: 6 ok" in result.output
    assert "Parse failures" not in result.output  # the oracle parses no reply
    table, identity = leaderboard(Run.open(toy_run))
    assert identity["judge"] == "oracle"
    assert list(table["method"]) == ["alpha", "beta"] and table["mean"][0] == 10.0
    assert table["mean"][1] < 10.0
    out = tmp_path / "board.csv"
    csv = runner.invoke(app, ["leaderboard", str(toy_run), "--format", "csv", "-o", str(out)])
    assert csv.exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == ("task,rank,method,mean,std,n,failures,items,failure_rate,parse_failures,"
                        "refusals,transport_errors,repeat_spread")
    assert lines[1].startswith("texture_change,1,alpha,10.0,0.0,3,0,3,0.0,0,0,0,")
    monkeypatch.setattr(cli.console, "width", 40)  # a narrow terminal, or a pipe (80 columns)
    for fmt in ("csv", "md"):  # printed, lines stay whole: a piped CSV must parse
        saved = tmp_path / f"board.{fmt}"
        runner.invoke(app, ["leaderboard", str(toy_run), "--format", fmt, "-o", str(saved)])
        printed = runner.invoke(app, ["leaderboard", str(toy_run), "--format", fmt])
        assert printed.output == saved.read_text()


def test_a_judge_that_scored_nothing_is_not_a_choice_to_make(toy_run):
    """An unreachable server leaves only transport errors behind: the leaderboard without
    --judge still shows the one judge that scored (before: 'pick one judge with --judge')."""
    assert CliRunner().invoke(app, ["score", str(toy_run), "--judge", "oracle"]).exit_code == 0
    with Run.open(toy_run) as run:
        run.store.record_judgement(
            job_id="alpha/texture_change/1/seed0", judge="openai:gpt-4o@https://api.openai.com/v1",
            protocol_version="editeval-lmm-1", mode="comparative", repeat=0, status="error",
            scores=None, s_all=None, position=0, group_size=2, raw="",
            message="ConnectError: Name or service not known", cache_key=None)
        _, identity = leaderboard(run)
    assert identity["judge"] == "oracle"
    printed = CliRunner().invoke(app, ["leaderboard", str(toy_run)])
    assert printed.exit_code == 0 and "| 1 | alpha | 10.00 |" in printed.output


def test_score_on_a_full_disk_is_one_line(toy_run, monkeypatch):
    import errno

    from editeval.run.store import ResultStore

    def full(self, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(toy_run / "results.sqlite"))

    monkeypatch.setattr(ResultStore, "record_judgement", full)
    result = CliRunner().invoke(app, ["score", str(toy_run), "--judge", "oracle"])
    # before: the OSError escaped the command as a traceback (CliRunner keeps it as .exception)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "error: [Errno 28] No space left on device" in result.output


def test_custom_template(tmp_path):
    template = tmp_path / "mine.txt"
    template.write_text("Judge the {task} edit '{instruction}' over {n_images} images.")
    protocol = Protocol.from_file(template)
    assert protocol.version.startswith("custom-") and len(protocol.version) == 19
    assert protocol.prompt("style_change", "make it night", 3).startswith(
        "Judge the style change edit 'make it night' over 3 images.")
    template.write_text("Judge {nonsense}")
    with pytest.raises(ValueError, match="nonsense"):
        Protocol.from_file(template)


def test_unknown_judge_is_explained(tmp_path):
    with pytest.raises(ValueError, match="openai:MODEL"):
        make_backend("gpt-4o", Run(tmp_path, {}))


def test_images_are_png_data_urls(tmp_path):
    rgba = Image.new("RGBA", (1200, 600), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    from editeval.judge.backends import encode_image

    url = encode_image(tmp_path / "clear.png", 512)
    import base64

    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert url.startswith("data:image/png;base64,")
    assert decoded.size == (512, 256) and decoded.mode == "RGB"
    assert decoded.getpixel((10, 10)) == (255, 255, 255)  # transparent -> white
    assert json.dumps(url)  # plain ASCII


def test_local_vlm_backend_plumbing(toy_run, monkeypatch):
    """A tiny random LLaVA model through AutoModelForImageTextToText: the request reaches the
    model with all images, random text is a recorded parse failure, the answer is cached."""
    from editeval.judge.backends import LocalVLMBackend
    from editeval.models.tiny import tiny_checkpoint

    backend = make_backend(f"local:{tiny_checkpoint('vlm')}", Run.open(toy_run))
    assert isinstance(backend, LocalVLMBackend)
    backend.max_new_tokens = 8
    calls = []
    generate = LocalVLMBackend._generate

    def counting(self, messages, images, repeat):
        calls.append(len(images))
        return generate(self, messages, images, repeat)

    monkeypatch.setattr(LocalVLMBackend, "_generate", counting)
    summary = score_run(Run.open(toy_run), backend, Protocol())
    assert calls == [3, 3, 3]  # source + 2 edits per comparative request
    assert dict(summary.statuses) == {"parse_failed": 6}
    with Run.open(toy_run) as run:
        store = run.store
        rows = store.judgements()
    assert all(r["raw"] and r["s_all"] is None for r in rows)
    with sqlite3.connect(toy_run / "results.sqlite") as db:
        db.execute("DELETE FROM judge_scores")
    again = make_backend(f"local:{tiny_checkpoint('vlm')}", Run.open(toy_run))
    again.max_new_tokens = 8
    score_run(Run.open(toy_run), again, Protocol())
    assert calls == [3, 3, 3]  # all from the cache


# --- replies that are not answers, unreachable servers, credentials, back-off, ties ------------

def _stored(run_dir: Path) -> list[dict]:
    with Run.open(run_dir) as run:
        return run.store.judgements()


def test_replies_that_are_not_chat_completions_are_recorded_errors_never_cached(toy_run):
    bad = {0: NO_CHOICES, 1: EMPTY_BODY, 2: NOT_JSON}

    def reply(body, call):
        return bad[call] if call in bad else _valid(body, call)

    with JudgeServer(reply) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url)
        summary = score_run(Run.open(toy_run), backend, Protocol(mode="per-image"), concurrency=3)
        assert dict(summary.statuses) == {"error": 3, "ok": 3}  # the rest of the run went on
        rows = _stored(toy_run)
        errors = {r["raw"]: r["message"] for r in rows if r["status"] == "error"}
        assert set(errors) == {json.dumps(NO_CHOICES[2]), "", NOT_JSON[2].decode()}
        assert "not a chat completion" in errors[json.dumps(NO_CHOICES[2])]
        assert errors[""] == f"HTTP 200 from {server.url}/chat/completions with an empty body"
        assert errors[NOT_JSON[2].decode()] == (
            f"HTTP 200 from {server.url}/chat/completions with a body that is not JSON")
        assert len(list((toy_run / "judge_cache").rglob("*.json"))) == 3  # the answers only
        again = score_run(Run.open(toy_run), make_backend("openai:fake", Run.open(toy_run),
                                                          base_url=server.url),
                          Protocol(mode="per-image"))
    assert again.requests == 3 and dict(again.statuses) == {"ok": 3}  # retried on the rerun
    assert {r["status"] for r in _stored(toy_run)} == {"ok"}


def test_a_cached_reply_that_is_not_a_chat_completion_is_asked_again(toy_run):
    with JudgeServer(_valid) as server:
        score_run(Run.open(toy_run), make_backend("openai:fake", Run.open(toy_run),
                                                  base_url=server.url), Protocol())
        for path in (toy_run / "judge_cache").rglob("*.json"):  # as an older editeval wrote them
            entry = json.loads(path.read_text())
            entry["response"]["body"] = NO_CHOICES[2]
            path.write_text(json.dumps(entry))
        with sqlite3.connect(toy_run / "results.sqlite") as db:
            db.execute("DELETE FROM judge_scores")
        again = score_run(Run.open(toy_run), make_backend("openai:fake", Run.open(toy_run),
                                                          base_url=server.url), Protocol())
    assert again.requests == 3 and dict(again.statuses) == {"ok": 6}


def test_unreachable_server_stops_the_run_in_one_line(toy_run):
    url = closed_port_url()
    secret_url = url.replace("http://", "http://user:hunter2@") + "?api_key=sk-leak&x=1"
    start = time.monotonic()
    result = CliRunner().invoke(app, ["score", str(toy_run), "--judge", "openai:fake",
                                      "--base-url", secret_url, "--mode", "per-image"])
    elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    assert elapsed < 15
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach the judge at {url}?x=1: ConnectError: ")
    assert "Connection refused" in lines[0]
    assert "4 transport errors" in lines[0] and "2 edits not judged" in lines[0]
    assert "hunter2" not in result.output and "sk-leak" not in result.output
    rows = _stored(toy_run)  # the four requests in flight are recorded, as transport errors
    assert len(rows) == 4 and {r["status"] for r in rows} == {"error"}
    assert all("ConnectError" in r["message"] for r in rows)
    for path in toy_run.rglob("*"):
        if path.is_file():
            assert b"hunter2" not in path.read_bytes() and b"sk-leak" not in path.read_bytes()


def test_credentials_in_the_base_url_are_used_but_never_stored_or_printed(toy_run):
    with JudgeServer(_valid) as server:
        url = server.url.replace("http://", "http://user:hunter2@") + "?api_key=sk-leak&api-version=1"
        for model in ("fake", "other"):
            backend = make_backend(f"openai:{model}", Run.open(toy_run), base_url=url)
            score_run(Run.open(toy_run), backend, Protocol())
    assert backend.name == f"openai:other@{server.url}?api-version=1"
    assert server.paths[0] == "/v1/chat/completions?api_key=sk-leak&api-version=1"
    assert server.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"user:hunter2").decode()
    for path in toy_run.rglob("*"):
        if path.is_file():
            assert b"hunter2" not in path.read_bytes() and b"sk-leak" not in path.read_bytes()
    _, identity = leaderboard(Run.open(toy_run), "openai:fake")  # picked by its model
    assert identity["judge"] == f"openai:fake@{server.url}?api-version=1"
    runner = CliRunner()
    picked = runner.invoke(app, ["leaderboard", str(toy_run), "--judge", "openai:other"])
    assert picked.exit_code == 0 and f"`openai:other@{server.url}?api-version=1`" in picked.output
    missing = runner.invoke(app, ["leaderboard", str(toy_run), "--judge", "openai:gpt-4o"])
    assert missing.exit_code == 2
    assert missing.output.count("\n") == 1 and "openai:gpt-4o" in missing.output
    assert f"openai:fake@{server.url}?api-version=1" in missing.output
    assert f"openai:other@{server.url}?api-version=1" in missing.output


def test_a_minute_long_rate_limit_is_waited_out(toy_run):
    """Retry-After is honoured for as long as the retry total allows (here: ten 429s of 0.1 s;
    a minute of Retry-After: 1 with the default total)."""
    def reply(body, call):
        return rate_limited("0.1") if call < 10 else _valid(body, call)

    with JudgeServer(reply) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url,
                               retry_total=30.0)
        start = time.monotonic()
        summary = score_run(Run.open(toy_run), backend, Protocol(), concurrency=1)
    assert dict(summary.statuses) == {"ok": 6} and len(server.bodies) == 13
    assert time.monotonic() - start >= 1.0
    assert backend.retry_total == 30.0 and make_backend(
        "openai:fake", Run.open(toy_run)).retry_total >= 120  # the default survives a minute


def test_back_off_gives_up_after_the_retry_total(toy_run):
    with JudgeServer(lambda body, call: rate_limited("0.2")) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url,
                               retry_total=0.5)
        start = time.monotonic()
        summary = score_run(Run.open(toy_run), backend, Protocol(), concurrency=3)
    assert time.monotonic() - start < 5
    assert dict(summary.statuses) == {"error": 6}
    message = _stored(toy_run)[0]["message"]
    assert re.fullmatch(r"gave up after [34] attempts in 0\.\d s \(retry total 0\.5 s\); last: "
                        r"HTTP 429: .*Rate limit reached.*", message), message


def test_a_timeout_says_what_timed_out_and_after_how_long(toy_run):
    with JudgeServer(lambda body, call: stalled(10.0)) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url,
                               timeout=0.3, retry_total=0.0)
        summary = score_run(Run.open(toy_run), backend, Protocol(mode="per-image"), concurrency=6)
    assert dict(summary.statuses) == {"error": 6}
    message = _stored(toy_run)[0]["message"]
    assert re.fullmatch(r"gave up after 1 attempts? in 0\.\d s \(retry total 0 s\); last: "
                        r"ReadTimeout: POST /v1/chat/completions: no data within the 0\.3 s read "
                        r"timeout \(gave up 0\.\d s after sending\)", message), message


def test_score_exit_code_and_summary_are_honest(toy_run):
    def reply(body, call):
        return NO_CHOICES if call == 0 else _valid(body, call)

    with JudgeServer(reply) as server:
        result = CliRunner().invoke(app, ["score", str(toy_run), "--judge", "openai:fake",
                                          "--base-url", server.url, "--mode", "per-image",
                                          "--concurrency", "1"])
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-2:]
    assert last[0] == "6 requests sent; edits judged now: 5 ok, 1 transport error; 0 judged before"
    assert last[1] == ("error: 1 edit got no answer (transport error; the causes are in "
                       f"{toy_run}/results.sqlite): rerun to retry it")


def _run_with_methods(toy_dir: Path, out: Path, methods: list[str]) -> Run:
    samples = load_dataset("editeval-toy", toy_dir).select(["texture_change"], limit=2)
    run = Run.for_config(RunConfig(dataset="editeval-toy", methods=methods, model="fake", out=out,
                                   data_dir=toy_dir))
    run.save_config()
    for method in methods:
        for sample in samples:
            run.store.record_done(job_id=f"{method}/{sample.id}/seed0", method=method,
                                  sample_id=sample.id, task=sample.task, seed=0,
                                  image=Image.open(sample.image_path), nfe=0, uncached_nfe=0,
                                  wall_seconds=0.0, model="fake", params={})
    return run


@pytest.mark.parametrize("values, ranks", [
    # method -> S_all of its two edits (None: a parse failure); ranks in method order
    ({"a": [7.3, None], "b": [7.3, 7.3], "c": [7.0, 7.0]}, [1, 1, 3]),  # 7.30 (n=1) = 7.30 (n=2)
    ({"a": [7.304, 7.304], "b": [7.296, 7.296], "c": [7.31, 7.31]}, [2, 2, 1]),  # shown 7.30
    ({"a": [5.0, 5.0], "b": [6.0, 6.0], "c": [None, None]}, [2, 1, None]),  # nothing parsed: -
])
def test_ties_in_the_shown_mean_share_a_rank(toy_dir, tmp_path, values, ranks):
    with _run_with_methods(toy_dir, tmp_path / "run", list(values)) as run:
        for method, scores in values.items():
            for row, s_all in zip([r for r in run.rows("done") if r.method == method], scores):
                run.store.record_judgement(
                    job_id=row.job_id, judge="oracle", protocol_version="v", mode="per-image",
                    repeat=0, status="ok" if s_all else "parse_failed", scores=None, s_all=s_all,
                    position=1, group_size=1, message="", raw="", cache_key=None)
        table, identity = leaderboard(run)
    by_method = table.set_index("method")["rank"]
    assert [None if pd.isna(by_method[m]) else int(by_method[m]) for m in values] == ranks
    markdown = to_markdown(table, identity)
    if ranks == [1, 1, 3]:
        assert "| 1 | a | 7.30 | 0.00 | 1 | 1/2 |" in markdown
        assert "| 1 | b | 7.30 | 0.00 | 2 | 0/2 |" in markdown
    if ranks[2] is None:
        assert "| - | c | - | - | 0 | 2/2 |" in markdown


def test_a_server_that_goes_away_stops_the_run_after_the_retry_total(toy_run):
    from editeval.judge import JudgeUnreachable

    samples = Run.open(toy_run).samples
    rows = Run.open(toy_run).rows("done")
    requests = [JudgeRequest(samples[r.sample_id], [Run.open(toy_run).image_path(r)]) for r in rows]

    async def judge_twice(server: JudgeServer, backend: OpenAICompatibleBackend):
        try:
            first = await backend.judge(requests[0], Protocol())
            server.__exit__(None, None, None)  # the server goes away after answering once
            start = time.monotonic()
            with pytest.raises(JudgeUnreachable) as info:
                await backend.judge(requests[1], Protocol())
            return first, info.value, time.monotonic() - start
        finally:
            await backend.close()

    server = JudgeServer(_valid).__enter__()
    backend = OpenAICompatibleBackend("fake", server.url, retry_total=0.5, backoff=0.05)
    first, stopped, elapsed = asyncio.run(judge_twice(server, backend))
    assert first.status == "ok"
    # retried for the retry total (a blip is survived), then stopped. The backend gives up when
    # its next jittered delay (0.05 s doubling, x0.5-1.5) would pass the 0.5 s total: at the
    # earliest after three sleeps, at least 0.025 + 0.05 + 0.1 = 0.175 s. A backend that does not
    # retry a refused connection stops after ~0 s. (The bound was 0.3 s, which jitter can miss: a
    # CI run stopped at 0.26 s.)
    assert 0.15 < elapsed < 3
    assert str(stopped).startswith(f"cannot reach the judge at {server.url} for 0 s: ConnectError: "
                                   "Connection refused")


def test_a_retry_cut_short_by_the_budget_is_recorded(toy_run):
    with JudgeServer(lambda body, call: (503, {}, {"error": {"message": "busy"}}, 0.0)) as server:
        backend = make_backend("openai:fake", Run.open(toy_run), base_url=server.url, budget=2)
        backend.backoff = 0.01
        summary = score_run(Run.open(toy_run), backend, Protocol(mode="per-image"), concurrency=1)
    assert summary.requests == 2 and summary.budget_exhausted
    assert dict(summary.statuses) == {"error": 1} and summary.not_judged == 5
    assert _stored(toy_run)[0]["message"] == (
        'the request budget was spent while retrying; last: HTTP 503: {"error": {"message": "busy"}}')
