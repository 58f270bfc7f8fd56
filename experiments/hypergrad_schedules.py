"""Learned per-layer learning-rate schedules vs the best constant rate, on mnist1d.

A ReLU MLP 40-100-100-10 trains for T steps of SGD with momentum 0.9 (batch 64, float64) on
3000 mnist1d training examples (`mnist1d.data.make_dataset(get_dataset_args())`, generated
offline); the other 1000 training examples are the validation set whose loss is minimised, and
mnist1d's 1000 test examples are only reported.

- hypergradient: `optim.hypergrad.tune` learns a schedule of `--blocks` blocks for each of the
  six tensors (weights and biases of three layers), starting from the constant rate at the
  geometric centre of the random-search range, for `--meta-iterations` meta-iterations
  (one training run and one reversed run each).
- random search: the same number of training runs, constant rates drawn log-uniformly from
  `--lr-range`; the best by validation loss wins.
Both use the same training seed (initial weights and mini-batches) while searching; both
winners are then re-trained with `--check-seeds` other seeds, a check that the schedule did
not merely fit one seed's noise. Writes docs/figures/hypergrad_schedules.{json,png}.
Run: `python experiments/hypergrad_schedules.py` (about 5-10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from optim.hypergrad import (
    Hyperparameters,
    MetaIteration,
    Problem,
    TrainingDivergedError,
    mlp_base_params,
    mlp_forward,
    mlp_loss,
    tune,
)
from optim.hypergrad.reversible import init_state, train_forward

SIZES = [40, 100, 100, 10]
MOMENTUM = 0.9


def load() -> dict[str, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, y = torch.tensor(data["x"]), torch.tensor(data["y"]).long()
    return {
        "train_x": x[:3000],
        "train_y": y[:3000],
        "val_x": x[3000:],
        "val_y": y[3000:],
        "test_x": torch.tensor(data["x_test"]),
        "test_y": torch.tensor(data["y_test"]).long(),
    }


def problem(data: dict[str, torch.Tensor], args: argparse.Namespace, seed: int) -> Problem:
    return Problem(
        base_params=mlp_base_params(SIZES, seed),
        loss=mlp_loss,
        train_x=data["train_x"],
        train_y=data["train_y"],
        val_x=data["val_x"],
        val_y=data["val_y"],
        steps=args.steps,
        batch_size=args.batch_size,
        seed=seed,
    )


def score(data: dict[str, torch.Tensor], p: Problem, hyper: Hyperparameters) -> dict[str, float]:
    """Train with `hyper`; validation and test loss and accuracy (inf loss when diverged)."""
    values = hyper.values()
    state = init_state(p, values)
    try:
        train_forward(p, values, state, p.steps)
    except TrainingDivergedError:
        return {"val_loss": math.inf, "test_loss": math.inf, "val_acc": 0.0, "test_acc": 0.0}
    w = state.weight_tensors()
    out = {}
    with torch.no_grad():
        for split in ("val", "test"):
            logits = mlp_forward(w, data[f"{split}_x"])
            out[f"{split}_loss"] = float(mlp_loss(w, data[f"{split}_x"], data[f"{split}_y"]))
            out[f"{split}_acc"] = float((logits.argmax(1) == data[f"{split}_y"]).double().mean())
    return out


def constant(lr: float, blocks: int) -> Hyperparameters:
    return Hyperparameters.constant(len(SIZES) * 2 - 2, blocks, lr=lr, momentum=MOMENTUM)


def run_hypergradient(data: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    start_lr = math.sqrt(args.lr_range[0] * args.lr_range[1])

    def report(m: MetaIteration) -> None:
        print(f"meta {m.index:3d}  val {m.val_loss:.4f}  {m.seconds:.1f}s", file=sys.stderr)

    started = time.perf_counter()
    result = tune(
        data["train_x"],
        data["train_y"],
        data["val_x"],
        data["val_y"],
        SIZES,
        steps=args.steps,
        batch_size=args.batch_size,
        meta_iterations=args.meta_iterations,
        meta_lr=args.meta_lr,
        seed=args.seed,
        blocks=args.blocks,
        learn=("lr",),
        lr=start_lr,
        momentum=MOMENTUM,
        callback=report,
    )
    return {
        "seconds": time.perf_counter() - started,
        "start_lr": start_lr,
        "history": [m.val_loss for m in result.history],
        "best_index": result.best.index,
        "schedule": result.schedule,
        "hyperparameters": result.hyperparameters,
    }


def run_random_search(data: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.search_seed)
    low, high = np.log(args.lr_range)
    rates = np.exp(rng.uniform(low, high, size=args.meta_iterations)).tolist()
    p = problem(data, args, args.seed)
    started = time.perf_counter()
    trials = []
    for lr in rates:
        val = score(data, p, constant(lr, 1))["val_loss"]
        print(f"random lr {lr:.4f}  val {val:.4f}", file=sys.stderr)
        trials.append({"lr": lr, "val_loss": val})
    best = min(trials, key=lambda t: t["val_loss"])
    return {"seconds": time.perf_counter() - started, "trials": trials, "best_lr": best["lr"]}


def summary(scores: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in scores[0]:
        values = [s[key] for s in scores]
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def plot(result: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.linspace(0, args.steps, args.blocks + 1)
    for name, rates in result["hypergradient"]["schedule"].items():
        left.stairs(rates, edges, label=name, linewidth=1.6, baseline=None)
    left.axhline(
        result["random_search"]["best_lr"], color="k", ls="--", lw=1, label="best constant"
    )
    left.set(
        yscale="log",
        xlabel="training step",
        ylabel="learning rate",
        title="learned schedule (momentum 0.9)",
    )
    left.legend(fontsize=7)
    runs = np.arange(1, args.meta_iterations + 1)
    hyper_best = np.minimum.accumulate(result["hypergradient"]["history"])
    random_best = np.minimum.accumulate([t["val_loss"] for t in result["random_search"]["trials"]])
    right.plot(runs, hyper_best, label="hypergradient (meta-iterations)")
    right.plot(runs, random_best, label="random search, constant rate")
    right.set(
        xlabel="training runs",
        ylabel="best validation loss so far",
        title=f"mnist1d MLP, T = {args.steps}",
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--meta-iterations", type=int, default=30)
    parser.add_argument("--meta-lr", type=float, default=0.1)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--lr-range", type=float, nargs=2, default=[0.01, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--check-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = {k: v.double() if v.is_floating_point() else v for k, v in load().items()}

    hyper = run_hypergradient(data, args)
    search = run_random_search(data, args)
    learned: Hyperparameters = hyper.pop("hyperparameters")
    best_constant = constant(search["best_lr"], args.blocks)
    final: dict[str, Any] = {}
    for name, h in (("hypergradient", learned), ("random_search", best_constant)):
        final[name] = {
            "search_seed": score(data, problem(data, args, args.seed), h),
            "other_seeds": summary(
                [score(data, problem(data, args, s), h) for s in range(1, args.check_seeds + 1)]
            ),
        }
    result = {
        "experiment": "hypergrad_schedules",
        "config": {
            **vars(args),
            "out_dir": str(args.out_dir),
            "sizes": SIZES,
            "momentum": MOMENTUM,
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "hypergradient": hyper,
        "random_search": search,
        "final": final,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "hypergrad_schedules.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args, args.out_dir / "hypergrad_schedules.png")
    print(json.dumps(final, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
