"""The leaderboard pages in a real headless Chromium (Debian's package, driven by Playwright)
against the real service with a finished (tiny) study. Saves its screenshots in the directory
named by RATEBENCH_SCREENSHOT_DIR, else in the test's tmp directory. (README's screenshot is of a
real study, taken with the command README gives.)"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.helpers import FinishedStudy

pytestmark = pytest.mark.slow
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if os.environ.get("RATEBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required (RATEBENCH_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("Chromium not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def screenshot_dir(tmp_path: Path) -> Path:
    chosen = os.environ.get("RATEBENCH_SCREENSHOT_DIR")
    if not chosen:
        return tmp_path
    Path(chosen).mkdir(parents=True, exist_ok=True)
    return Path(chosen)


def test_study_page_shows_the_leaderboard_and_every_plot(
    browser: Any,
    finished: FinishedStudy,
    tmp_path: Path,
) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{finished.service.url}/studies/{finished.study_id}")
    assert page.inner_text("#status") == "completed"
    rows = page.locator("#leaderboard tr").all_inner_texts()[1:]
    assert len(rows) == 2
    assert {row.split("\t")[1] for row in rows} == {"sgd", "adam"}
    progress = page.locator("#progress tr").all_inner_texts()[1:]
    assert len(progress) == 2
    done = finished.study["progress"]["trials_done"]
    assert page.inner_text("#timing").startswith(f"{done} of {done} trials done · elapsed")
    assert not page.locator("#eta").count()  # finished: nothing left to estimate
    environment = page.inner_text("#environment")
    assert "Python 3." in environment and "PyTorch" in environment and "cores" in environment
    assert page.locator("#nodes tr").count() >= 2  # a header and the machine the trials ran on
    page.wait_for_load_state("networkidle")
    images = page.locator(".plots img")
    assert images.count() == 3
    widths = page.evaluate(
        "Array.from(document.querySelectorAll('.plots img'), i => i.naturalWidth)"
    )
    assert all(w > 0 for w in widths), widths  # every plot loaded and decoded
    assert not page.locator("meta[http-equiv=refresh]").count()  # finished: no refresh
    page.screenshot(path=str(screenshot_dir(tmp_path) / "study_page.png"), full_page=True)


def test_index_and_task_pages_list_the_finished_study(
    browser: Any,
    finished: FinishedStudy,
    tmp_path: Path,
) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(finished.service.url + "/")
    assert "mnist1d-mlp" in page.inner_text("#tasks")
    assert "e2e" in page.inner_text("#studies")
    page.click("text=mnist1d-mlp")
    assert page.url.endswith("/tasks/mnist1d-mlp")
    assert page.locator("section.group").count() == 1  # one setting: one table
    assert "1 epoch × one pass" in page.inner_text(".setting")
    rows = page.locator("table.leaderboard tr").all_inner_texts()[1:]
    assert {row.split("\t")[1] for row in rows} == {"sgd", "adam"}
    assert "fixed: momentum 0.9" in page.inner_text("table.leaderboard")
    assert "optuna-dashboard <database URL>" in page.inner_text("footer")
    docs = page.get_attribute("text=API docs", "href")
    assert docs == "/docs"
    assert "Swagger UI" in httpx.get(finished.service.url + docs, timeout=30).text
    page.screenshot(path=str(screenshot_dir(tmp_path) / "task_page.png"), full_page=True)
