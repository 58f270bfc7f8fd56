"""Screenshot of a task page grouped by setting, for README (`docs/figures/task_leaderboard.png`).

Seeds a fresh SQLite database with finished studies in two settings of mnist1d-mlp (2 and 15
epochs; in the 2-epoch setting two studies of the same spec, pooled, and one with sgd without
momentum, a row of its own), serves the real app on 127.0.0.1 (no Ray, no scheduler) and
photographs `/tasks/mnist1d-mlp` in headless Chromium, as tests/service/test_web.py drives it.
The stored seed values are illustrative numbers, not measurements: the figure shows the page,
not a result.

    .venv/bin/python scripts/task_leaderboard_screenshot.py    # --out docs/figures/….png
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
from typing import Any

import sqlalchemy as sa
import uvicorn

from service.app import create_app
from service.config import Settings
from service.db import session_scope
from service.models import ArmResult, StudyRecord

TASK = "mnist1d-mlp"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


def spec(name: str, epochs: int, momentum: float = 0.9) -> dict[str, Any]:
    return {
        "name": name,
        "task": TASK,
        "data": {"batch_size": 100},
        "model": {"width": 64, "depth": 2},
        "arms": [
            {"optimizer": "sgd", "fixed": {"momentum": momentum}},
            {"optimizer": "adam"},
            {"optimizer": "bmp"},
        ],
        "budget": {"trials_per_arm": 16, "epochs": epochs, "final_seeds": 5},
    }


# study id -> (spec, {arm: (best lr, final seed values)}); illustrative values
STUDIES: dict[str, tuple[dict[str, Any], dict[str, tuple[float, list[float]]]]] = {
    "short-a": (spec("short-a", 2), {
        "sgd": (0.12, [0.612, 0.598, 0.624, 0.605, 0.617]),
        "adam": (0.004, [0.655, 0.648, 0.661, 0.652, 0.659]),
        "bmp": (0.31, [0.571, 0.566, 0.58, 0.562, 0.575]),
    }),
    "short-b": (spec("short-b", 2), {
        "sgd": (0.09, [0.609, 0.621, 0.601, 0.615, 0.611]),
        "adam": (0.003, [0.66, 0.651, 0.657, 0.649, 0.663]),
        "bmp": (0.28, [0.569, 0.577, 0.571, 0.583, 0.566]),
    }),
    "short-nomom": (spec("short-nomom", 2, momentum=0.0), {
        "sgd": (0.45, [0.531, 0.544, 0.527, 0.538, 0.541]),
    }),
    "long": (spec("long", 15), {
        "sgd": (0.08, [0.842, 0.851, 0.838, 0.847, 0.845]),
        "adam": (0.002, [0.829, 0.836, 0.824, 0.833, 0.831]),
        "bmp": (0.22, [0.812, 0.823, 0.817, 0.809, 0.82]),
    }),
}  # fmt: skip


def seed(engine: sa.Engine) -> None:
    with session_scope(engine) as session:
        for study_id, (study_spec, arms) in STUDIES.items():
            session.add(StudyRecord(id=study_id, name=study_id, task=TASK, spec=study_spec,
                                    status="completed"))  # fmt: skip
            session.flush()
            for rank, (arm, (lr, values)) in enumerate(arms.items(), start=1):
                session.add(
                    ArmResult(
                        study_id=study_id, task=TASK, arm=arm, scheme=arm, metric="val_accuracy",
                        direction="maximize", rank=rank, best_lr=lr,
                        objective_mean=sum(values) / len(values), n_trials=16, n_diverged=2,
                        summary={"final_values": values, "n_seeds": len(values)},
                    )
                )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/task_leaderboard.png"))
    args = parser.parse_args()
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        print("Chromium not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir), anonymous_reads=True, run_scheduler=False)
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
        seed(app.state.engine)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(f"http://127.0.0.1:{port}/tasks/{TASK}")
                assert page.locator("section.group").count() == 2
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
