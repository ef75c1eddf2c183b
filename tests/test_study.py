"""The user study: balanced assignment, the raters' app and its security, the load test, the
analysis (hand-computed values), and simulated raters recovering a planted correlation."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from scipy import stats
from study_helpers import METHODS, fake_run
from typer.testing import CliRunner

from editeval import cli
from editeval.cli import app as cli_app
from editeval.core.lmm_score import FACTORS
from editeval.judge import OracleBackend, Protocol, score_run
from editeval.metrics.correlation import bootstrap_correlations
from editeval.run import Run
from editeval.study import StudyStore, human_mean_ratings
from editeval.study.analyze import agreement, analyze
from editeval.study.app import create_app, serving
from editeval.study.assign import plan
from editeval.study.load import run_load
from editeval.study.simulate import (
    planted_correlations,
    rating_moments,
    simulate_raters,
)

ORIGIN = "http://testserver"
TWO = {METHODS[0]: "target", METHODS[1]: "source"}


def _study(tmp_path: Path, raters: int, *, methods=TWO, per_task=1, limit=None, k=1,
           layout="per-edit") -> tuple[Path, list]:
    run_dir = fake_run(tmp_path / "run", methods, per_task=per_task, limit=limit)
    with Run.open(run_dir) as run, StudyStore(run) as store:
        store.configure(k, layout)
        return run_dir, store.add_raters(raters)


def _form(page: str) -> dict[str, str]:
    """The page's form filled in: every select set to 7 (and the csrf field kept)."""
    import re

    form = {"csrf": re.search(r"name='csrf' value='([^']+)'", page)[1]}
    for name in re.findall(r"<select name='([^']+)'", page):
        form[name] = "7"
    return form


def _stored(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        return db.execute("SELECT rater_id, job_id, accuracy, preservation, quality, realism "
                          "FROM study_ratings ORDER BY rater_id, job_id").fetchall()


# assignment -------------------------------------------------------------------------------------

def test_every_unit_gets_k_distinct_raters_and_loads_differ_by_at_most_one():
    units = [f"u{i}" for i in range(10)]
    result = plan(units, 3, [1, 2, 3, 4], {}, {})
    per_unit = Counter(u for held in result.assigned.values() for u in held)
    assert per_unit == {u: 3 for u in units}
    assert all(len(held) == len(set(held)) for held in result.assigned.values())
    assert sorted(len(h) for h in result.assigned.values()) == [7, 7, 8, 8]  # 30 over 4
    assert result.shortfall == {}


def test_too_few_raters_is_a_shortfall_not_a_repeat():
    result = plan(["a", "b"], 3, [1, 2], {}, {})
    assert {r: sorted(units) for r, units in result.assigned.items()} == {1: ["a", "b"],
                                                                          2: ["a", "b"]}
    assert result.shortfall == {"a": 1, "b": 1}


def test_a_late_rater_takes_unstarted_work_and_done_work_stays():
    units = [f"u{i}" for i in range(12)]
    first = plan(units, 1, [1, 2], {}, {})
    rated = {1: set(first.assigned[1][:4])}  # rater 1 did 4 of their 6
    again = plan(units, 1, [1, 2, 3], first.assigned, rated)
    assert set(first.assigned[1][:4]) <= set(again.assigned[1])  # done work kept
    assert again.assigned[1][:4] == first.assigned[1][:4]  # and in its place
    assert Counter(u for h in again.assigned.values() for u in h) == {u: 1 for u in units}
    assert sorted(again.load(rated).values()) == [2, 3, 3]  # 8 left over 3 raters


def test_a_revoked_raters_unstarted_work_moves_and_their_ratings_count():
    units = ["a", "b", "c", "d"]
    first = plan(units, 2, [1, 2, 3], {}, {})
    rated = {1: {first.assigned[1][0]}}
    again = plan(units, 2, [2, 3, 4], first.assigned, rated)
    kept = first.assigned[1][0]
    counts = Counter(u for h in again.assigned.values() for u in h)
    assert counts[kept] == 1  # rater 1's rating counts as one of its 2
    assert all(counts[u] == 2 for u in units if u != kept)


# the app: pages, blindness, progress --------------------------------------------------------------

def test_rater_pages_are_blind_and_progress_is_kept(tmp_path):
    run_dir, (rater, _) = _study(tmp_path, 2, k=1)
    with TestClient(create_app(run_dir)) as client:
        page = client.get(f"/r/{rater.token}")
        assert page.status_code == 200
        total = int(page.text.split(" done</span>")[0].rsplit("of ", 1)[1])
        assert total == 7  # 14 edits, k = 1, 2 raters
        assert f"0 of {total} done" in page.text
        for _ in range(2):
            page = client.get(f"/r/{rater.token}")
            answer = client.post(f"/r/{rater.token}/rate", data=_form(page.text),
                                 headers={"Origin": ORIGIN}, follow_redirects=False)
            assert answer.status_code == 303 and answer.headers["location"] == f"/r/{rater.token}"
        texts = [client.get(f"/r/{rater.token}").text]
    with TestClient(create_app(run_dir)) as client:  # the server restarted: progress is kept
        texts.append(client.get(f"/r/{rater.token}").text)
        assert f"2 of {total} done" in texts[-1]
        edit_url = texts[-1].split("src='")[2].split("'")[0]
        image = client.get(edit_url)
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    for text in texts:
        assert not any(m in text for m in METHODS)  # blind: no method name, no job id
        assert "seed0" not in text
    assert len(_stored(run_dir)) == 2


def test_survey_layout_shows_all_methods_of_a_source_on_one_page(tmp_path):
    run_dir, (rater,) = _study(tmp_path, 1, methods={m: "target" for m in METHODS[:3]},
                               layout="survey")
    with TestClient(create_app(run_dir)) as client:
        page = client.get(f"/r/{rater.token}").text
        assert "Edit A" in page and "Edit B" in page and "Edit C" in page and "Edit D" not in page
        assert page.count("<select") == 12  # 3 edits x 4 factors
        assert client.post(f"/r/{rater.token}/rate", data=_form(page),
                           headers={"Origin": ORIGIN}).status_code == 200
        assert "1 of 7 done" in client.get(f"/r/{rater.token}").text
    stored = _stored(run_dir)
    assert len(stored) == 3 and {row[2:] for row in stored} == {(7, 7, 7, 7)}
    assert len({row[1].split("/", 1)[1] for row in stored}) == 1  # one source, three methods


# security ---------------------------------------------------------------------------------------

def test_wrong_and_revoked_links_get_a_plain_refusal(tmp_path):
    run_dir, (rater, other) = _study(tmp_path, 2)
    with Run.open(run_dir) as run, StudyStore(run) as store:
        store.revoke(other.rater_id)
    with TestClient(create_app(run_dir)) as client:
        wrong = client.get("/r/" + "x" * 32)
        assert wrong.status_code == 404 and wrong.headers["content-type"].startswith("text/plain")
        assert "not valid" in wrong.text and "<" not in wrong.text
        revoked = client.get(f"/r/{other.token}")
        assert revoked.status_code == 403 and "revoked" in revoked.text
        page = client.get(f"/r/{rater.token}").text
        edit_key = page.split("/edit/")[1].split("'")[0]
        assert client.get(f"/r/{other.token}/edit/{edit_key}").status_code == 403
        assert client.post(f"/r/{other.token}/rate", data={"csrf": other.csrf},
                           headers={"Origin": ORIGIN}).status_code == 403
    assert len(rater.token) >= 32 and rater.token != other.token


def test_a_rater_reads_and_writes_only_their_own_pages(tmp_path):
    run_dir, (first, second) = _study(tmp_path, 2, k=1)
    with TestClient(create_app(run_dir)) as client:
        page = client.get(f"/r/{first.token}").text
        edit_key = page.split("/edit/")[1].split("'")[0]
        for kind in ("edit", "source"):  # another rater's image: not found for them
            assert client.get(f"/r/{first.token}/{kind}/{edit_key}").status_code == 200
            assert client.get(f"/r/{second.token}/{kind}/{edit_key}").status_code == 404
        form = _form(page) | {"csrf": second.csrf}
        theirs = client.post(f"/r/{second.token}/rate", data=form, headers={"Origin": ORIGIN})
        assert theirs.status_code == 403 and "not assigned to you" in theirs.text
        assert first.token not in client.get(f"/r/{second.token}").text
    assert _stored(run_dir) == []


@pytest.mark.parametrize("headers, csrf, reason", [
    ({"Origin": ORIGIN}, None, "form token"),
    ({"Origin": ORIGIN}, "forged", "form token"),
    ({"Origin": "http://evil.example"}, "own", "Cross-site"),
    ({"Origin": "null"}, "own", "Cross-site"),
    ({}, "own", "Cross-site"),  # neither Origin nor Referer
    ({"Referer": "http://evil.example/r/x"}, "own", "Cross-site"),
])
def test_cross_site_forms_are_refused(tmp_path, headers, csrf, reason):
    run_dir, (rater,) = _study(tmp_path, 1)
    with TestClient(create_app(run_dir)) as client:
        form = _form(client.get(f"/r/{rater.token}").text)
        if csrf is None:
            del form["csrf"]
        elif csrf == "forged":
            form["csrf"] = "A" * len(rater.csrf)
        answer = client.post(f"/r/{rater.token}/rate", data=form, headers=headers)
        assert answer.status_code == 403 and reason in answer.text
        same_site = client.post(f"/r/{rater.token}/rate", data=_form(
            client.get(f"/r/{rater.token}").text), headers={"Referer": f"{ORIGIN}/r/x"},
            follow_redirects=False)
        assert same_site.status_code == 303  # a same-origin Referer alone is accepted
    assert len(_stored(run_dir)) == 1


@pytest.mark.parametrize("change, status, message", [
    (lambda f, k: f | {f"{k}.accuracy": "11"}, 400, "integer from 1 to 10, not '11'"),
    (lambda f, k: f | {f"{k}.accuracy": "0"}, 400, "not '0'"),
    (lambda f, k: f | {f"{k}.quality": "5.5"}, 400, "not '5.5'"),
    (lambda f, k: f | {f"{k}.realism": ""}, 400, "not ''"),
    (lambda f, k: f | {f"{k}.realism": "-3"}, 400, "not '-3'"),
    (lambda f, k: f | {f"{k}.realism": "٣"}, 400, "not '٣'"),  # a non-ASCII digit
    (lambda f, k: {n: v for n, v in f.items() if n != f"{k}.quality"}, 400, "missing quality"),
    (lambda f, k: f | {f"{k}.beauty": "5"}, 400, "unknown beauty"),
    (lambda f, k: f | {"nokey.accuracy": "5"}, 400, "unknown edit id 'nokey'"),
    (lambda f, k: f | {"accuracy": "5"}, 400, "Unknown field"),
    (lambda f, k: {"csrf": f["csrf"]}, 400, "no ratings"),
])
def test_every_input_is_validated_and_nothing_is_stored(tmp_path, change, status, message):
    run_dir, (rater,) = _study(tmp_path, 1)
    with TestClient(create_app(run_dir)) as client:
        page = client.get(f"/r/{rater.token}").text
        form = _form(page)
        key = page.split("/edit/")[1].split("'")[0]
        answer = client.post(f"/r/{rater.token}/rate", data=change(form, key),
                             headers={"Origin": ORIGIN})
        assert (answer.status_code, message in answer.text) == (status, True), answer.text
    assert _stored(run_dir) == []


def test_a_page_of_another_unit_or_a_double_submit_is_refused(tmp_path):
    run_dir, (rater,) = _study(tmp_path, 1, layout="survey")
    with TestClient(create_app(run_dir)) as client:
        page = client.get(f"/r/{rater.token}").text
        form = _form(page)
        first_key = next(n for n in form if n != "csrf").split(".")[0]
        partial = {n: v for n, v in form.items() if n == "csrf" or n.startswith(first_key)}
        half = client.post(f"/r/{rater.token}/rate", data=partial, headers={"Origin": ORIGIN})
        assert half.status_code == 400 and "rate every edit on the page" in half.text
        assert client.post(f"/r/{rater.token}/rate", data=form, headers={"Origin": ORIGIN},
                           follow_redirects=False).status_code == 303
        again = client.post(f"/r/{rater.token}/rate", data=form | {f"{first_key}.accuracy": "1"},
                            headers={"Origin": ORIGIN})
        assert again.status_code == 409 and "first ratings stand" in again.text
        mixed = _form(client.get(f"/r/{rater.token}").text) | {
            f"{first_key}.{f}": "1" for f in FACTORS}  # an edit of the page before
        assert "one page only" in client.post(f"/r/{rater.token}/rate", data=mixed,
                                              headers={"Origin": ORIGIN}).text
    stored = _stored(run_dir)
    assert len(stored) == 2 and all(row[2] == 7 for row in stored)  # the first rating stands


def test_pages_forbid_framing_scripts_and_caching(tmp_path):
    run_dir, (rater,) = _study(tmp_path, 1)
    with TestClient(create_app(run_dir)) as client:
        headers = client.get(f"/r/{rater.token}").headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src" not in headers["content-security-policy"]  # default-src 'none'
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        assert headers["referrer-policy"] == "same-origin"
        assert [client.get(path).status_code for path in ("/docs", "/openapi.json")] == [404, 404]


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_serve_binds_loopback_and_a_killed_server_loses_no_rating(tmp_path):
    from editeval.study.app import free_port

    run_dir, (rater,) = _study(tmp_path, 1)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "editeval.cli", "study", "serve",
                               str(run_dir), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _listening_addresses(port):
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.1)
        assert _listening_addresses(port) == {"127.0.0.1"}
        base = f"http://127.0.0.1:{port}"
        page = httpx.get(f"{base}/r/{rater.token}").text
        answer = httpx.post(f"{base}/r/{rater.token}/rate", data=_form(page),
                            headers={"Origin": base})
        assert answer.status_code == 303
        server.send_signal(signal.SIGKILL)  # no shutdown: the rating must already be on disk
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    assert [row[2:] for row in _stored(run_dir)] == [(7, 7, 7, 7)]


# load --------------------------------------------------------------------------------------------

def test_50_concurrent_raters_20_ratings_each_nothing_lost_nothing_duplicated(tmp_path):
    methods = {f"m{i}": "target" for i in range(5)}
    run_dir, raters = _study(tmp_path, 50, methods=methods, per_task=3, limit=20, k=10)
    with serving(create_app(run_dir)) as url:
        result = run_load(url, [r.token for r in raters], pages=20, timeout=120)
    assert result.errors == []
    assert len(result.acknowledged) == 1000
    assert result.duplicates_refused == 50  # every double submit refused
    by_token = {r.token: r.rater_id for r in raters}
    with Run.open(run_dir) as run, StudyStore(run) as store:
        keys = {e.edit_key: e.job_id for e in store.edits()}
    expected = {(by_token[token], keys[key]): tuple(scores[f] for f in FACTORS)
                for (token, key), scores in result.acknowledged.items()}
    stored = {(row[0], row[1]): tuple(row[2:]) for row in _stored(run_dir)}
    assert len(_stored(run_dir)) == len(stored) == 1000  # none duplicated
    assert stored == expected  # none lost, none changed
    per_edit = Counter(job for _, job in stored)
    assert set(per_edit.values()) == {10}  # 100 edits, k = 10 each
    print(f"load: 1000 ratings in {result.seconds:.1f} s, p95 {result.percentile(95):.0f} ms")


# analysis ---------------------------------------------------------------------------------------

def test_human_means_and_s_all_by_hand(tmp_path):
    run_dir, (first, second) = _study(tmp_path, 2, k=2)
    with Run.open(run_dir) as run, StudyStore(run) as store:
        unit = store.progress(first.rater_id).next_unit
        (edit,) = store.unrated_edits(first.rater_id, unit)
        store.record_unit(first.rater_id, {edit.edit_key: dict(zip(FACTORS, (3, 4, 5, 6)))})
        store.record_unit(second.rater_id, {edit.edit_key: dict(zip(FACTORS, (5, 6, 7, 8)))})
    with Run.open(run_dir, readonly=True) as run:  # as the report opens it: reads only
        means = human_mean_ratings(run)
    assert list(means.columns) == ["job_id", "method", "task", "sample_id", "seed", *FACTORS,
                                   "overall", "n_ratings"]
    row = means.iloc[0]
    assert len(means) == 1 and row["job_id"] == edit.job_id
    assert [row[f] for f in FACTORS] == [4.0, 5.0, 6.0, 7.0]
    # S_all 0.4*3 + 0.3*4 + 0.2*5 + 0.1*6 = 4.0 and 0.4*5 + 0.3*6 + 0.2*7 + 0.1*8 = 6.0
    assert row["overall"] == pytest.approx(5.0) and row["n_ratings"] == 2
    assert row["method"] in TWO and row["seed"] == 0


def test_human_means_of_a_run_without_a_study_is_empty_and_creates_nothing(tmp_path):
    run_dir = fake_run(tmp_path / "run", TWO)
    with Run.open(run_dir) as run:
        assert human_mean_ratings(run).empty
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
    assert not any(name.startswith("study") for name in tables)


def test_krippendorff_alpha_by_hand():
    # raters 1 and 2 on three edits, accuracy (1, 2, 3) and (3, 2, 1): D_o = 16/6 (two units
    # differ by 2, counted both ways), D_e = 2 * 6 * 4 / (6 * 5) = 1.6, alpha = 1 - D_o/D_e = -2/3
    rows = [{"rater_id": r, "job_id": f"j{i}", **dict.fromkeys(FACTORS, v), "overall": v}
            for r, values in ((1, (1, 2, 3)), (2, (3, 2, 1))) for i, v in enumerate(values)]
    table = agreement(pd.DataFrame(rows)).set_index("factor")
    assert table.loc["accuracy", "alpha"] == pytest.approx(-2 / 3)
    assert (table.loc["accuracy", "raters"], table.loc["accuracy", "edits"]) == (2, 3)
    first = [row for row in rows if row["rater_id"] == 1]
    agree = agreement(pd.DataFrame(first + [dict(row, rater_id=2) for row in first]))
    assert agree.set_index("factor").loc["accuracy", "alpha"] == 1.0


def test_bootstrap_correlations_match_scipy_and_bracket_the_estimate():
    rng = np.random.default_rng(3)
    x = rng.integers(1, 11, 60).astype(float)
    y = x + rng.normal(0, 3, 60).round()
    result = bootstrap_correlations(np.append(x, np.nan), np.append(y, 1.0), resamples=400)
    assert result["n"] == 60  # the NaN pair dropped
    assert result["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert result["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert result["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    for name in ("pearson", "spearman", "kendall"):
        assert result[f"{name}_low"] < result[name] < result[f"{name}_high"]
    assert np.isnan(bootstrap_correlations([1, 2], [2, 1])["pearson"])  # fewer than 3 pairs


def test_rating_moments_are_exact():
    mean, variance = rating_moments(np.array([5.0, 10.0]), 0.0)
    assert mean.tolist() == [5, 10] and variance.tolist() == [0, 0]
    mean, variance = rating_moments(np.array([10.0]), 1.0)
    # P(10) = P(z > -0.5) = 0.6915; P(9) = P(-1.5 < z < -0.5) = 0.2417; ...
    draws = np.clip(np.round(10 + np.random.default_rng(0).standard_normal(400_000)), 1, 10)
    assert mean[0] == pytest.approx(draws.mean(), abs=0.005)
    assert variance[0] == pytest.approx(draws.var(), abs=0.005)


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory) -> Path:
    """28 toy edits by four fake methods of different quality, judged by the oracle."""
    run_dir = fake_run(tmp_path_factory.mktemp("judged") / "run",
                       dict(zip(METHODS, ("target", "source", "noisy", "blend"))))
    with Run.open(run_dir) as run:
        score_run(run, OracleBackend(), Protocol(mode="per-image"))
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, to))


def test_noise_free_simulated_raters_agree_perfectly_with_the_oracle(judged_run, tmp_path):
    run_dir = _copy(judged_run, tmp_path / "run")
    with Run.open(run_dir) as run:
        done = simulate_raters(run, 3, noise=0.0, k=2, layout="per-edit")
        result = analyze(run, tmp_path / "out", resamples=200)
    assert done.ratings == 56 and done.planted == dict.fromkeys(done.planted, 1.0)
    assert result.agreement.set_index("factor")["alpha"].tolist() == [1.0] * 5
    overall = result.correlations.set_index(["score", "task"]).loc[("LMM Score", "all")]
    assert overall["pearson"] == pytest.approx(1.0) and overall["n"] == 28


@pytest.mark.parametrize("noise", [3.0, 6.0])
def test_analysis_recovers_the_planted_correlation(judged_run, tmp_path, noise):
    run_dir = _copy(judged_run, tmp_path / "run")
    with Run.open(run_dir) as run:
        done = simulate_raters(run, 6, noise=noise, k=3, layout="per-edit", seed=1)
        result = analyze(run, tmp_path / "out", resamples=500)
    assert done.ratings == 28 * 3
    row = result.correlations.set_index(["score", "task"]).loc[("LMM Score", "all")]
    # seed 1 is no pick: over seeds 0-29 the interval held the planted r 29 (noise 3) and 28
    # (noise 6) times (docs/study.md)
    assert row["pearson_low"] <= done.planted["overall"] <= row["pearson_high"], row
    assert row["pearson_low"] > 0  # an interval that says something: a positive correlation
    assert 0.5 < done.planted["overall"] < 0.95  # noise that matters
    assert {"ratings.csv", "human_means.csv", "agreement.csv", "correlations.csv",
            "lmm_vs_human.png"} <= set(result.files)
    assert len(pd.read_csv(result.files["ratings.csv"])) == 84


def test_planted_correlation_falls_with_noise(judged_run):
    with Run.open(judged_run, readonly=True) as run:
        from editeval.study.analyze import lmm_scores

        truth = lmm_scores(run, "oracle")[0].set_index("job_id")
    n = pd.Series(3, index=truth.index)
    values = [planted_correlations(truth, n, noise)["overall"] for noise in (0, 1, 3, 6)]
    assert values[0] == pytest.approx(1.0) and values == sorted(values, reverse=True)


def test_metrics_are_correlated_and_the_clipscore_figure_drawn(judged_run, tmp_path):
    run_dir = _copy(judged_run, tmp_path / "run")
    with Run.open(run_dir) as run:
        jobs = [row.job_id for row in run.rows("done")]
        # a stand-in CLIPScore that is the oracle's S_all exactly, and one that is constant
        s_all = {j["job_id"]: j["s_all"] for j in run.store.judgements()}
        run.store.record_metric_values(
            [(job, "clip_t", "fake-clip", "whole", 10 * s_all[job], None) for job in jobs]
            + [(job, "psnr", "pixels", "unedited", 20.0, None) for job in jobs])
        simulate_raters(run, 3, noise=0.0, k=1, layout="per-edit")
        result = analyze(run, tmp_path / "out", resamples=200)
    table = result.correlations.set_index(["score", "task"])
    assert table.loc[("clip_t@fake-clip", "all"), "pearson"] == pytest.approx(1.0)
    assert np.isnan(table.loc[("psnr@pixels", "all"), "pearson"])  # constant: undefined
    assert "lmm_vs_clipscore.png" in result.files
    assert result.files["lmm_vs_clipscore.png"].stat().st_size > 5000


# the command line --------------------------------------------------------------------------------

def test_study_commands(judged_run, tmp_path, monkeypatch):
    run_dir = _copy(judged_run, tmp_path / "run")
    runner = CliRunner()
    added = runner.invoke(cli_app, ["study", "add-raters", str(run_dir), "2", "--k", "1",
                                    "--layout", "per-edit", "--url", "http://study.example:9000"])
    assert added.exit_code == 0, added.output
    assert added.output.count("http://study.example:9000/r/") == 2
    assert "28 pages (per-edit layout), k = 1" in added.output
    assert runner.invoke(cli_app, ["study", "revoke", str(run_dir), "2"]).exit_code == 0
    monkeypatch.setattr(cli.console, "width", 40)  # a pipe or a narrow terminal
    listed = runner.invoke(cli_app, ["study", "raters", str(run_dir)])
    # the whole link, never cut to the width (a table column did: `.../r/L2ry9-1W6sSG7…`)
    # (all work moved to rater 1 when rater 2 was revoked)
    assert re.fullmatch(r"rater 1  http://127\.0\.0\.1:8000/r/[\w-]{32}  done 0/28\n"
                        r"rater 2  http://127\.0\.0\.1:8000/r/[\w-]{32}  done 0/0  revoked\n",
                        listed.output), listed.output
    nothing = runner.invoke(cli_app, ["study", "analyze", str(run_dir)])
    assert nothing.exit_code == 2 and "its 2 raters have rated nothing yet" in nothing.output
    human = runner.invoke(cli_app, ["study", "simulate", str(run_dir)])
    assert human.exit_code == 2 and "has human raters" in human.output
    for bad, said in ((["--k", "0"], "at least 1"), (["--layout", "grid"], "unknown layout")):
        refused = runner.invoke(cli_app, ["study", "add-raters", str(run_dir), "1", *bad])
        assert refused.exit_code == 2 and said in refused.output
        assert len(refused.output.strip().splitlines()) == 1
    assert runner.invoke(cli_app, ["study", "revoke", str(run_dir), "9"]).exit_code == 2
    fresh = _copy(judged_run, tmp_path / "fresh")
    simulated = runner.invoke(cli_app, ["study", "simulate", str(fresh), "--raters", "3",
                                        "--k", "2", "--noise", "2"])
    assert simulated.exit_code == 0 and "planted Pearson r" in simulated.output
    analyzed = runner.invoke(cli_app, ["study", "analyze", str(fresh), "--resamples", "200"])
    assert analyzed.exit_code == 0, analyzed.output
    assert "| LMM Score | overall | all | 28 |" in analyzed.output
    assert (fresh / "study" / "ratings.csv").exists()
    unjudged = fake_run(tmp_path / "unjudged", TWO)
    refused = runner.invoke(cli_app, ["study", "simulate", str(unjudged)])
    assert refused.exit_code == 2 and "--judge oracle" in refused.output
