"""The study app in a real headless Chromium: a rater opens their link, rates three pages, reloads
and finds their progress kept; a page on another site cannot submit ratings for them.
Screenshots land in ``test-artifacts/`` (see tests/browser.py)."""

from __future__ import annotations

from pathlib import Path

from browser import browser, screenshot  # noqa: F401  (the fixture)
from study_helpers import METHODS, fake_run

from editeval.core.lmm_score import FACTORS
from editeval.run import Run
from editeval.study import StudyStore
from editeval.study.app import create_app, serving


def _study(tmp_path: Path, layout: str, methods: dict[str, str]):
    run_dir = fake_run(tmp_path / "run", methods)
    with Run.open(run_dir) as run, StudyStore(run) as store:
        store.configure(1, layout)
        (rater,) = store.add_raters(1)
    return run_dir, rater


def _problems(page) -> list[str]:
    found = []
    page.on("console", lambda m: found.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: found.append(f"page error: {e}"))
    return found


def _broken_images(page) -> list[str]:
    return page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")


def test_a_rater_rates_three_edits_reloads_and_keeps_progress(browser, tmp_path):  # noqa: F811
    run_dir, rater = _study(tmp_path, "per-edit", {METHODS[0]: "target", METHODS[1]: "noisy"})
    with serving(create_app(run_dir)) as url:
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        problems = _problems(page)
        page.goto(f"{url}/r/{rater.token}")
        assert page.text_content("#progress") == "0 of 14 done"
        for rated in range(1, 4):
            assert _broken_images(page) == [] and page.locator("img").count() == 2
            for i, select in enumerate(page.locator("select").all()):
                select.select_option(str(3 + (rated + i) % 8))
            with page.expect_navigation():
                page.click("button[type=submit]")
            assert page.text_content("#progress") == f"{rated} of 14 done"
        page.reload()
        assert page.text_content("#progress") == "3 of 14 done"
        again = context.new_page()  # the link again, later: same place
        again.goto(f"{url}/r/{rater.token}")
        assert again.text_content("#progress") == "3 of 14 done"
        body = page.content()
        assert not any(m in body for m in METHODS)
        shot = screenshot(page, "study-per-edit")
        context.close()
    assert problems == []
    assert shot.stat().st_size > 10_000
    with Run.open(run_dir) as run, StudyStore(run, readonly=True) as store:
        ratings = store.ratings()
    assert len(ratings) == 3 and all(1 <= r[f] <= 10 for r in ratings for f in FACTORS)


def test_survey_layout_and_an_empty_field_is_not_sent(browser, tmp_path):  # noqa: F811
    methods = dict(zip(METHODS, ("target", "source", "noisy", "blend")))
    run_dir, rater = _study(tmp_path, "survey", methods)
    with serving(create_app(run_dir)) as url:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        problems = _problems(page)
        page.goto(f"{url}/r/{rater.token}")
        assert page.locator("figcaption").all_text_contents() == [
            "Source image", "Edit A", "Edit B", "Edit C", "Edit D"]
        assert _broken_images(page) == []
        selects = page.locator("select").all()
        for select in selects[:-1]:
            select.select_option("6")
        page.click("button[type=submit]")  # one factor left empty: the browser keeps the form
        assert page.text_content("#progress") == "0 of 7 done"
        shot = screenshot(page, "study-survey")
        selects[-1].select_option("9")
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert page.text_content("#progress") == "1 of 7 done"
        page.close()
    assert problems == [] and shot.stat().st_size > 10_000


def test_another_site_cannot_submit_ratings_for_a_rater(browser, tmp_path):  # noqa: F811
    run_dir, rater = _study(tmp_path, "per-edit", {METHODS[0]: "target"})
    with serving(create_app(run_dir)) as url:
        page = browser.new_page()
        page.goto(f"{url}/r/{rater.token}")
        fields = {name: "5" for name in page.eval_on_selector_all(
            "select", "s => s.map(x => x.name)")}
        fields["csrf"] = rater.csrf  # even with the form token leaked
        inputs = "".join(f"<input name='{k}' value='{v}'>" for k, v in fields.items())
        evil = ("<html><body><form id='f' method='post' "
                f"action='{url}/r/{rater.token}/rate'>{inputs}</form></body></html>")
        page.route("http://evil.test/", lambda route: route.fulfill(
            status=200, content_type="text/html", body=evil))
        page.goto("http://evil.test/")
        with page.expect_navigation():
            page.eval_on_selector("#f", "f => f.submit()")
        assert "Cross-site form refused" in page.content()
        page.close()
    with Run.open(run_dir) as run, StudyStore(run, readonly=True) as store:
        assert store.ratings() == []
