"""bmp revision 2 against SGD and Adam: is the back-matching paper's gain on normalised VGG
networks reproduced at CPU scale, and which `propagate` setting wins where?

Arms (every task, the same learning-rate grid `--lrs`, the same budget):
- `sgd`: SGD with momentum 0.9;
- `bmp`: back-matching layer-wise rates, momentum 0.9, `propagate=true` (the product of
  `1/s_z` over the blocks above);
- `bmp-local`: the same with `propagate=false` (each block's own `1/s_W`);
- `adam`: Adam with PyTorch's defaults.
Tasks: `mnist1d-cnn` (the VGG-style Conv1d+BatchNorm network), `digits-vgg` (VGG13-BN shape,
width 8, on scikit-learn's 8×8 digits) and `mnist1d-mlp` (2×128 ReLU), trained by
`worker.runner.run_trial`, the code a study's trials run.

Protocol: for each task and arm, every rate of the grid is trained with seed 100; the rate with
the best final validation accuracy (diverged runs excluded) is re-run on `--seeds` fresh seeds
(0, 1, …) with the test split evaluated. Reported per task and arm: best rate, mean validation
and test accuracy over the final seeds with a 95% Student-t interval, and for the bmp arms the
spread of the weight tensors' factors (log10 of max/min over tensors of two or more
dimensions) at the end of the first and of the last epoch of the final seeds. Writes
`bmp_revision2.json` into `--out` and `bmp_revision2_factors.png` (every weight tensor's
factor per epoch, first final seed, bmp arms) into `--figures`, and prints the summary.

    python experiments/bmp_revision2.py                      # the full comparison
    python experiments/bmp_revision2.py --smoke              # seconds: a wiring check only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from worker.runner import TrialConfig, TrialResult, run_trial

_log = logging.getLogger("bmp_revision2")

ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {"momentum": 0.9}),
    "bmp": ("bmp", {"momentum": 0.9, "propagate": True, "mean_over_positions": False}),
    "bmp-local": ("bmp", {"momentum": 0.9, "propagate": False, "mean_over_positions": False}),
    "adam": ("adam", {}),
}
TASKS: dict[str, dict[str, Any]] = {
    "mnist1d-cnn": {"model": {"width": 32, "depth": 3}, "epochs": 20},
    "digits-vgg": {"model": {"width": 8}, "epochs": 20},
    "mnist1d-mlp": {"model": {"width": 128, "depth": 2}, "epochs": 20},
}
DEFAULT_LRS = [10 ** (k / 2) for k in range(-8, 1)]  # 1e-4 … 1, half-decade steps
TUNE_SEED = 100


def _train(task: str, arm: str, lr: float, seed: int, args: argparse.Namespace) -> TrialResult:
    scheme, fixed = ARMS[arm]
    data: dict[str, Any] = {"batch_size": args.batch}
    if args.n_train:
        data["n_train"] = args.n_train
    config = TrialConfig(
        task=task,
        scheme=scheme,
        hyperparameters={**fixed, "lr": lr},
        epochs=args.epochs or TASKS[task]["epochs"],
        data=data,
        model=dict(TASKS[task]["model"]),
        seed=seed,
        device="cpu",
        evaluate_test=seed != TUNE_SEED,
    )
    return run_trial(config)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * sem


def _spreads(result: TrialResult, weights: set[str]) -> list[float]:
    """Per epoch: log10(max/min) of the factors of the weight tensors (two or more dims)."""
    if result.layer_factors is None:
        return []
    names = result.layer_factors["names"]
    out = []
    for row in result.layer_factors["values"]:
        values = [v for n, v in zip(names, row, strict=True) if n in weights and v]
        out.append(math.log10(max(values) / min(values)) if values else math.nan)
    return out


def _weight_names(task: str) -> set[str]:
    from worker.tasks import build_model, get_task

    info = get_task(task)
    model = build_model(info.model.name, info.input_shape({}), info.n_classes({}),
                        **TASKS[task]["model"])  # fmt: skip
    return {n for n, p in model.named_parameters() if p.dim() > 1}


def run_arm(task: str, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    sweep = []
    for lr in args.lrs:
        r = _train(task, arm, lr, TUNE_SEED, args)
        ok = r.outcome == "complete" and math.isfinite(r.value)
        sweep.append({"lr": lr, "val_accuracy": r.value if ok else None, "outcome": r.outcome})
        _log.info("%s %s lr=%.3g %s %.4f", task, arm, lr, r.outcome, r.value)
    usable = [s for s in sweep if s["val_accuracy"] is not None]
    if not usable:
        return {"sweep": sweep, "best_lr": None}
    best = max(usable, key=lambda s: s["val_accuracy"])
    weights = _weight_names(task)
    finals = [_train(task, arm, best["lr"], seed, args) for seed in range(args.seeds)]
    val = interval([r.value for r in finals])
    test = interval([r.test_accuracy or 0.0 for r in finals])
    spreads = [_spreads(r, weights) for r in finals]
    row: dict[str, Any] = {
        "sweep": sweep,
        "best_lr": best["lr"],
        "val_accuracy": {"mean": val[0], "ci95": val[1], "values": [r.value for r in finals]},
        "test_accuracy": {
            "mean": test[0],
            "ci95": test[1],
            "values": [r.test_accuracy for r in finals],
        },
        "seconds_per_run": float(np.mean([r.wall_time + r.setup_time for r in finals])),
    }
    if spreads and spreads[0]:
        row["factor_spread_decades"] = {
            "first_epoch": float(np.mean([s[0] for s in spreads])),
            "last_epoch": float(np.mean([s[-1] for s in spreads])),
            "max": float(max(max(s) for s in spreads)),
        }
        row["factors_first_seed"] = finals[0].layer_factors
    return row


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    bmp_arms = [a for a in ARMS if ARMS[a][0] == "bmp"]
    fig, axes = plt.subplots(len(bmp_arms), len(tasks), figsize=(4.5 * len(tasks), 7),
                             squeeze=False)  # fmt: skip
    for j, task in enumerate(tasks):
        weights = _weight_names(task)
        for i, arm in enumerate(bmp_arms):
            ax = axes[i][j]
            factors = results[task].get(arm, {}).get("factors_first_seed")
            if factors:
                values = np.array(factors["values"], dtype=float)
                for k, name in enumerate(factors["names"]):
                    if name in weights:
                        ax.plot(range(1, len(values) + 1), values[:, k], marker=".", label=name)
            ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=5, ncol=2, loc="best")
            ax.set_title(f"{task}: {arm}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("factor (rate / lr)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def add_protocol_arguments(parser: argparse.ArgumentParser, arms: list[str]) -> None:
    """The protocol's options (tasks, arms, rate grid, seeds, budget), shared by revision 3."""
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--arms", nargs="+", default=arms, choices=arms)
    parser.add_argument("--lrs", nargs="+", type=float, default=DEFAULT_LRS)
    parser.add_argument("--seeds", type=int, default=5, help="final seeds per arm (>= 5)")
    parser.add_argument("--epochs", type=int, default=None, help="override every task's epochs")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=None, help="fewer training examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_protocol_arguments(parser, list(ARMS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    smoke = "1 epoch, 2 rates, 2 seeds, 300 examples: checks the wiring"
    parser.add_argument("--smoke", action="store_true", help=smoke)
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.lrs, args.seeds, args.n_train = 1, [0.01, 0.1], 2, 300
        args.out = args.figures = Path("/tmp/bmp_revision2_smoke")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for task in args.tasks:
        results[task] = {arm: run_arm(task, arm, args) for arm in args.arms}
    summary = {
        task: {
            arm: {k: v for k, v in row.items() if k not in ("sweep", "factors_first_seed")}
            for arm, row in arms.items()
        }
        for task, arms in results.items()
    }
    report = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bmp_revision2.json").write_text(json.dumps(report, indent=1))
    plot(results, args.figures / "bmp_revision2_factors.png")
    print(json.dumps({"seconds": report["seconds"], "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
