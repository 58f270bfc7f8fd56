"""Where a sweep's time goes once it runs: ratebench's trials against the same trials trained
in one plain process.

Runs `ratebench run` on the first arm (sgd with momentum 0.9) of a workload of
`bench/sweep_wall.py` (`--workload cnn`: `mnist1d-cnn`; `mlp`: the mnist1d MLP 2×256),
`--rates` rates × `--epochs` epochs, one final seed, two trials at a time, one trial per task,
in a fresh data folder, and while it trains samples how much CPU each process on the machine
uses. Then it reads from the study's database what each
trial recorded (`started_at`: when its task began; `wall_time`: its training, data and model
set-up included) and reports:

- each trial's training time, and the same trials trained by `worker.runner.run_trial` in this
  process (one at a time, then two threads at once), so a slower trial under Ray shows;
- the gaps on each of the two slots: from a trial's end of training to the start of the next
  task on that slot (harvest, bookkeeping, Ray's lease and task start);
- how much of the two slots' time went to training between the first task's start and the
  last one's end, and the time before the first task started;
- the CPU shares while trials trained: the trial processes, the driver (`ratebench run`), the
  study's mailbox actor (every epoch's report passes through it), Ray's daemons.

Usage: python bench/trial_gaps.py [--workload cnn|mlp] [--rates 10] [--epochs 10] [--out FILE]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _sweep_runners import trial_config
from sweep_wall import WORKLOADS

from service.processes import command_line, cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
CPU_SAMPLE_S = 10.0


def _workload(name: str, epochs: int) -> dict[str, Any]:
    """`sweep_wall`'s workload `name`, on the CPU, with its first arm (sgd) only."""
    base = WORKLOADS[name]
    return {**base, "arms": base["arms"][:1], "epochs": epochs, "device": "cpu"}


def _spec(work: dict[str, Any], rates: int) -> dict[str, Any]:
    arm = work["arms"][0]
    low, high = work["lr"]
    return {
        "name": "trial-gaps",
        "task": work["task"],
        "data": {"batch_size": work["batch_size"]},
        "model": work["model"],
        "arms": [{"optimizer": arm["scheme"], "label": arm["label"], "fixed": arm["fixed"]}],
        "search_space": {"lr": {"low": low, "high": high, "log": True}},
        "budget": {"trials_per_arm": rates, "epochs": work["epochs"], "final_seeds": 1},
        "sampler": "grid",
        "pruner": "none",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2, "cohort_size": 1},
    }


def _cpu_seconds() -> dict[int, tuple[float, str]]:
    """Every process's CPU seconds so far (user + system) and its command line."""
    return {pid: (cpu, command_line(pid)) for pid, cpu in cpu_seconds().items()}


def _kind(cmdline: str) -> str:
    if "ray::ratebench trial" in cmdline:
        return "trials"
    if "service.cli run" in cmdline:
        return "driver (ratebench run)"
    if "ray::Mailbox" in cmdline:
        return "the study's mailbox actor"
    if "ray" in cmdline:
        return "Ray's daemons and idle workers"
    return "everything else"


def _cpu_shares(stop: threading.Event) -> dict[str, float]:
    """Cores used per kind of process over `CPU_SAMPLE_S` (or until `stop`), from when the
    first trial's process is seen to the last look that saw a trial training (a short sweep
    ends within the window, and its workers exit with the run). A Ray worker that ran a trial
    at any moment of the window counts as a trial process (its title says so only while the
    trial runs)."""
    ran_trials: set[int] = set()

    def look() -> tuple[dict[int, tuple[float, str]], bool]:
        processes = _cpu_seconds()
        training = {pid for pid, (_, cmd) in processes.items() if _kind(cmd) == "trials"}
        ran_trials.update(training)
        return processes, bool(training)

    while not (seen := look())[1]:
        if stop.wait(0.1):
            return {}
    before, began = seen[0], time.monotonic()
    last, ended = before, began
    while not stop.wait(0.1) and time.monotonic() - began < CPU_SAMPLE_S:
        processes, training = look()
        if training:
            last, ended = processes, time.monotonic()
    seconds = ended - began
    if seconds <= 0:
        return {}
    shares: dict[str, float] = {}
    for pid, (cpu, cmdline) in last.items():
        used = cpu - before.get(pid, (0.0, ""))[0]
        kind = "trials" if pid in ran_trials else _kind(cmdline)
        shares[kind] = shares.get(kind, 0.0) + used / seconds
    return {kind: round(cores, 3) for kind, cores in sorted(shares.items())}


def _run_ratebench(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "RATEBENCH_DATA_DIR": str(folder / "data")}
    env.pop("RAY_ADDRESS", None)
    stop = threading.Event()
    shares: dict[str, float] = {}
    sampler = threading.Thread(target=lambda: shares.update(_cpu_shares(stop)))
    began = time.time()
    sampler.start()
    try:
        subprocess.run([sys.executable, "-m", "service.cli", "run", str(spec_path)], env=env,
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    finally:
        stop.set()
        sampler.join()
    return {"began": began, "ended": time.time(), "cpu_cores": shares,
            "trials": _recorded(folder / "data" / "ratebench.db")}  # fmt: skip


def _recorded(database: Path) -> list[dict[str, Any]]:
    """Each trial's role, rate, task start and training time, in order of start."""
    with sqlite3.connect(database) as db:
        attrs: dict[int, dict[str, Any]] = {}
        for trial_id, key, value in db.execute(
            "SELECT trial_id, key, value_json FROM trial_user_attributes"
        ):
            attrs.setdefault(trial_id, {})[key] = json.loads(value)
    trials = [
        {key: a[key] for key in ("role", "lr", "started_at", "wall_time")}
        for a in attrs.values()
        if "started_at" in a and "wall_time" in a
    ]
    return sorted(trials, key=lambda t: t["started_at"])


def _slot_gaps(trials: list[dict[str, Any]]) -> list[float]:
    """Two slots: each task starts on the slot that came free first; the gap is from that
    slot's last end of training to the start."""
    free = [trials[0]["started_at"], trials[1]["started_at"]]
    gaps = []
    for i, t in enumerate(trials):
        slot = min(range(2), key=lambda s: free[s])
        if i >= 2:
            gaps.append(t["started_at"] - free[slot])
        free[slot] = t["started_at"] + t["wall_time"]
    return gaps


def _in_process(trials: list[dict[str, Any]], work: dict[str, Any]) -> dict[str, Any]:
    """The same sweep trials trained by `run_trial` here: alone, then two threads at once."""
    import torch

    from worker.runner import run_trial

    torch.set_num_threads(1)  # a trial's one core, as under Ray
    arm = work["arms"][0]
    configs = [trial_config(work, arm, t["lr"], 0) for t in trials if t["role"] == "sweep"]
    run_trial(configs[0])  # data generated and cached, kernels loaded

    def timed(config: Any) -> float:
        began = time.perf_counter()
        run_trial(config)
        return time.perf_counter() - began

    alone = [timed(c) for c in configs[:4]]
    with ThreadPoolExecutor(2) as pool:
        two = list(pool.map(timed, configs[:4]))
    return {"alone_s": [round(x, 2) for x in alone], "two_threads_s": [round(x, 2) for x in two]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cnn")
    parser.add_argument("--rates", type=int, default=10, choices=range(4, 65), metavar="4..64")
    parser.add_argument("--epochs", type=int, default=10, choices=range(1, 51), metavar="1..50")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ratebench-gaps-") as tmp:
        work = _workload(args.workload, args.epochs)
        run = _run_ratebench(_spec(work, args.rates), Path(tmp))
    trials = run["trials"]
    training = [t["wall_time"] for t in trials]
    first, last = trials[0]["started_at"], max(t["started_at"] + t["wall_time"] for t in trials)
    gaps = _slot_gaps(trials)
    report = {
        "benchmark": "trial_gaps",
        "workload": {
            **{key: work[key] for key in ("task", "model", "batch_size", "device")},
            "arm": work["arms"][0],
            "rates": args.rates,
            "epochs": args.epochs,
            "final_seeds": 1,
            "concurrent": 2,
        },
        "ratebench_run_wall_s": round(run["ended"] - run["began"], 2),
        "before_first_task_s": round(first - run["began"], 2),
        "after_last_training_s": round(run["ended"] - last, 2),
        "trial_training_s": {
            "median": round(statistics.median(training), 2),
            "min": round(min(training), 2),
            "max": round(max(training), 2),
            "each": [round(x, 2) for x in training],
        },
        "slot_gaps_s": {
            "median": round(statistics.median(gaps), 3),
            "max": round(max(gaps), 3),
            "sum": round(sum(gaps), 2),
        },
        "slots_training_share": round(sum(training) / (2 * (last - first)), 3),
        "cpu_cores_while_training": run["cpu_cores"],
        "same_trials_in_one_process": _in_process(trials, work),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
