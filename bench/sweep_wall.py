"""Wall time of learning-rate sweeps through ratebench and its peers, side by side.

Every runner does the same workload with the same training code (`worker.runner.run_trial` on
the `TrialConfig` ratebench builds; the peers are in `bench/_sweep_runners.py`): every arm at
every rate of ratebench's own log grid, seed 0, two trials at a time on one CPU each
(`--device cuda`: half a GPU each), no pruning, the objective the last epoch's validation
accuracy (a diverged run counts 0); then each arm's best rate retrained on the final seeds,
two at a time, with the test split. Workloads (`--workload`):

- `mlp` (default): `mnist1d-mlp` (width 256, depth 2, batch 100), SGD with momentum 0.9,
  `--rates` rates from 1e-3 to 1, `--epochs` (10) epochs, 1 final seed;
- `cnn`: `mnist1d-cnn` (its default model), four arms (sgd and bmp with momentum 0.9, adam,
  lars), 16 rates from 1e-4 to 1, 10 epochs, 3 final seeds: the size users run, where
  start-up is a small part.

Runners:
- `ratebench`: `ratebench run SPEC --database sqlite:///<fresh file> --json` in a fresh
  process (`sampler: grid`, cohorts on, the default);
- `ratebench-no-cohorts`: the same with `resources.cohort_size: 1`;
- `ratebench-joined`: `ratebench run` in a fresh process beside the running service of
  `ratebench-service` (its data folder): it joins that service's Ray runtime instead of
  starting one (`service.running_ray`), as a user's `ratebench run` beside a service does;
- `ratebench-service`: the spec POSTed to a `ratebench serve` started (and warmed by one tiny
  study) before the first round, as a user's service runs; timed from the POST to the study's
  `completed` (polled every 0.1 s);
- `optuna`: `study.optimize(n_jobs=2)` per arm with a `GridSampler`, in-memory storage, in a
  fresh process;
- `optuna-warm`: the same sweep in a process that has already imported torch and Optuna and run
  one tiny trial, as in a notebook; timed from the request to the result;
- `ray-tune`: a `Tuner` with a grid over (arm, rate), two at a time, Ray on 127.0.0.1;
- `ray-floor`: no sweep, only a local Ray runtime started as `ratebench run` starts it, two
  workers importing the trial code, and its shutdown: the least a Ray-based runner pays from a
  fresh process.

A round runs every runner once, in an order that rotates every round. Reported per workload:
each runner's median wall time, the median over rounds of its per-round ratio to `optuna` and
to `optuna-warm` (when run) with min and max, and per arm the best rates, sweep accuracies and
final seeds' accuracies found; every ratebench run's tried rates are read back and checked
against the grid. The mnist1d cache is filled before the first round. The same science: on CPU
a trial is deterministic where it has a process to itself; a cohort's batched arithmetic may
differ in the last bits; Optuna's `n_jobs` threads share torch's global random generator, so
its accuracies can differ from run to run.

Usage: python bench/sweep_wall.py [--workload mlp|cnn] [--rates 12 32] [--epochs 10]
[--rounds 3] [--device cpu|cuda] [--runners …] [--out FILE]
Needs Ray Tune for `ray-tune` (`pip install -e '.[bench]'`). Prints a table and one JSON object
(also written to --out) and exits 0, or 1 when some run failed (its error is in the JSON).
"""

# Only the standard library at module level: a child process imports this module, and its
# wall time should hold what its runner needs, nothing of the parent's.
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/'s own modules
from _sweep_runners import (
    CONCURRENT,
    RESULT_MARK,
    run_optuna,
    run_ray_floor,
    run_ray_tune,
    serve_warm_optuna,
)

from service.processes import in_session

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = (
    "ratebench", "ratebench-no-cohorts", "ratebench-joined", "ratebench-service", "optuna",
    "optuna-warm", "ray-tune", "ray-floor",
)  # fmt: skip
_NEEDS_SERVICE = ("ratebench-service", "ratebench-joined")
BASELINES = ("optuna", "optuna-warm")
CHILD_FLAG = "--child"
SERVICE_POLL_S = 0.1

# -- the workloads -----------------------------------------------------------------------------

WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {
        "task": "mnist1d-mlp", "model": {"width": 256, "depth": 2}, "batch_size": 100,
        "arms": [{"label": "sgd", "scheme": "sgd", "fixed": {"momentum": 0.9}}],
        "lr": (1e-3, 1.0), "final_seeds": 1,
    },
    "cnn": {
        "task": "mnist1d-cnn", "model": {}, "batch_size": 100,
        "arms": [
            {"label": "sgd", "scheme": "sgd", "fixed": {"momentum": 0.9}},
            {"label": "adam", "scheme": "adam", "fixed": {}},
            {"label": "bmp", "scheme": "bmp",
             "fixed": {"momentum": 0.9, "propagate": True, "mean_over_positions": False}},
            {"label": "lars", "scheme": "lars", "fixed": {"momentum": 0.9}},
        ],
        "lr": (1e-4, 1.0), "final_seeds": 3,
    },
}  # fmt: skip


def workload(args: argparse.Namespace, n_rates: int) -> dict[str, Any]:
    """Everything a runner needs, as plain JSON; the rates are ratebench's grid points."""
    base = WORKLOADS[args.workload]
    chosen: dict[str, Any] = {
        **{k: v for k, v in base.items() if k != "lr"},
        "name": args.workload, "n_rates": n_rates, "epochs": args.epochs, "device": args.device,
        "lr_range": list(base["lr"]),
    }  # fmt: skip
    chosen["rates"] = _ratebench_grid(spec(chosen, cohorts=True))
    return chosen


def spec(work: dict[str, Any], *, cohorts: bool, name: str | None = None) -> dict[str, Any]:
    """The ratebench spec of the workload."""
    low, high = work["lr_range"]
    return {
        "name": name or f"sweep-wall-{work['name']}-{work['n_rates']}",
        "task": work["task"],
        "data": {"batch_size": work["batch_size"]},
        "model": work["model"],
        "arms": [
            {"optimizer": a["scheme"], "label": a["label"], "fixed": a["fixed"]}
            for a in work["arms"]
        ],
        "search_space": {"lr": {"low": low, "high": high, "log": True}},
        "budget": {
            "trials_per_arm": work["n_rates"],
            "epochs": work["epochs"],
            "final_seeds": work["final_seeds"],
        },
        "sampler": "grid",
        "pruner": "none",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "resources": {
            "cpus_per_trial": 1,
            "gpus_per_trial": 0.5 if work["device"] == "cuda" else 0,
            "max_concurrent_trials": CONCURRENT,
            "device": work["device"],
            "cohort_size": "auto" if cohorts else 1,
        },
    }


def _ratebench_grid(spec_data: dict[str, Any]) -> list[float]:
    """The learning rates ratebench's grid sampler runs for this spec."""
    from worker.arms.optuna.sampling import grid_values
    from worker.spec import StudySpec

    study = StudySpec.model_validate(spec_data)
    arm = study.arms[0]
    rates = grid_values(study, study.arm_search_space(arm), arm.optimizer)["lr"]
    if len(rates) != study.budget.trials_per_arm:
        trials = study.budget.trials_per_arm
        raise SystemExit(f"ratebench's grid has {len(rates)} points for {trials} trials")
    return [float(r) for r in rates]


# -- child processes: `ratebench run` and the peers ------------------------------------------


def _child_main(runner: str, workdir: Path) -> int:
    """A peer's whole run in this process; its summary goes to stdout after RESULT_MARK."""
    work = json.loads((workdir / "workload.json").read_text())
    if runner == "optuna-warm":
        serve_warm_optuna(work)
        return 0
    if runner == "optuna":
        summary = run_optuna(work)
    elif runner == "ray-floor":
        summary = run_ray_floor()
    else:
        summary = run_ray_tune(work, workdir / "tune")
    print(RESULT_MARK + json.dumps(summary), flush=True)
    return 0


def _command(runner: str, work: dict[str, Any], workdir: Path) -> list[str]:
    """Write what `runner` reads into `workdir`; return its command line."""
    if runner in ("ratebench", "ratebench-no-cohorts", "ratebench-joined"):
        cohorts = runner != "ratebench-no-cohorts"
        (workdir / "spec.json").write_text(json.dumps(spec(work, cohorts=cohorts)))
        database = f"sqlite:///{workdir / 'ratebench.db'}"
        spec_file = str(workdir / "spec.json")
        return [sys.executable, "-m", "service.cli", "run", spec_file, "--database", database,
                "--json"]  # fmt: skip
    (workdir / "workload.json").write_text(json.dumps(work))
    return [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, runner, str(workdir)]


def _child_env(workdir: Path) -> dict[str, str]:
    """This environment, less anything that would join an existing Ray cluster; ratebench's
    data folder in the run's own directory, so nothing is written into the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS")}
    env["RATEBENCH_DATA_DIR"] = str(workdir / "data")
    env.pop("RATEBENCH_DATABASE_URL", None)
    return env


def _ratebench_arms(arms: list[dict[str, Any]], tried: dict[str, list[float]]) -> dict[str, Any]:
    """Per arm, from ratebench's leaderboard rows and the rates its sweeps tried."""
    return {
        row["arm"]: {
            "best_lr": row["best_lr"],
            "best_val_accuracy": row["best_sweep_value"],
            "final_val_accuracy": list(row["final_values"]),
            "tried_rates": sorted(tried.get(row["arm"], [])),
        }
        for row in arms
    }


def _tried_rates(url: str, study_key: str, labels: list[str]) -> dict[str, list[float]]:
    import optuna

    return {
        label: [
            float(t.params["lr"])
            for t in optuna.load_study(study_name=f"{study_key}/{label}", storage=url).trials
        ]
        for label in labels
    }


def _run_once(runner: str, work: dict[str, Any], service: _Service | None = None) -> dict[str, Any]:
    """One runner's run in a fresh process: its wall time and what it found. `service`: the
    running `ratebench serve` whose Ray runtime `ratebench-joined` joins (it reads the runtime's
    address from the service's data folder, as a `ratebench run` beside a service does)."""
    with tempfile.TemporaryDirectory(prefix="sweep_wall-") as tmp:
        workdir = Path(tmp)
        command, env = _command(runner, work, workdir), _child_env(workdir)
        if runner == "ratebench-joined":
            assert service is not None
            env["RATEBENCH_DATA_DIR"] = service.env["RATEBENCH_DATA_DIR"]
        # Output to files, not pipes: a daemon the child leaves behind could hold a pipe open.
        with open(workdir / "stdout", "w") as out, open(workdir / "stderr", "w") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True
            )
            returncode = proc.wait()
            wall = time.perf_counter() - started
        leftovers = in_session(proc.pid) if sys.platform == "linux" else []
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout = (workdir / "stdout").read_text()
        record: dict[str, Any] = {"wall_s": round(wall, 2), "leftover_processes": len(leftovers)}
        try:
            if returncode != 0:
                raise RuntimeError(f"exit code {returncode}")
            if runner == "ratebench-joined":
                first = (workdir / "stderr").read_text().splitlines()[0]
                if not first.startswith("joining the Ray runtime of ratebench serve"):
                    raise RuntimeError(f"it did not join the service's runtime: {first}")
            if runner.startswith("ratebench"):
                start = 0 if stdout.startswith("{") else stdout.index("\n{") + 1
                summary, _ = json.JSONDecoder().raw_decode(stdout[start:])
                url = f"sqlite:///{workdir / 'ratebench.db'}"
                labels = [a["label"] for a in work["arms"]]
                tried = _tried_rates(url, summary["study_key"], labels)
                record["arms"] = _ratebench_arms(summary["arms"], tried)
            else:
                line = [x for x in stdout.splitlines() if x.startswith(RESULT_MARK)][-1]
                record.update(json.loads(line[len(RESULT_MARK) :]))
        except Exception as exc:
            tail = (workdir / "stderr").read_text()[-1500:]
            return {"wall_s": None, "error": f"{runner}: {exc}; stderr tail: {tail}"}
    return record


# -- runners that stay up across rounds: a service, a warm Optuna process -------------------


class _Service:
    """`ratebench serve` on a fresh SQLite file, warmed by one tiny study, for every round."""

    def __init__(self, workdir: Path, work: dict[str, Any]) -> None:
        from _service import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workdir, self.work = workdir, work
        env = _child_env(workdir)
        env["RATEBENCH_RATE_LIMIT_PER_MINUTE"] = "0"  # its completion is polled every 0.1 s
        self.env = env
        log = (workdir / "serve.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        self.key = subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", "create", "--name", "bench"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        warm = spec(work, cohorts=True, name="warm-up")
        warm["arms"] = warm["arms"][:1]
        warm["budget"] = {"trials_per_arm": 2, "epochs": 1, "final_seeds": 1}
        self.run(warm)

    def run(self, study: dict[str, Any]) -> tuple[float, str]:
        import httpx

        deadline = time.monotonic() + 900
        while True:  # the service may still be starting
            try:
                started = time.perf_counter()
                posted = httpx.post(f"{self.base}/api/v1/studies", json=study, timeout=60,
                                    headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"the service did not start; see {self.workdir}") from None
                time.sleep(0.5)
        posted.raise_for_status()
        study_id: str = posted.json()["id"]
        while True:
            state = httpx.get(f"{self.base}/api/v1/studies/{study_id}", timeout=60).json()
            if state["status"] not in ("queued", "running"):
                wall = time.perf_counter() - started
                break
            time.sleep(SERVICE_POLL_S)
        if state["status"] != "completed":
            raise RuntimeError(f"study {study_id} ended {state['status']}: {state['error']}")
        return wall, study_id

    def measure(self, round_: int) -> dict[str, Any]:
        name = f"sweep-wall-{self.work['name']}-{self.work['n_rates']}-round-{round_}"
        wall, study_id = self.run(spec(self.work, cohorts=True, name=name))
        url = f"sqlite:///{self.workdir / 'data' / 'ratebench.db'}"
        labels = [a["label"] for a in self.work["arms"]]
        import httpx

        board = httpx.get(f"{self.base}/api/v1/studies/{study_id}/leaderboard", timeout=60).json()
        rows = [{**row, **row.get("details", {})} for row in board["arms"]]
        return {"wall_s": round(wall, 2), "leftover_processes": 0,
                "arms": _ratebench_arms(rows, _tried_rates(url, study_id, labels))}  # fmt: skip

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for pid in in_session(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _WarmOptuna:
    """One process that imported and warmed up, running a sweep per request."""

    def __init__(self, workdir: Path, work: dict[str, Any]) -> None:
        command = _command("optuna-warm", work, workdir)
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=_child_env(workdir), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self._answer()  # ready

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                answer: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
                return answer
        raise RuntimeError(f"optuna-warm ended (exit code {self.proc.wait()})")

    def measure(self, round_: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        started = time.perf_counter()
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        answer = self._answer()
        answer["wall_s"] = round(time.perf_counter() - started, 2)
        answer["leftover_processes"] = 0
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@contextlib.contextmanager
def _long_lived(runners: list[str], work: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The runners that stay up across the rounds, started (and warmed) before the first."""
    with tempfile.TemporaryDirectory(prefix="sweep_wall-up-") as tmp:
        up: dict[str, Any] = {}
        try:
            if any(name in runners for name in _NEEDS_SERVICE):
                (Path(tmp) / "service").mkdir()
                up["ratebench-service"] = _Service(Path(tmp) / "service", work)
            if "optuna-warm" in runners:
                (Path(tmp) / "optuna").mkdir()
                up["optuna-warm"] = _WarmOptuna(Path(tmp) / "optuna", work)
            yield up
        finally:
            for runner in up.values():
                runner.close()


# -- the parent: rounds, timing, the report ----------------------------------------------------

_FOUND = ("best_lr", "best_val_accuracy", "final_val_accuracy")


def _check_rates(record: dict[str, Any], work: dict[str, Any]) -> None:
    arms = record.get("arms")
    if arms is not None:
        grid = sorted(work["rates"])
        record["rates_match"] = all(a.pop("tried_rates", grid) == grid for a in arms.values())


def _summarise(work: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    runners: dict[str, Any] = {}
    for name, records in runs.items():
        ok = [r for r in records if r.get("wall_s") is not None]
        found = {
            label: {f: [r["arms"][label][f] for r in ok if "arms" in r] for f in _FOUND}
            for label in (a["label"] for a in work["arms"])
        }
        runners[name] = {
            "median_s": round(statistics.median(r["wall_s"] for r in ok), 1) if ok else None,
            "wall_s": [r.get("wall_s") for r in records],
            "arms": found if any(found[label]["best_lr"] for label in found) else None,
            "rates_match": all(r.get("rates_match", True) for r in ok),
            "leftover_processes": sum(r.get("leftover_processes", 0) for r in ok),
            "errors": [r["error"] for r in records if "error" in r],
        }
    ratios: dict[str, Any] = {}
    for baseline in BASELINES:
        if baseline not in runs:
            continue
        for name, records in runs.items():
            per_round = [
                round(r["wall_s"] / b["wall_s"], 3)
                for r, b in zip(records, runs[baseline], strict=True)
                if r.get("wall_s") and b.get("wall_s")
            ]
            if name != baseline and per_round:
                ratios.setdefault(f"vs_{baseline}", {})[name] = {
                    "median": round(statistics.median(per_round), 2),
                    "min": min(per_round),
                    "max": max(per_round),
                    "per_round": per_round,
                }
    return {"rates": work["rates"], "runners": runners, "ratios": ratios}


def _warm_data_cache(task: str, device: str) -> None:
    """Generate (once) and cache the task's data, so that no runner's first trial pays."""
    from worker.spec import DataOptions
    from worker.tasks import load_task_data

    load_task_data(task, DataOptions().model_dump(), device)


def measure(args: argparse.Namespace, n_rates: int) -> dict[str, Any]:
    work = workload(args, n_rates)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.runners}
    load_before = list(os.getloadavg())
    with _long_lived(args.runners, work) as up:
        for round_ in range(args.rounds):
            shift = round_ % len(args.runners)
            for name in args.runners[shift:] + args.runners[:shift]:
                try:
                    if name in up:
                        record = up[name].measure(round_)
                    else:
                        record = _run_once(name, work, up.get("ratebench-service"))
                except Exception as exc:  # recorded, and the other runners go on
                    record = {"wall_s": None, "error": f"{name}: {exc}"}
                _check_rates(record, work)
                runs[name].append(record)
                shown = record.get("wall_s") or record.get("error", "")[:200]
                print(f"{work['name']} rates={n_rates} round {round_ + 1} {name}: {shown}",
                      file=sys.stderr)  # fmt: skip
    return {
        "workload": work["name"],
        "n_rates": n_rates,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        **_summarise(work, runs),
    }


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("torch", "optuna", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _print_table(workloads: list[dict[str, Any]]) -> None:
    print(f"{'rates':>5} {'runner':<21} {'median s':>8}  {'vs optuna':<18} {'vs optuna-warm':<18}")
    for w in workloads:
        for name, r in w["runners"].items():
            cells = []
            for baseline in BASELINES:
                ratio = w["ratios"].get(f"vs_{baseline}", {}).get(name)
                cells.append(
                    f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
                    if ratio
                    else ("1" if name == baseline else "-")
                )
            median = "failed" if r["median_s"] is None else f"{r['median_s']:.1f}"
            print(f"{w['n_rates']:>5} {name:<21} {median:>8}  {cells[0]:<18} {cells[1]:<18}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return _child_main(argv[1], Path(argv[2]))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="mlp")
    parser.add_argument("--rates", type=int, nargs="+", help="default: 12 32 (mlp), 16 (cnn)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.rates is None:
        args.rates = [16] if args.workload == "cnn" else [12, 32]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    started = time.perf_counter()
    _warm_data_cache(WORKLOADS[args.workload]["task"], args.device)
    workloads = [measure(args, n) for n in args.rates]
    report = {
        "benchmark": "sweep_wall",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "seconds": round(time.perf_counter() - started, 1),
        "workloads": workloads,
    }
    _print_table(workloads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    failed = any(r["errors"] for w in workloads for r in w["runners"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
