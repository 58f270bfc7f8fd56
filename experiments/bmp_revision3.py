"""bmp revision 3: the comparison of revision 2 redone as practitioners train, with a linear
warm-up, a cosine decay and weight decay, and the position-mean variant of `bmp` measured.

Arms (every task, the same learning-rate grid `--lrs`, the same budget and schedule):
- `sgd`: SGD, momentum 0.9, weight decay 5e-4 (coupled L2, as PyTorch's SGD);
- `bmp`, `bmp-local`: back-matching rates with `propagate` true / false, momentum 0.9,
  weight decay 5e-4, a convolution block's scalars summed over its output positions;
- `bmp-mean-positions`, `bmp-local-mean-positions`: the same with `mean_over_positions`
  (the scalars are means over output positions, read as samples like the batch);
- `adamw`: AdamW, decoupled weight decay 0.01 (PyTorch's default);
- `lars`: LARS, momentum 0.9, weight decay 5e-4.
Every arm trains with `{"name": "cosine", "warmup": 0.05}`: 5% of the steps of linear warm-up,
then a cosine decay to 0, scaling the scheme's global rate per optimizer step. Tasks, budgets
and protocol are revision 2's (`experiments/bmp_revision2.py`): each rate of the grid trained
with seed 100, the best (by final validation accuracy, diverged runs excluded) re-run on
`--seeds` fresh seeds with the test split evaluated; mean and 95% Student-t interval reported,
with each arm's training seconds per run. Where an arm's best rate is at an end of the grid,
the next half-decade beyond it is tried, up to `--max-extensions` times (`extend_grids`).
On `mnist1d-mlp` (no convolution) the position modes are the same optimizer; their rows are
a check that they agree.

Runs are independent, so `--workers` processes train them side by side (one thread each), and
each finished run is appended to `--cache` (JSON lines): an interrupted comparison resumes
where it stopped, and `--cached-only` prints the table from what is there.

    python experiments/bmp_revision3.py --workers 2          # the full comparison
    python experiments/bmp_revision3.py --smoke              # seconds: a wiring check only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bmp_revision2 import TASKS, add_protocol_arguments, interval  # same protocol

from worker.runner import TrialConfig, run_trial

_log = logging.getLogger("bmp_revision3")

WD = 5e-4
_BMP = {"momentum": 0.9, "weight_decay": WD}
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {"momentum": 0.9, "weight_decay": WD}),
    "bmp": ("bmp", {**_BMP, "propagate": True, "mean_over_positions": False}),
    "bmp-local": ("bmp", {**_BMP, "propagate": False, "mean_over_positions": False}),
    "bmp-mean-positions": ("bmp", {**_BMP, "propagate": True, "mean_over_positions": True}),
    "bmp-local-mean-positions": (
        "bmp",
        {**_BMP, "propagate": False, "mean_over_positions": True},
    ),
    "adamw": ("adamw", {"weight_decay": 0.01}),
    "lars": ("lars", {"momentum": 0.9, "weight_decay": WD}),
}
SCHEDULE = {"name": "cosine", "warmup": 0.05}
TUNE_SEED = 100

Job = tuple[str, str, float, int]  # task, arm, lr, seed


def _key(job: Job) -> str:
    task, arm, lr, seed = job
    return f"{task}|{arm}|{lr:.6g}|{seed}"


def _train(job: Job, epochs: int | None, batch: int, n_train: int | None) -> dict[str, Any]:
    """One run, as a JSON-safe record (the cache's line)."""
    torch.set_num_threads(1)
    task, arm, lr, seed = job
    scheme, fixed = ARMS[arm]
    data: dict[str, Any] = {"batch_size": batch}
    if n_train:
        data["n_train"] = n_train
    r = run_trial(
        TrialConfig(
            task=task,
            scheme=scheme,
            hyperparameters={**fixed, "lr": lr},
            epochs=epochs or TASKS[task]["epochs"],
            data=data,
            model=dict(TASKS[task]["model"]),
            schedule=dict(SCHEDULE),
            seed=seed,
            device="cpu",
            evaluate_test=seed != TUNE_SEED,
        )
    )
    ok = r.outcome == "complete" and math.isfinite(r.value)
    return {
        "key": _key(job),
        "outcome": r.outcome,
        "val_accuracy": r.value if ok else None,
        "test_accuracy": r.test_accuracy,
        "train_seconds": round(r.wall_time, 3),
    }


class Runs:
    """The finished runs, read from and appended to the cache file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done[row["key"]] = row

    def run(self, jobs: list[Job], args: argparse.Namespace) -> None:
        todo = [j for j in jobs if _key(j) not in self.done]
        if not todo or args.cached_only:
            return
        _log.info("%d runs to train (%d cached)", len(todo), len(jobs) - len(todo))
        with ProcessPoolExecutor(args.workers) as pool, self.path.open("a") as out:
            futures = [pool.submit(_train, j, args.epochs, args.batch, args.n_train) for j in todo]
            for future in futures:
                row = future.result()
                self.done[row["key"]] = row
                out.write(json.dumps(row) + "\n")
                out.flush()
                _log.info("%s %s %s", row["key"], row["outcome"], row["val_accuracy"])


def _grid(runs: Runs, task: str, arm: str, lrs: list[float]) -> list[float]:
    """The arm's rates: the common grid and the half-decade steps beyond it that were run."""
    extra = set()
    for key in runs.done:
        t, a, lr, seed = key.split("|")
        if (t, a, int(seed)) == (task, arm, TUNE_SEED):
            extra.add(float(lr))
    known = {f"{lr:.6g}" for lr in lrs}
    return sorted([*lrs, *(lr for lr in extra if f"{lr:.6g}" not in known)])


def extend_grids(runs: Runs, args: argparse.Namespace) -> None:
    """Where an arm's best rate is at an end of the grid, try the next half-decade beyond it,
    and again, until the best is inside (or `--max-extensions` steps were added): a best rate
    at the grid's edge may not be the arm's best rate."""
    for _ in range(args.max_extensions):
        jobs: list[Job] = []
        for task in args.tasks:
            for arm in args.arms:
                grid = _grid(runs, task, arm, args.lrs)
                best = _best_lr(runs, task, arm, grid)
                if best is None:
                    continue
                if math.isclose(best, grid[-1]):
                    jobs.append((task, arm, float(f"{best * 10**0.5:.6g}"), TUNE_SEED))
                elif math.isclose(best, grid[0]):
                    jobs.append((task, arm, float(f"{best / 10**0.5:.6g}"), TUNE_SEED))
        if not jobs:
            return
        runs.run(jobs, args)


def _best_lr(runs: Runs, task: str, arm: str, lrs: list[float]) -> float | None:
    sweep = [(runs.done.get(_key((task, arm, lr, TUNE_SEED))), lr) for lr in lrs]
    usable = [(r["val_accuracy"], lr) for r, lr in sweep if r and r["val_accuracy"] is not None]
    return max(usable, key=lambda u: u[0])[1] if usable else None  # a tie: the lower rate


def summarise(runs: Runs, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for task in args.tasks:
        results[task] = {}
        for arm in args.arms:
            grid = _grid(runs, task, arm, args.lrs)
            sweep = [runs.done.get(_key((task, arm, lr, TUNE_SEED))) for lr in grid]
            row: dict[str, Any] = {
                "sweep": [
                    {
                        "lr": lr,
                        "val_accuracy": r["val_accuracy"] if r else None,
                        "outcome": r["outcome"] if r else "missing",
                    }
                    for lr, r in zip(grid, sweep, strict=True)
                ],
                "best_lr": _best_lr(runs, task, arm, grid),
            }
            finals = [
                runs.done.get(_key((task, arm, row["best_lr"], seed))) for seed in range(args.seeds)
            ]
            if row["best_lr"] is not None and all(finals):
                values = [f["val_accuracy"] or 0.0 for f in finals if f]
                tests = [f["test_accuracy"] or 0.0 for f in finals if f]
                val, test = interval(values), interval(tests)
                row["val_accuracy"] = {"mean": val[0], "ci95": val[1], "values": values}
                row["test_accuracy"] = {"mean": test[0], "ci95": test[1], "values": tests}
                row["train_seconds_per_run"] = round(
                    sum(f["train_seconds"] for f in finals if f) / len(finals), 2
                )
            results[task][arm] = row
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| task | arm | best lr | val accuracy (5 seeds, 95% CI) | test accuracy | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for task, arms in results.items():
        for arm, row in arms.items():
            if "val_accuracy" not in row:
                lines.append(f"| {task} | {arm} | {row['best_lr']} | (not finished) | | |")
                continue
            v, t = row["val_accuracy"], row["test_accuracy"]
            lines.append(
                f"| {task} | `{arm}` | {row['best_lr']:.3g} | {v['mean']:.4f} ± {v['ci95']:.4f}"
                f" | {t['mean']:.4f} ± {t['ci95']:.4f} | {row['train_seconds_per_run']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_protocol_arguments(parser, list(ARMS))
    parser.add_argument(
        "--max-extensions",
        type=int,
        default=3,
        help="half-decade steps added beyond a grid whose best rate is at an end",
    )
    parser.add_argument("--workers", type=int, default=2, help="runs trained side by side")
    parser.add_argument("--cache", type=Path, default=Path("bmp_revision3_runs.jsonl"))
    parser.add_argument("--cached-only", action="store_true", help="train nothing: the table")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    smoke = "1 epoch, 2 rates, 2 seeds, 300 examples: checks the wiring"
    parser.add_argument("--smoke", action="store_true", help=smoke)
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.lrs, args.seeds, args.n_train = 1, [0.01, 0.1], 2, 300
        args.out = Path("/tmp/bmp_revision3_smoke")
        args.cache = args.out / "runs.jsonl"
        args.out.mkdir(parents=True, exist_ok=True)
        args.cache.unlink(missing_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    runs = Runs(args.cache)
    runs.run([(t, a, lr, TUNE_SEED) for t in args.tasks for a in args.arms for lr in args.lrs],
             args)  # fmt: skip
    extend_grids(runs, args)
    finals: list[Job] = []
    for task in args.tasks:
        for arm in args.arms:
            lr = _best_lr(runs, task, arm, _grid(runs, task, arm, args.lrs))
            if lr is not None:
                finals += [(task, arm, lr, seed) for seed in range(args.seeds)]
    runs.run(finals, args)
    results = summarise(runs, args)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "workers": args.workers, "threads": 1},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "schedule": SCHEDULE,
        "arms": {arm: {"scheme": s, "fixed": f} for arm, (s, f) in ARMS.items()},
        "seconds_this_invocation": round(time.perf_counter() - start, 1),
        "results": results,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bmp_revision3.json").write_text(json.dumps(report, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
