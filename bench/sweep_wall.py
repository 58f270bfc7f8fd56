"""Wall time of one learning-rate sweep through ratebench, plain Optuna and Ray Tune.

Four runners do the same work with the same training code (a fifth measures Ray's own floor),
`worker.runner.run_trial` on a `worker.runner.TrialConfig` (what every ratebench trial runs):
task `mnist1d-mlp` with the model and batch size of `examples/mnist1d-mlp-lr.json` (width 256,
depth 2, batch 100), SGD with momentum 0.9, a grid of `--rates` learning rates log-spaced from
1e-3 to 1, `--epochs` epochs each, two trials at a time on one CPU each (`--device cuda`: half
a GPU each), no pruning, the objective the last epoch's validation accuracy (a diverged trial
counts 0):

- `ratebench`: `ratebench run SPEC --database sqlite:///<fresh file> --json` with
  `sampler: grid`, `resources.cohort_size: "auto"` (the default: trials batched into cohorts);
- `ratebench-no-cohorts`: the same with `cohort_size: 1` (one trial per Ray task);
- `optuna`: `study.optimize(objective, n_trials=N, n_jobs=2)` with a `GridSampler` over the
  same rates and in-memory storage, the objective calling `run_trial` (torch on one thread:
  the one core a trial gets elsewhere, where Ray sets `OMP_NUM_THREADS=1`);
- `ray-tune`: a `Tuner` with `tune.grid_search` over the rates, `max_concurrent_trials=2`,
  each trial calling `run_trial` (resources `{"cpu": 1}`, `--device cuda`: `"gpu": 0.5`), Ray
  on 127.0.0.1, results under a temporary `storage_path`;
- `ray-floor`: no sweep at all, only the fixed cost any runner built on Ray pays before its
  first trial: a local runtime started as `ratebench run` starts it (`worker.cluster.connect`),
  two workers that import the trial code (torch), and Ray's shutdown. Its ratio to `optuna`
  is the least a Ray-based runner can reach on this workload from a fresh process.

The rates are ratebench's own grid points (`worker.arms.sampling.grid_values`, which spaces
`trials_per_arm` points evenly on the log scale) and are fed to the peers as they are; every
ratebench run's tried rates are read back from its database and checked against them. ratebench
always retrains the best rate on at least one final seed (`budget.final_seeds >= 1`; here 1,
seed 1, with the test split evaluated), so after their sweep the peers retrain their best rate
once the same way, in their driver process. Every trial of a sweep trains on seed 0, as
ratebench's do.

Each runner runs in a fresh subprocess, timed from its start to its exit: imports, Ray's
start and shutdown and the storage are in the wall time, as a user sees them. The mnist1d
cache (`~/.cache/ratebench`) is filled before the first round, so no runner pays for
generating the data. A round runs all runners, in an order that rotates every round. Reported
per workload (number of rates): each runner's median wall time, the median over rounds of the
per-round ratio runner / `optuna` with its min and max, each runner's best rate, best sweep
validation accuracy and final-seed accuracies, the cores and the load average before and
after. The same science: on CPU a trial is deterministic where it has a process to itself
(ratebench without cohorts, Ray Tune); a cohort's batched arithmetic may differ in the last
bits; and Optuna's `n_jobs` threads share torch's global random generator, so two trials
that build their models at once can interleave their draws of initial weights (seeded by
`torch.manual_seed`), and its accuracies can differ from run to run.

Usage: python bench/sweep_wall.py [--rates 12 32] [--epochs 10] [--rounds 3]
[--device cpu|cuda] [--runners ratebench ratebench-no-cohorts optuna ray-tune ray-floor]
[--out FILE]
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("ratebench", "ratebench-no-cohorts", "optuna", "ray-tune", "ray-floor")
BASELINE = "optuna"
CHILD_FLAG = "--child"
RESULT_MARK = "SWEEP_WALL_RESULT "
TASK, SCHEME, MOMENTUM = "mnist1d-mlp", "sgd", 0.9
LR_LOW, LR_HIGH = 1e-3, 1.0
CONCURRENT = 2
SWEEP_SEED, FINAL_SEED = 0, 1  # ratebench: `spec.seed` for the sweep, `spec.seed + 1` first final


# -- the workload ------------------------------------------------------------------------------


def _workload(args: argparse.Namespace, n_rates: int) -> dict[str, Any]:
    """Everything a runner needs, as plain JSON: the rates are ratebench's grid points."""
    workload: dict[str, Any] = {
        "n_rates": n_rates,
        "epochs": args.epochs,
        "device": args.device,
        "width": args.width,
        "depth": args.depth,
        "batch_size": args.batch_size,
    }
    workload["rates"] = _ratebench_grid(_spec(workload, cohorts=True))
    return workload


def _spec(workload: dict[str, Any], *, cohorts: bool) -> dict[str, Any]:
    """The `ratebench run` spec of the workload."""
    cuda = workload["device"] == "cuda"
    return {
        "name": f"sweep-wall-{workload['n_rates']}",
        "task": TASK,
        "data": {"batch_size": workload["batch_size"]},
        "model": {"width": workload["width"], "depth": workload["depth"]},
        "arms": [{"optimizer": SCHEME, "fixed": {"momentum": MOMENTUM}}],
        "search_space": {"lr": {"low": LR_LOW, "high": LR_HIGH, "log": True}},
        "budget": {
            "trials_per_arm": workload["n_rates"],
            "epochs": workload["epochs"],
            "final_seeds": 1,
        },
        "sampler": "grid",
        "pruner": "none",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "resources": {
            "cpus_per_trial": 1,
            "gpus_per_trial": 0.5 if cuda else 0,
            "max_concurrent_trials": CONCURRENT,
            "device": workload["device"],
            "cohort_size": "auto" if cohorts else 1,
        },
    }


def _ratebench_grid(spec_data: dict[str, Any]) -> list[float]:
    """The learning rates ratebench's grid sampler runs for this spec."""
    from worker.arms.sampling import grid_values
    from worker.spec import StudySpec

    spec = StudySpec.model_validate(spec_data)
    arm = spec.arms[0]
    rates = grid_values(spec, spec.arm_search_space(arm), arm.optimizer)["lr"]
    if len(rates) != spec.budget.trials_per_arm:
        trials = spec.budget.trials_per_arm
        raise SystemExit(f"ratebench's grid has {len(rates)} points for {trials} trials")
    return [float(r) for r in rates]


def _trial_config(workload: dict[str, Any], lr: float, *, final: bool = False) -> Any:
    """The `TrialConfig` ratebench builds for this workload's trial at `lr`."""
    from worker.runner import TrialConfig
    from worker.spec import DataOptions, ModelOptions

    return TrialConfig(
        task=TASK,
        scheme=SCHEME,
        hyperparameters={"momentum": MOMENTUM, "lr": lr},
        epochs=workload["epochs"],
        data=DataOptions(batch_size=workload["batch_size"]),
        model=ModelOptions(width=workload["width"], depth=workload["depth"]),
        seed=FINAL_SEED if final else SWEEP_SEED,
        device=workload["device"],
        objective="val_accuracy",
        evaluate_test=final,
    )


def _final(workload: dict[str, Any], best_lr: float) -> dict[str, Any]:
    """The best rate retrained on the final seed, in this process (one torch thread)."""
    import torch

    from worker.runner import run_trial

    torch.set_num_threads(1)
    result = run_trial(_trial_config(workload, best_lr, final=True))
    return {"final_val_accuracy": result.value, "final_test_accuracy": result.test_accuracy}


# -- the peers, each in its own child process --------------------------------------------------


def _run_optuna(workload: dict[str, Any]) -> dict[str, Any]:
    import optuna
    import torch

    from worker.runner import run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    rates: list[float] = workload["rates"]

    class Reporter:
        def __init__(self, trial: optuna.Trial) -> None:
            self.trial = trial

        def report(self, epoch: int, value: float) -> bool:
            self.trial.report(value, epoch)
            return False  # no pruning

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", min(rates), max(rates), log=True)
        result = run_trial(_trial_config(workload, lr), Reporter(trial))
        trial.set_user_attr("outcome", result.outcome)
        return result.value

    sampler = optuna.samplers.GridSampler({"lr": rates}, seed=SWEEP_SEED)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=len(rates), n_jobs=CONCURRENT)
    done = [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["outcome"] != "diverged"
    ]
    best = min(done, key=lambda t: (-float(t.value or 0.0), t.number))  # first of equals
    return {
        "best_lr": best.params["lr"],
        "best_val_accuracy": best.value,
        "tried_rates": sorted(t.params["lr"] for t in study.trials),
        "n_diverged": sum(t.user_attrs.get("outcome") == "diverged" for t in study.trials),
        **_final(workload, best.params["lr"]),
    }


def _tune_trainable(config: dict[str, Any], workload: dict[str, Any]) -> None:
    """One Ray Tune trial: `run_trial` at `config["lr"]`, its objective reported every epoch
    (and once more, as 0, when it diverged: ratebench's value for a diverged trial)."""
    from ray import tune

    from worker.runner import run_trial

    class Reporter:
        def report(self, epoch: int, value: float) -> bool:
            tune.report({"epoch": epoch, "objective": value})
            return False  # no pruning

    result = run_trial(_trial_config(workload, config["lr"]), Reporter())
    if result.outcome == "diverged":
        tune.report({"epoch": len(result.history) + 1, "objective": result.value, "diverged": 1})


def _run_ray_tune(workload: dict[str, Any], storage: Path) -> dict[str, Any]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1 (cluster.py)
    import ray
    from ray import tune

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        resources: dict[str, float] = {"cpu": 1}
        if workload["device"] == "cuda":
            resources["gpu"] = 0.5
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(_tune_trainable, workload=workload), resources
            ),
            param_space={"lr": tune.grid_search(workload["rates"])},
            tune_config=tune.TuneConfig(max_concurrent_trials=CONCURRENT),
            run_config=tune.RunConfig(storage_path=str(storage), name="sweep"),
        )
        results = tuner.fit()
        best = results.get_best_result(metric="objective", mode="max", scope="last")
        assert best.config is not None and best.metrics is not None
        best_lr = float(best.config["lr"])
        trials = [results[i] for i in range(len(results))]
        tried = sorted(float(r.config["lr"]) for r in trials if r.config is not None)
        errors = [str(r.error) for r in trials if r.error is not None]
        diverged = sum(bool((r.metrics or {}).get("diverged")) for r in trials)
        if errors:
            raise RuntimeError(f"{len(errors)} Tune trials failed; first: {errors[0][:500]}")
    finally:
        ray.shutdown()
    return {
        "best_lr": best_lr,
        "best_val_accuracy": float(best.metrics["objective"]),
        "tried_rates": tried,
        "n_diverged": diverged,
        **_final(workload, best_lr),
    }


def _run_ray_floor() -> dict[str, Any]:
    """Ray's fixed cost and nothing else: a local runtime joined as `ratebench run` joins it,
    `CONCURRENT` workers importing the trial code (each trial's first cost), then shutdown."""
    import ray

    from worker import cluster

    cluster.connect(None)
    try:

        @ray.remote(num_cpus=1)
        def import_trial_code() -> int:
            import worker.runner  # noqa: F401  torch and everything a trial runs

            return os.getpid()

        pids = ray.get([import_trial_code.remote() for _ in range(CONCURRENT)])
    finally:
        ray.shutdown()
    return {"workers": len(set(pids))}


def _child_main(runner: str, workdir: Path) -> int:
    """A peer's whole sweep in this process; its summary goes to stdout after RESULT_MARK."""
    workload = json.loads((workdir / "workload.json").read_text())
    if runner == "optuna":
        summary = _run_optuna(workload)
    elif runner == "ray-floor":
        summary = _run_ray_floor()
    else:
        summary = _run_ray_tune(workload, workdir / "tune")
    print(RESULT_MARK + json.dumps(summary), flush=True)
    return 0


# -- the parent: rounds, timing, the report ----------------------------------------------------


def _command(runner: str, workload: dict[str, Any], workdir: Path) -> list[str]:
    """Write what `runner` reads into `workdir`; return its command line."""
    if runner.startswith("ratebench"):
        spec = _spec(workload, cohorts=runner == "ratebench")
        (workdir / "spec.json").write_text(json.dumps(spec, indent=2))
        database = f"sqlite:///{workdir / 'ratebench.db'}"
        spec_file = str(workdir / "spec.json")
        return [
            sys.executable,
            "-m",
            "service.cli",
            "run",
            spec_file,
            "--database",
            database,
            "--json",
        ]
    (workdir / "workload.json").write_text(json.dumps(workload))
    return [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, runner, str(workdir)]


def _child_env(workdir: Path) -> dict[str, str]:
    """This environment, less anything that would join an existing Ray cluster; ratebench's
    data folder in the run's own directory, so nothing is written into the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS")}
    env["RATEBENCH_DATA_DIR"] = str(workdir / "data")
    env.pop("RATEBENCH_DATABASE_URL", None)
    return env


def _session_leftovers(session: int) -> list[int]:
    """Processes still in the child's session after it exited (Ray daemons it left behind)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session:  # after the name: state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def _ratebench_summary(out: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Best rate and accuracies from `ratebench run --json`, the tried rates from its database."""
    import optuna

    arm = out["arms"][0]
    url = f"sqlite:///{workdir / 'ratebench.db'}"
    sweep_name = f"{out['study_key']}/{arm['arm']}"
    study = optuna.load_study(study_name=sweep_name, storage=url)
    return {
        "best_lr": arm["best_lr"],
        "best_val_accuracy": arm["best_sweep_value"],
        "tried_rates": sorted(float(t.params["lr"]) for t in study.trials),
        "n_diverged": arm["n_diverged"],
        "final_val_accuracy": arm["final_values"][0] if arm["final_values"] else None,
        "final_test_accuracy": arm["test_accuracy_mean"],
    }


def _run_once(runner: str, workload: dict[str, Any]) -> dict[str, Any]:
    """One runner's sweep in a fresh process: its wall time and what it found."""
    with tempfile.TemporaryDirectory(prefix="sweep_wall-") as tmp:
        workdir = Path(tmp)
        command, env = _command(runner, workload, workdir), _child_env(workdir)
        # Output to files, not pipes: a daemon the child leaves behind could hold a pipe open.
        with open(workdir / "stdout", "w") as out, open(workdir / "stderr", "w") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True
            )
            returncode = proc.wait()
            wall = time.perf_counter() - started
        leftovers = _session_leftovers(proc.pid) if sys.platform == "linux" else []
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout = (workdir / "stdout").read_text()
        record: dict[str, Any] = {"wall_s": round(wall, 2), "leftover_processes": len(leftovers)}
        try:
            if returncode != 0:
                raise RuntimeError(f"exit code {returncode}")
            if runner.startswith("ratebench"):
                start = 0 if stdout.startswith("{") else stdout.index("\n{") + 1
                summary, _ = json.JSONDecoder().raw_decode(stdout[start:])
                record.update(_ratebench_summary(summary, workdir))
            else:
                line = [x for x in stdout.splitlines() if x.startswith(RESULT_MARK)][-1]
                record.update(json.loads(line[len(RESULT_MARK) :]))
        except Exception as exc:
            tail = (workdir / "stderr").read_text()[-1500:]
            return {"wall_s": None, "error": f"{runner}: {exc}; stderr tail: {tail}"}
    if "tried_rates" in record:  # every runner but the floor, which runs no sweep
        record["rates_match"] = record.pop("tried_rates") == sorted(workload["rates"])
    return record


_FOUND = (
    "best_lr",
    "best_val_accuracy",
    "final_val_accuracy",
    "final_test_accuracy",
    "n_diverged",
)


def _summarise(workload: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    runners: dict[str, Any] = {}
    for name, records in runs.items():
        ok = [r for r in records if r.get("wall_s") is not None]
        runners[name] = {
            "median_s": round(statistics.median(r["wall_s"] for r in ok), 1) if ok else None,
            "wall_s": [r.get("wall_s") for r in records],
            **{
                field: sorted({r[field] for r in ok if field in r})
                for field in _FOUND  # none for the floor, which runs no sweep
            },
            "rates_match": all(r.get("rates_match", True) for r in ok),
            "leftover_processes": sum(r["leftover_processes"] for r in ok),
            "errors": [r["error"] for r in records if "error" in r],
        }
    ratios: dict[str, Any] = {}
    if BASELINE in runs:
        for name, records in runs.items():
            if name == BASELINE:
                continue
            per_round = [
                round(r["wall_s"] / b["wall_s"], 3)
                for r, b in zip(records, runs[BASELINE], strict=True)
                if r.get("wall_s") and b.get("wall_s")
            ]
            if per_round:
                ratios[name] = {
                    "median": round(statistics.median(per_round), 2),
                    "min": min(per_round),
                    "max": max(per_round),
                    "per_round": per_round,
                }
    return {"rates": workload["rates"], "runners": runners, f"ratio_vs_{BASELINE}": ratios}


def _warm_data_cache(device: str) -> None:
    """Generate (once) and cache mnist1d, so that no runner's first trial pays for it."""
    from worker.spec import DataOptions
    from worker.tasks import load_task_data

    load_task_data(TASK, DataOptions().model_dump(), device)


def measure(args: argparse.Namespace, n_rates: int) -> dict[str, Any]:
    workload = _workload(args, n_rates)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.runners}
    load_before = list(os.getloadavg())
    for round_ in range(args.rounds):
        shift = round_ % len(args.runners)
        for name in args.runners[shift:] + args.runners[:shift]:
            record = _run_once(name, workload)
            runs[name].append(record)
            shown = record.get("wall_s") or record.get("error", "")[:200]
            print(f"rates={n_rates} round {round_ + 1} {name}: {shown}", file=sys.stderr)
    return {
        "n_rates": n_rates,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        **_summarise(workload, runs),
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
    print(f"{'rates':>5} {'runner':<21} {'median s':>8}  {'ratio vs optuna':<18} best lr, val acc")
    for w in workloads:
        ratios = w[f"ratio_vs_{BASELINE}"]
        for name, r in w["runners"].items():
            ratio = ratios.get(name)
            shown = (
                f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
                if ratio
                else ("1" if name == BASELINE else "-")
            )
            best = ", ".join(f"{v:.4g}" for v in r["best_lr"])
            acc = ", ".join(f"{v:.4f}" for v in r["best_val_accuracy"])
            median = "failed" if r["median_s"] is None else f"{r['median_s']:.1f}"
            print(f"{w['n_rates']:>5} {name:<21} {median:>8}  {shown:<18} {best}, {acc}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return _child_main(argv[1], Path(argv[2]))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[12, 32])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    started = time.perf_counter()
    _warm_data_cache(args.device)
    workloads = [measure(args, n) for n in args.rates]
    report = {
        "benchmark": "sweep_wall",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "workload": f"{TASK}, sgd momentum {MOMENTUM}, lr {LR_LOW:g}..{LR_HIGH:g} log grid, "
        f"{CONCURRENT} trials at a time, 1 final seed, no pruning",
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
