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

from service.app import create_app
from service.config import Settings
from tests.service.crowded import ARMS, TASK, Crowded, seed_crowded
from tests.service.helpers import FinishedStudy
from tests.service.seeded import http_server

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
    # The URL changes when the navigation commits, before the new page is parsed; `count()`
    # does not wait (on a loaded machine it once counted the page still loading: 0).
    page.wait_for_url("**/tasks/mnist1d-mlp")
    page.wait_for_load_state()
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


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Crowded]]:
    """The real app (no Ray, no scheduler) over HTTP on a database of `tests.service.crowded`'s
    long content; yields its URL and what was seeded."""
    data_dir = tmp_path_factory.mktemp("crowded")
    url = f"sqlite:///{data_dir / 'ratebench.db'}"
    seeded = seed_crowded(url)
    settings = Settings(data_dir=data_dir, database_url=url, anonymous_reads=True,
                        run_scheduler=False)  # fmt: skip
    with http_server(create_app(settings, start_ray=False)) as base:
        yield base, seeded


# Every element of the page that sticks out of the page's column (the body's content box, inside
# the window), and every table cell whose content is wider than the cell (clipped, or spilling
# over its neighbour), with its text.
OVERFLOW_JS = """() => {
  const width = document.documentElement.clientWidth;
  const body = document.body.getBoundingClientRect();
  const padding = parseFloat(getComputedStyle(document.body).paddingRight);
  const right = Math.min(width, body.right - padding);
  const out = [];
  for (const el of document.querySelectorAll('body *')) {
    const box = el.getBoundingClientRect();
    if (box.width && box.right > right + 0.5)
      out.push(['past the column', el.tagName, el.innerText.slice(0, 60), box.right, right]);
  }
  for (const cell of document.querySelectorAll('th, td')) {
    if (cell.scrollWidth > cell.clientWidth + 1)
      out.push(['clipped', cell.innerText.slice(0, 60), cell.scrollWidth, cell.clientWidth]);
  }
  return {scrollWidth: document.documentElement.scrollWidth, clientWidth: width, out: out};
}"""

# Whether each header cell's text is broken inside a word: a word alone on a line of its own
# measures wider than the cell would allow only if the word was split; the check lays each word
# out in one line (a Range over its characters) and compares the number of line boxes.
SPLIT_WORDS_JS = """() => {
  const split = [];
  for (const th of document.querySelectorAll('th')) {
    const text = th.firstChild;
    if (!text || text.nodeType !== Node.TEXT_NODE) continue;
    let start = 0;
    for (const word of text.textContent.split(/(\\s+)/)) {
      if (word.trim()) {
        const range = document.createRange();
        range.setStart(text, start);
        range.setEnd(text, start + word.length);
        const tops = new Set(Array.from(range.getClientRects(), r => Math.round(r.top)));
        if (tops.size > 1) split.push(th.innerText);
      }
      start += word.length;
    }
  }
  return split;
}"""


def fits_the_window(page: Any, path: str) -> None:
    found = page.evaluate(OVERFLOW_JS)
    assert found["scrollWidth"] <= found["clientWidth"], (path, found)
    assert found["out"] == [], (path, found["out"][:10])
    assert page.evaluate(SPLIT_WORDS_JS) == [], path


@pytest.mark.parametrize("width", [1200])
def test_every_page_fits_the_window_with_long_content(
    browser: Any, crowded: tuple[str, Crowded], tmp_path: Path, width: int
) -> None:
    """At 1,200 px (and 1,000), no page scrolls sideways and no cell's content is cut or
    spills: two 32-digit study ids in a row of the task board once made it ~1,500 px wide, its
    DIVERGED column cut to "D"."""
    base, seeded = crowded
    page = browser.new_page(viewport={"width": width, "height": 900})
    shots = screenshot_dir(tmp_path)
    pages = {
        "index": "/",
        "tasks": "/tasks",
        "task_leaderboard": f"/tasks/{TASK}",
        "study_page": f"/studies/{seeded.detailed}",
    }
    for name, path in pages.items():
        response = page.goto(base + path)
        assert response is not None and response.status == 200, path
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
        fits_the_window(page, path)

    page.goto(f"{base}/tasks/{TASK}")
    assert page.locator("section.group").count() == 2
    pooled = page.locator("table.leaderboard").first
    cells = pooled.locator("td.studies").all()
    assert len(cells) == len(ARMS)
    for cell in cells:  # each row: the three pooled studies, short, linking to the full id
        links = cell.locator("a").all()
        assert {link.get_attribute("title") for link in links} == {
            f"study {s}" for s in seeded.pooled
        }
        for link in links:
            full = str(link.get_attribute("title")).removeprefix("study ")
            assert link.inner_text() == full[:8] + "…"
            assert str(link.get_attribute("href")).endswith(f"/studies/{full}")
    header = pooled.locator("th").last
    assert header.inner_text() == "DIVERGED"
    box, window = header.bounding_box(), page.viewport_size
    assert box is not None and window is not None and box["x"] + box["width"] <= window["width"]
    assert pooled.locator("tr").nth(1).locator("td").last.is_visible()


def test_the_overflow_check_catches_a_page_too_wide(browser: Any) -> None:
    """The checks above fail on the board as it was: a row of two full study ids that do not
    wrap, at 1,200 px."""
    page = browser.new_page(viewport={"width": 1200, "height": 600})
    ids = ", ".join(f'<a style="white-space: nowrap">{"0123456789abcdef" * 2}</a>' for _ in "ab")
    header = "".join(f"<th>{h}</th>" for h in ["#", "arm", "arm setting", "mean val_accuracy",
                                               "95% interval", "seeds", "best lr", "studies",
                                               "trials", "diverged"])  # fmt: skip
    page.set_content(
        "<style>body{max-width:1100px;margin:auto} table{width:100%}"
        "td,th{white-space:nowrap}</style>"
        f"<table><tr>{header}</tr><tr><td>1</td><td>sgd</td><td>fixed: momentum 0.9, nesterov"
        f" true</td><td>0.6555</td><td>[0.6517, 0.6593]</td><td>10</td><td>0.003</td>"
        f"<td>{ids}</td><td>32</td><td>4</td></tr></table>"
    )
    with pytest.raises(AssertionError):
        fits_the_window(page, "a board as it was")


def test_labels_and_names_break_at_their_parts_and_stay_escaped() -> None:
    """Table headers hold arm labels: the default bmp label is 24 letters joined by hyphens,
    which must wrap at its parts, never inside one (the page-width test checks the headers)."""
    from service.web.pages import breakable

    assert str(breakable("bmp-local-mean-positions")) == "bmp-<wbr>local-<wbr>mean-<wbr>positions"
    assert str(breakable("sgd+lr=1e-4")) == "sgd+<wbr>lr=<wbr>1e-4"  # a number stays whole
    assert str(breakable("<b>-x")) == "&lt;b&gt;-<wbr>x"
    assert str(breakable("weight_decay 0.0005")) == "weight_<wbr>decay 0.0005"
    assert str(breakable("a.b")) == "a.<wbr>b"
