"""The runners `bench/sweep_wall.py` times: each does the same workload with the same training
code (`worker.runner.run_trial` on the `TrialConfig` ratebench builds), in its own way.

A workload (plain JSON, `sweep_wall.workload`) has a task and model, arms (scheme and fixed
hyperparameters), ratebench's grid of learning rates, epochs, and final seeds. Every runner
trains every arm at every rate on seed 0 with `CONCURRENT` trials at a time, then retrains
each arm's best rate (best last-epoch validation accuracy, diverged runs excluded, first of
equals) on the final seeds 1, 2, …, also `CONCURRENT` at a time, with the test split. The
result, per arm: the best rate, its sweep accuracy, the final seeds' accuracies, the rates
tried.

- `optuna`: one study per arm, `GridSampler`, in-memory storage, `n_jobs=CONCURRENT`, in a
  fresh process (imports included in its time);
- `optuna-warm`: the same in a process that imported torch, Optuna and the trial code and ran
  one tiny trial first, as a notebook has: `serve_warm_optuna` reads a line per sweep from
  stdin and answers with the sweep's own time;
- `ray-tune`: a `Tuner` over `(arm, lr)`, `max_concurrent_trials=CONCURRENT`, Ray on 127.0.0.1;
- `ray-floor`: no sweep, only what any Ray-based runner pays first from a fresh process.

Scripts in bench/ run as `python bench/NAME.py`, so this module is imported as `_sweep_runners`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = [
    "CONCURRENT",
    "RESULT_MARK",
    "run_optuna",
    "run_ray_floor",
    "run_ray_tune",
    "serve_warm_optuna",
    "trial_config",
]

CONCURRENT = 2
RESULT_MARK = "SWEEP_WALL_RESULT "
SWEEP_SEED, FIRST_FINAL_SEED = 0, 1  # ratebench: `spec.seed` and `spec.seed + 1` onwards


def trial_config(workload: dict[str, Any], arm: dict[str, Any], lr: float, seed: int) -> Any:
    """The `TrialConfig` ratebench builds for an arm's trial at `lr` (the final seeds, seed
    >= 1, evaluate the test split)."""
    from worker.runner import TrialConfig
    from worker.spec import DataOptions, ModelOptions

    return TrialConfig(
        task=workload["task"],
        scheme=arm["scheme"],
        hyperparameters={**arm["fixed"], "lr": lr},
        epochs=workload["epochs"],
        data=DataOptions(batch_size=workload["batch_size"]),
        model=ModelOptions(**workload["model"]),
        seed=seed,
        device=workload["device"],
        objective="val_accuracy",
        evaluate_test=seed != SWEEP_SEED,
    )


def _best(results: list[tuple[float, Any]]) -> tuple[float, float]:
    """(best rate, its value): diverged runs excluded, the lowest rate first of equals."""
    ordered = sorted(results, key=lambda x: x[0])
    kept = [(lr, r) for lr, r in ordered if r.outcome != "diverged"] or ordered
    lr, result = max(kept, key=lambda x: x[1].value)  # max keeps the first of equals
    return lr, float(result.value)


def _finals(workload: dict[str, Any], best: dict[str, float]) -> dict[str, list[float]]:
    """Every arm's best rate retrained on the final seeds, `CONCURRENT` at a time."""
    from worker.runner import run_trial

    jobs = [
        (arm["label"], trial_config(workload, arm, best[arm["label"]], FIRST_FINAL_SEED + i))
        for arm in workload["arms"]
        for i in range(workload["final_seeds"])
    ]
    finals: dict[str, list[float]] = {arm["label"]: [] for arm in workload["arms"]}
    with ThreadPoolExecutor(CONCURRENT) as pool:
        for (label, _), result in zip(jobs, pool.map(lambda j: run_trial(j[1]), jobs), strict=True):
            finals[label].append(result.value)
    return finals


def run_optuna(workload: dict[str, Any]) -> dict[str, Any]:
    import optuna
    import torch

    from worker.runner import run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # the one core a trial gets elsewhere (Ray: OMP_NUM_THREADS=1)
    rates: list[float] = workload["rates"]
    arms: dict[str, Any] = {}
    for arm in workload["arms"]:
        results: list[tuple[float, Any]] = []

        def objective(
            trial: optuna.Trial,
            arm: dict[str, Any] = arm,
            results: list[tuple[float, Any]] = results,
        ) -> float:
            lr = trial.suggest_float("lr", min(rates), max(rates), log=True)
            result = run_trial(trial_config(workload, arm, lr, SWEEP_SEED))
            results.append((lr, result))
            return float(result.value)

        sampler = optuna.samplers.GridSampler({"lr": rates}, seed=SWEEP_SEED)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(objective, n_trials=len(rates), n_jobs=CONCURRENT)
        best_lr, best_value = _best(results)
        arms[arm["label"]] = {"best_lr": best_lr, "best_val_accuracy": best_value,
                              "tried_rates": sorted(lr for lr, _ in results)}  # fmt: skip
    finals = _finals(workload, {label: a["best_lr"] for label, a in arms.items()})
    for label, values in finals.items():
        arms[label]["final_val_accuracy"] = values
    return {"arms": arms}


def serve_warm_optuna(workload: dict[str, Any]) -> None:
    """`optuna-warm`: import and warm up, say so, then one sweep per line read from stdin,
    each answered with its summary and its own wall time."""
    import optuna  # noqa: F401
    import torch  # noqa: F401

    from worker.runner import run_trial

    arm = workload["arms"][0]
    warm = trial_config(workload, arm, workload["rates"][0], SWEEP_SEED)
    run_trial(dataclasses.replace(warm, epochs=1))  # data cached, kernels loaded
    print(RESULT_MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        started = time.perf_counter()
        summary = run_optuna(workload)
        summary["own_wall_s"] = round(time.perf_counter() - started, 2)
        print(RESULT_MARK + json.dumps(summary), flush=True)


def _tune_trainable(config: dict[str, Any], workload: dict[str, Any]) -> None:
    """One Ray Tune trial; its last report is ratebench's objective (0 when it diverged)."""
    from ray import tune

    from worker.runner import run_trial

    arm = workload["arms"][config["arm"]]
    result = run_trial(trial_config(workload, arm, config["lr"], SWEEP_SEED))
    tune.report({"objective": result.value, "diverged": int(result.outcome == "diverged")})


def run_ray_tune(workload: dict[str, Any], storage: Path) -> dict[str, Any]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1 (cluster.py)
    import ray
    import torch
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
            param_space={
                "arm": tune.grid_search(list(range(len(workload["arms"])))),
                "lr": tune.grid_search(workload["rates"]),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=CONCURRENT),
            run_config=tune.RunConfig(storage_path=str(storage), name="sweep"),
        )
        grid = tuner.fit()
        results = [grid[i] for i in range(len(grid))]
        errors = [str(r.error) for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} Tune trials failed; first: {errors[0][:500]}")
    finally:
        ray.shutdown()
    runs = [(r.config or {}, r.metrics or {}) for r in results]  # (arm, lr), its last report
    arms: dict[str, Any] = {}
    for index, arm in enumerate(workload["arms"]):
        mine = sorted((c["lr"], m) for c, m in runs if c.get("arm") == index)
        ok = [(lr, m) for lr, m in mine if not m.get("diverged")] or mine
        best_lr, best = max(ok, key=lambda x: x[1]["objective"])  # the lowest rate of equals
        arms[arm["label"]] = {
            "best_lr": float(best_lr),
            "best_val_accuracy": float(best["objective"]),
            "tried_rates": [float(lr) for lr, _ in mine],
        }
    torch.set_num_threads(1)
    finals = _finals(workload, {label: a["best_lr"] for label, a in arms.items()})
    for label, values in finals.items():
        arms[label]["final_val_accuracy"] = values
    return {"arms": arms}


def run_ray_floor() -> dict[str, Any]:
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
