"""Screenshots of the web pages for README: `docs/figures/task_leaderboard.png` (a task page
grouped by setting), `task_page.png` (the same, filtered to one setting) and `study_page.png`
(a study's page).

Seeds a fresh SQLite database with `tests/service/crowded.py`'s long content (32-digit study
ids, three studies pooled into each row, two settings, long names, arm settings and errors: the
content the page-width test renders), serves the real app on 127.0.0.1 (no Ray, no scheduler)
and photographs the pages at 1,200 px in headless Chromium, as tests/service/test_web.py drives
it. The stored values are illustrative, not measurements: the figures show the pages, not a
result.

    .venv/bin/python scripts/task_leaderboard_screenshot.py    # --out-dir docs/figures
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        print("Chromium not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT))  # the seeded content is the tests' (not an installed package)
    from tests.service.crowded import TASK, seed_crowded

    with tempfile.TemporaryDirectory() as data_dir:
        url = f"sqlite:///{Path(data_dir) / 'ratebench.db'}"
        seeded = seed_crowded(url)
        settings = Settings(data_dir=Path(data_dir), database_url=url, anonymous_reads=True,
                            run_scheduler=False)  # fmt: skip
        app = create_app(settings, start_ray=False)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                print("the service did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        pages = {
            "task_leaderboard.png": f"/tasks/{TASK}",
            "task_page.png": f"/tasks/{TASK}?epochs=3",  # filtered to one setting
            "study_page.png": f"/studies/{seeded.detailed}",
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                for name, path in pages.items():
                    page.goto(f"http://127.0.0.1:{port}{path}")
                    page.wait_for_load_state("networkidle")
                    page.screenshot(path=str(args.out_dir / name), full_page=True)
                    print(args.out_dir / name)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
