"""`editeval report`: the leaderboard's numbers against hand-computed ones, the grid (one row per
sample, one cell per method, errors, judge answers, masks, ground truth), the user study's
figures, the CLI, and the page in a real headless Chromium (every image loads, the filters work)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import browser, screenshot  # noqa: F401  (browser: a pytest fixture)
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from editeval.cli import app
from editeval.core.lmm_score import overall
from editeval.data import load_dataset
from editeval.judge import Protocol, leaderboard, make_backend, score_run, to_markdown
from editeval.report import build_report, leaderboard_table
from editeval.report.html import THUMB_SIDE, mask_image
from editeval.report.plots import cost_quality_front
from editeval.run import Run, RunConfig
from editeval.study.simulate import simulate_raters

METHODS = ["zeta", "alpha", "beta"]  # the config's order, which the report keeps (not by name)
JUDGE = {"judge": "fake-judge", "protocol_version": "v9", "mode": "comparative"}
# acc, pre, qua, real per (method, sample index); None: the answer did not parse
FACTORS = {
    "alpha": [(9, 9, 8, 8), (7, 8, 9, 10), (10, 10, 10, 10), (6, 6, 6, 6)],
    "beta": [(3, 10, 9, 9), None, (2, 9, 8, 8), (4, 10, 9, 9)],
    "zeta": [(5, 5, 5, 5), None, (8, 8, 8, 8), None],  # index 1 fails as a job: never judged
}
PSNR = {"alpha": [30.0, 32.0, 34.0, 36.0], "beta": [20.0, 22.0, float("nan"), 26.0],
        "zeta": [25.0, None, 27.0, 29.0]}
ERROR = "RuntimeError: out of memory <at step 3> & more"
REGION = torch.zeros(8, 8)
REGION[:4, :4] = 1.0  # a generated mask: the top-left quadrant


def _s_all(method: str, index: int) -> float | None:
    factors = FACTORS[method][index]
    return None if factors is None else overall(dict(zip(
        ("accuracy", "preservation", "quality", "realism"), factors)))


@pytest.fixture(scope="module")
def samples():
    """Two object-removal and two texture-change samples of editeval-toy (dataset order)."""
    return load_dataset("editeval-toy").select(["texture_change", "object_removal"], per_task=2)


def _record(run: Run, samples, judged: bool = True) -> None:
    """zeta (the source; its second edit fails), alpha (the ground-truth target, with a generated
    mask) and beta (the source), judged in one conversation per sample, and PSNR by hand."""
    for method in METHODS:
        for i, sample in enumerate(samples):
            job = f"{method}/{sample.id}/seed0"
            keys = dict(job_id=job, method=method, sample_id=sample.id, task=sample.task, seed=0)
            if method == "zeta" and i == 1:
                run.store.record_failed(**keys, error=ERROR)
                continue
            perfect = method == "alpha"
            run.store.record_done(
                **keys, image=Image.open(sample.target_image_path if perfect else sample.image_path),
                nfe={"alpha": 100, "beta": 50, "zeta": 10}[method] + i,
                uncached_nfe={"alpha": 150, "beta": 50, "zeta": 10}[method],
                wall_seconds=0.5 * (i + 1), model="fake", params={},
                intermediates={"edit_region": REGION, "latents": torch.zeros(1, 4, 8, 8)}
                if perfect else None)
    values = []
    for method in METHODS:
        for i, sample in enumerate(samples):
            if PSNR[method][i] is not None:
                values.append((f"{method}/{sample.id}/seed0", "psnr", "pixels", "unedited",
                               PSNR[method][i], None))
    run.store.record_metric_values(values)
    if not judged:
        return
    for i, sample in enumerate(samples):
        raw = f"Answer about {sample.id}: <b>image 1</b> is best & image 2 is not."
        jobs = [m for m in METHODS if not (m == "zeta" and i == 1)]
        for position, method in enumerate(jobs, start=1):
            factors = FACTORS[method][i]
            scores = None if factors is None else dict(zip(
                ("accuracy", "preservation", "quality", "realism"), factors))
            run.store.record_judgement(
                job_id=f"{method}/{sample.id}/seed0", **JUDGE, repeat=0,
                status="ok" if scores else "parse_failed", scores=scores,
                s_all=_s_all(method, i), position=position, group_size=len(jobs),
                message="" if scores else "no score for image 2",
                raw=raw if scores else "I will not score image 2.", cache_key=None)


@pytest.fixture
def fake_run(samples, tmp_path) -> Path:
    with Run.for_config(RunConfig(dataset="editeval-toy", methods=METHODS, model="fake",
                                  out=tmp_path / "run")) as run:
        run.save_config()
        _record(run, samples)
    return run.path


# --- a minimal HTML tree (the standard library's parser) ------------------------------------

VOID = {"img", "input", "meta", "br", "link", "hr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag, self.attrs, self.children, self.parts = tag, attrs, [], []

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        found = []
        for child in self.children:
            if (tag is None or child.tag == tag) and all(  # data_method: data-method
                    (child.attrs.get(k.rstrip("_").replace("_", "-")) == v) if v is not True
                    else k.rstrip("_").replace("_", "-") in child.attrs for k, v in attrs.items()):
                found.append(child)
            found += child.find_all(tag, **attrs)
        return found

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        while self.stack[-1].tag != tag:
            self.stack.pop()
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].parts.append(data)


def parse(path: Path) -> Node:
    tree = _Tree()
    tree.feed(path.read_text(encoding="utf-8"))
    return tree.root


# --- the numbers ----------------------------------------------------------------------------

def test_leaderboard_numbers_are_the_hand_computed_ones(fake_run):
    with Run.open(fake_run) as run:
        table, identity, _ = leaderboard_table(run)
    assert identity == JUDGE
    cell = table.set_index(["task", "method"])
    # alpha on object_removal: samples 0 and 1, S_all 8.7 and 8.0
    assert _s_all("alpha", 0) == pytest.approx(8.7) and _s_all("alpha", 1) == pytest.approx(8.0)
    assert cell.loc[("object_removal", "alpha"), "lmm_mean"] == pytest.approx(8.35)
    assert cell.loc[("object_removal", "alpha"), "lmm_std"] == pytest.approx(0.35)  # ddof 0
    # over all tasks: the mean and population std of alpha's four S_all (8.7, 8.0, 10.0, 6.0)
    alpha = [8.7, 8.0, 10.0, 6.0]
    assert cell.loc[("all", "alpha"), "lmm_mean"] == pytest.approx(np.mean(alpha))
    assert cell.loc[("all", "alpha"), "lmm_std"] == pytest.approx(np.std(alpha))
    # beta's second answer did not parse: 3 scored edits of 4 answers
    assert cell.loc[("all", "beta"), ["lmm_n", "lmm_failures", "lmm_items"]].tolist() == [3, 1, 4]
    assert cell.loc[("object_removal", "beta"), "lmm_mean"] == pytest.approx(_s_all("beta", 0))
    assert cell.loc[("object_removal", "beta"), "lmm_n"] == 1
    # PSNR: beta's NaN is dropped and counted; zeta's failed job has none
    assert cell.loc[("all", "beta"), "psnr_mean"] == pytest.approx(np.mean([20, 22, 26]))
    assert cell.loc[("all", "beta"), "psnr_nan"] == 1
    assert cell.loc[("all", "zeta"), "psnr_mean"] == pytest.approx(np.mean([25, 27, 29]))
    # cost: NFE spent 100..103, uncached 150, seconds 0.5..2.0; zeta 3 done and 1 failed
    assert cell.loc[("all", "alpha"), ["nfe", "uncached_nfe", "seconds"]].tolist() == \
        pytest.approx([101.5, 150, 1.25])
    assert cell.loc[("all", "zeta"), ["done", "failed"]].tolist() == [3, 1]
    assert cell.loc[("object_removal", "zeta"), ["done", "failed"]].tolist() == [1, 1]
    # ranks by mean: alpha 8.175, beta (6.9, 5.9, 7.3) 6.7, zeta (5.0, 8.0) 6.5
    everything = table[table["task"] == "all"]
    assert everything["method"].tolist() == ["alpha", "beta", "zeta"]
    assert everything["rank"].tolist() == [1, 2, 3]
    assert cell.loc[("all", "beta"), "lmm_mean"] == pytest.approx(np.mean([6.9, 5.9, 7.3]))
    assert cell.loc[("all", "zeta"), "lmm_mean"] == pytest.approx(6.5)


def test_the_report_folder(fake_run, samples, tmp_path):
    out = tmp_path / "report"
    with Run.open(fake_run) as run:
        index = build_report(run, out)
        table, identity = leaderboard(run)
    assert index == out / "index.html"
    # Leaderboard.md beside it, in the survey's format
    assert (out / "Leaderboard.md").read_text() == to_markdown(table, identity)
    page = parse(index)

    meta = " ".join(page.find_all("p", class_="meta")[0].text.split())
    assert "3 methods, 4 samples; 11 edits done, 1 failed." in meta
    assert "LMM Score by fake-judge (protocol v9, comparative mode)." in meta
    # methods in the config's fixed order, one grid row per sample in dataset order
    assert [th.attrs["data-method"] for th in page.find_all("th", data_method=True)] == METHODS
    rows = [tr for tr in page.find_all("tr") if "sample" in tr.classes()]
    assert [tr.attrs["id"] for tr in rows] == [s.id for s in samples]
    assert [tr.attrs["data-task"] for tr in rows] == [s.task for s in samples]
    for tr in rows:
        assert [td.attrs["data-method"] for td in tr.find_all("td", data_method=True)] == METHODS

    # the failed job shows its error, escaped in the page and whole in the text
    failed = rows[1].find_all("td", data_method="zeta")[0]
    assert "failed" in failed.classes() and ERROR in failed.text
    assert "out of memory &lt;at step 3&gt; &amp; more" in index.read_text()

    # every picture of the grid: a lazy thumbnail of at most THUMB_SIDE px, linked to the full
    # image
    for img in page.find_all("table", class_="grid")[0].find_all("img"):
        with Image.open(out / img.attrs["src"]) as image:
            assert max(image.size) <= THUMB_SIDE
            assert image.size == (int(img.attrs["width"]), int(img.attrs["height"]))
        assert img.attrs["loading"] == "lazy"
    first = rows[0]
    links = {a.find_all("img")[0].attrs["alt"]: out / a.attrs["href"]
             for a in first.find_all("a") if a.find_all("img")}
    sample = samples[0]
    assert links[f"source of {sample.id}"].read_bytes() == sample.image_path.read_bytes()
    assert links[f"ground-truth target of {sample.id}"].read_bytes() == \
        sample.target_image_path.read_bytes()  # the toy world's ground truth in every row
    assert links[f"alpha on {sample.id}"].read_bytes() == \
        (fake_run / "images" / "alpha" / f"{sample.id}_seed0.png").read_bytes()

    # the generated mask (a 2-D map), scaled to the edit's size; the 4-D latents are no mask
    alpha = first.find_all("td", data_method="alpha")[0]
    masks = [img for img in alpha.find_all("img") if "mask" in img.classes()]
    assert [m.attrs["alt"] for m in masks] == ["edit_region"]
    grey = np.array(Image.open(out / alpha.find_all("a", title="edit_region")[0].attrs["href"]))
    assert grey.shape == (64, 64)
    assert (grey[:32, :32] == 255).all() and grey[32:, :].max() == 0 and grey[:, 32:].max() == 0

    # the judge's raw answer per edit: a key into the page's answers, each distinct text once
    answers = json.loads(page.find_all("script", id="raw-answers")[0].text)
    assert len(answers) == 5  # one conversation per sample, and beta's unparsed answer
    keys = [d.attrs["data-raw"] for d in alpha.find_all("details")]
    assert [answers[k] for k in keys] == [
        f"Answer about {sample.id}: <b>image 1</b> is best & image 2 is not."]
    assert "9/9/8/8" in alpha.text and "S_all 8.70" in alpha.text and "psnr 30" in alpha.text
    beta = rows[1].find_all("td", data_method="beta")[0]
    assert "parse_failed" in beta.text and "no score for image 2" in beta.text
    assert answers[beta.find_all("details")[0].attrs["data-raw"]] == "I will not score image 2."

    # the leaderboard over all tasks, ranked, with the hand-computed mean
    board = [s for s in page.find_all("section") if "data-task" not in s.attrs][0]
    ranked = [(tr.find_all("td")[0].text, tr.attrs["data-method"]) for tr in board.find_all(
        "tr", data_method=True)]
    assert ranked == [("1", "alpha"), ("2", "beta"), ("3", "zeta")]
    cells = {method: [td.text for td in board.find_all("tr", data_method=method)[0].find_all(
        "td")] for method in METHODS}
    header = [th.text for th in board.find_all("th")]
    assert header[2:6] == ["LMM Score (mean ± std)", "psnr", "judged", "NFE spent"]
    assert cells["alpha"][2] == "8.18 ± 1.45"  # mean and population std of 8.7, 8.0, 10.0, 6.0
    assert (np.mean([8.7, 8.0, 10.0, 6.0]), np.std([8.7, 8.0, 10.0, 6.0])) == pytest.approx(
        (8.175, 1.4463), abs=1e-4)
    assert cells["alpha"][3] == "33.00 ± 2.24"  # PSNR 30, 32, 34, 36
    assert cells["beta"][3:5] == ["22.67 ± 2.49 (1 n/a)", "3 (1 failed)"]  # 20, 22, 26; a NaN
    assert cells["zeta"][-1] == "3 (1 failed)"  # jobs
    # filters: one option per task with jobs, one checkbox per method
    assert [o.attrs["value"] for o in page.find_all("option")] == \
        ["", "object_removal", "texture_change"]
    assert [i.attrs["value"] for i in page.find_all("input")] == METHODS
    # the plots, as files
    plots = [img.attrs["src"] for img in page.find_all("img") if img.attrs["src"].startswith(
        "plots/")]
    assert plots == ["plots/score_by_task.png", "plots/score_vs_nfe.png"]
    assert all(Image.open(out / p).size[0] > 400 for p in plots)
    assert not (out / "study").exists()  # no user study


def test_a_rebuild_follows_a_changed_edit(fake_run, samples, tmp_path):
    out = tmp_path / "report"
    with Run.open(fake_run) as run:
        build_report(run, out)
        thumb = out / "thumbs" / "edits" / "beta" / f"{samples[0].id}_seed0.jpg"
        untouched = out / "thumbs" / "edits" / "alpha" / f"{samples[0].id}_seed0.jpg"
        before = untouched.stat().st_mtime_ns
        run.store.record_done(job_id=f"beta/{samples[0].id}/seed0", method="beta",
                              sample_id=samples[0].id, task=samples[0].task, seed=0,
                              image=Image.new("RGB", (64, 64), (255, 0, 0)), nfe=1,
                              uncached_nfe=1, wall_seconds=1.0, model="fake", params={})
        build_report(run, out)
    full = out / "full" / "edits" / "beta" / f"{samples[0].id}_seed0.png"
    assert np.array(Image.open(full)).reshape(-1, 3).tolist()[0] == [255, 0, 0]
    assert np.array(Image.open(thumb))[0, 0].tolist() == pytest.approx([254, 0, 0], abs=2)
    assert untouched.stat().st_mtime_ns == before  # nothing else redone


def test_a_user_study_adds_its_figures(samples, tmp_path):
    """Simulated raters (the oracle plus noise) rate the run: the report shows the study's two
    figures, written with its tables into the report folder."""
    with Run.for_config(RunConfig(dataset="editeval-toy", methods=METHODS, model="fake",
                                  out=tmp_path / "run")) as run:
        run.save_config()
        _record(run, samples)
        score_run(run, make_backend("oracle", run), Protocol(), console=Console(quiet=True))
        simulate_raters(run, 3, noise=1.0, k=2)
        run.store.record_metric_values(  # CLIPScore for the second figure
            [(r.job_id, "clip_t", "toy", "whole", 20.0 + i, None)
             for i, r in enumerate(run.rows("done"))])
        index = build_report(run, tmp_path / "report", judge="oracle")
    page = parse(index)
    assert [img.attrs["src"] for img in page.find_all("img") if "plots/" in img.attrs["src"]
            or "study/" in img.attrs["src"]] == [
        "plots/score_by_task.png", "plots/score_vs_nfe.png", "study/lmm_vs_human.png",
        "study/lmm_vs_clipscore.png"]
    assert (tmp_path / "report" / "study" / "correlations.csv").is_file()
    assert "LMM Score (S_all)" in page.find_all("figcaption")[0].text  # the oracle's scores


def test_an_unjudged_run_reports_its_metric_and_says_how_to_judge(samples, tmp_path):
    with Run.for_config(RunConfig(dataset="editeval-toy", methods=METHODS, model="fake",
                                  out=tmp_path / "run")) as run:
        run.save_config()
        _record(run, samples, judged=False)
        index = build_report(run)
        table, identity, _ = leaderboard_table(run)
    assert index == tmp_path / "run" / "report" / "index.html"
    assert identity is None and table["lmm_mean"].isna().all() and table["rank"].isna().all()
    assert "No LMM Score yet" in (index.parent / "Leaderboard.md").read_text()
    page = parse(index)
    assert [img.attrs["alt"] for img in page.find_all("img") if img.attrs["src"].startswith(
        "plots/")] == ["psnr by task and method: mean and standard deviation over samples.",
                       ("psnr against NFE per edit (each method's own cost); the dashed line is "
                        "the cost-quality front.")]
    assert not page.find_all("details")


def test_cli(fake_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(fake_run), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert result.output == (f"wrote {tmp_path / 'out' / 'index.html'} and "
                             f"{tmp_path / 'out' / 'Leaderboard.md'}\n")
    image = fake_run / "images" / "beta" / "object_removal" / "1_seed0.png"
    image.unlink()  # deleted after the run: shown as a failure that says how to redo it
    result = runner.invoke(app, ["report", str(fake_run), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    cell = [tr for tr in parse(tmp_path / "out" / "index.html").find_all("tr")
            if tr.attrs.get("id") == "object_removal/1"][0].find_all("td", data_method="beta")[0]
    assert "failed" in cell.classes()
    assert f"the edited image {image} is missing; run the same `editeval bench`" in cell.text
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {tmp_path} is not a run directory")
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["report", str(fake_run), "--judge", "other"])
    assert result.exit_code == 2 and result.output.startswith("error: --judge other matches no")
    assert "fake-judge" in result.output and len(result.output.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    Run.for_config(RunConfig(dataset="editeval-toy", methods=["a"], model="fake",
                             out=empty)).save_config()
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2 and "holds no finished jobs yet" in result.output


def test_mask_image_scales_maps_to_grey():
    probability = mask_image(torch.tensor([[0.0, 0.5], [1.0, 0.25]]), (4, 4))
    assert np.array(probability)[::2, ::2].tolist() == [[0, 128], [255, 64]]
    logits = mask_image(np.array([[-2.0, 2.0]]), (2, 1))  # outside 0..1: min-max
    assert np.array(logits).tolist() == [[0, 255]]
    assert mask_image(Image.new("1", (2, 2), 1), (2, 2)).getextrema() == (255, 255)


def test_cost_quality_front():
    costs = np.array([50.0, 100.0, 90.0, 160.0, 40.0])
    scores = np.array([9.1, 9.0, 9.3, 9.5, np.nan])
    assert cost_quality_front(costs, scores).tolist() == [0, 2, 3]


# --- in a real browser ----------------------------------------------------------------------

def test_report_in_chromium(browser, fake_run, tmp_path):  # noqa: F811
    from playwright.sync_api import expect  # present: the browser fixture skips without it

    with Run.open(fake_run) as run:
        index = build_report(run, tmp_path / "report")
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.goto(index.as_uri())
    images = page.locator("img")
    assert images.count() == 2 + 4 * 2 + 4 + 11 + 4  # plots, source+target, masks, edits, maps
    for i in range(images.count()):  # lazy images load once scrolled to
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function("[...document.images].every(i => i.complete)")
    broken = page.evaluate("[...document.images].filter(i => !i.naturalWidth).map(i => i.src)")
    assert broken == []

    visible = "[...document.querySelectorAll('tr.sample')].filter(r => !r.hidden).map(r => r.id)"
    page.select_option("#task-filter", "texture_change")
    assert page.evaluate(visible) == ["texture_change/1", "texture_change/2"]
    page.select_option("#task-filter", "")
    assert len(page.evaluate(visible)) == 4
    page.uncheck("input.method-filter[value=beta]")
    assert page.locator("td[data-method=beta]").first.is_hidden()
    assert page.evaluate("[...document.querySelectorAll('[data-method=beta]')]"
                         ".every(e => e.hidden)")
    assert page.locator("td[data-method=alpha]").first.is_visible()
    page.check("input.method-filter[value=beta]")

    answer = page.locator("td[data-method=alpha] details").first
    answer.locator("summary").click()  # the answer is filled in on the toggle event
    expect(answer.locator("pre")).to_have_text(
        "Answer about object_removal/1: <b>image 1</b> is best & image 2 is not.")
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "report")
    page.close()
    assert problems == []
