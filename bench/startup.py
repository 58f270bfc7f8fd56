"""Start-up latency: how long from a command, or from a claim, to the first training step.

Two measurements, on a small study (mnist1d-mlp, one sgd arm, two trials of one epoch, one
final seed; SQLite in a temporary folder):

- `ratebench run`: from launching the command (a fresh Python process: imports, a local Ray
  runtime, storage, the arm's set-up) to the first step of its first trial.
- a running service: `ratebench serve` is started and left warm (its Ray runtime up); each
  round submits the study over HTTP, and the latency is from the moment the scheduler claimed
  it (the study's `started_at`) to the first step of its first trial.

The first step of a trial is the task's start (`started_at`, set by the Ray task) plus its
set-up (`setup_time`: data and model), read back from the Optuna storage. Every clock read is
this machine's wall clock. Rounds alternate between the two, after one warm-up run of each
that is reported apart (the dataset's disk cache and the OS page cache are then warm, as on a
machine that has run ratebench before).

Usage: python bench/startup.py [--rounds 5] [--out FILE]
Prints a table and one JSON object (also written to --out) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _service import HOST, server

from worker.results import load_trials
from worker.spec import StudySpec

SPEC: dict[str, Any] = {
    "name": "startup",
    "task": "mnist1d-mlp",
    "data": {"batch_size": 100},
    "model": {"width": 32, "depth": 1},
    "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}],
    "search_space": {"lr": {"low": 0.01, "high": 0.5, "log": True}},
    "budget": {"trials_per_arm": 2, "epochs": 1, "final_seeds": 1},
    "sampler": "random",
    "pruner": "none",
    "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2, "device": "cpu"},
}


def _first_step(url: str, study_key: str) -> float:
    """Wall-clock time of the study's earliest first training step."""
    spec = StudySpec.model_validate(SPEC)
    trials = load_trials(url, study_key, spec)
    starts = [
        t.user_attrs["started_at"] + t.user_attrs["setup_time"]
        for t in trials
        if "started_at" in t.user_attrs and "setup_time" in t.user_attrs
    ]
    if not starts:
        raise SystemExit(f"study {study_key}: no trial recorded its start")
    return min(starts)


def _env(folder: Path) -> dict[str, str]:
    env = {**os.environ, "RATEBENCH_DATA_DIR": str(folder)}
    for name in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS"):
        env.pop(name, None)  # a local runtime, as a newcomer's first run gets
    return env


def run_command(folder: Path, round_: int) -> float:
    """Seconds from launching `ratebench run` to its first training step."""
    url = f"sqlite:///{folder / f'run-{round_}.db'}"
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    key = f"startup-run-{round_}"
    command = [sys.executable, "-m", "service.cli", "run", str(spec_path), "--database", url,
               "--study-key", key, "--json"]  # fmt: skip
    launched = time.time()
    done = subprocess.run(command, env=_env(folder), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ratebench run failed:\n{done.stderr[-3000:]}")
    return _first_step(url, key) - launched


def claim_latency(base: str, api_key: str, url: str) -> float:
    """Seconds from the running service's claim of a submitted study to its first step."""
    headers = {"Authorization": f"Bearer {api_key}"}
    study = httpx.post(f"{base}/api/v1/studies", json=SPEC, headers=headers, timeout=30)
    study.raise_for_status()
    study_id = study.json()["id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = httpx.get(f"{base}/api/v1/studies/{study_id}", headers=headers, timeout=30)
        if state.json()["status"] not in {"queued", "running"}:
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"study {study_id} did not finish in 10 minutes")
    claimed = datetime.fromisoformat(state.json()["started_at"])
    if claimed.tzinfo is None:  # the API's times are UTC
        claimed = claimed.replace(tzinfo=UTC)
    return _first_step(url, study_id) - claimed.timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ratebench-startup-") as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'ratebench.db'}"
        env = {**_env(folder), "RATEBENCH_DATABASE_URL": url}

        def serve(port: int) -> list[str]:
            return [sys.executable, "-m", "service.cli", "serve", "--host", HOST, "--port",
                    str(port), "--log-level", "warning"]  # fmt: skip

        with server(serve, folder / "serve.log", env, start_timeout_s=300) as (base, _):
            api_key = subprocess.run(
                [sys.executable, "-m", "service.cli", "keys", "create", "--name", "startup"],
                env=env, capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            warm = {"run": run_command(folder, 0), "claim": claim_latency(base, api_key, url)}
            runs, claims = [], []
            for i in range(1, args.rounds + 1):
                if i % 2:
                    runs.append(run_command(folder, i))
                    claims.append(claim_latency(base, api_key, url))
                else:
                    claims.append(claim_latency(base, api_key, url))
                    runs.append(run_command(folder, i))
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "load_before": load_before, "load_after": os.getloadavg()}  # fmt: skip
    result = {
        "bench": "startup",
        "machine": machine,
        "spec": SPEC,
        "rounds": args.rounds,
        "warm_up": {k: round(v, 2) for k, v in warm.items()},
        "run_to_first_step_s": [round(v, 2) for v in runs],
        "claim_to_first_step_s": [round(v, 2) for v in claims],
        "median_run_s": round(statistics.median(runs), 2),
        "median_claim_s": round(statistics.median(claims), 2),
    }
    print(f"{'path':<32}{'median s':>10}{'min':>8}{'max':>8}{'warm-up':>10}")
    for name, values, first in [("ratebench run → first step", runs, warm["run"]),
                                ("claim → first step", claims, warm["claim"])]:  # fmt: skip
        print(f"{name:<32}{statistics.median(values):>10.2f}{min(values):>8.2f}"
              f"{max(values):>8.2f}{first:>10.2f}")  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
