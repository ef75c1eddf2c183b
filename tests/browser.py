"""A real headless Chromium for the browser tests (the report and the study app).

Uses Debian's ``chromium`` package (``apt-get install chromium``) driven by Playwright from PyPI;
no browser is downloaded at test time. Without the package the browser tests skip with the reason;
on CI (``CI`` set) they fail instead, because CI installs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")

#: screenshots from the browser tests land here (a CI artifact), or in pytest's tmp dir
ARTIFACTS = Path(os.environ.get("EDITEVAL_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


def chromium_path() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """A Playwright Browser on the system's Chromium, headless; skips (or fails on CI) without one.

    Module-scoped: Playwright's sync API keeps an event loop running in the main thread while it
    is open, and a later test's ``asyncio.run`` (the study's load client) must not find one."""
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        path = None
    if path is None:
        reason = ("no Chromium or Playwright: `apt-get install chromium` and `pip install -e '.[dev]'` "
                  "to run the browser tests")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot as a test artifact; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
