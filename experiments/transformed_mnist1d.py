"""Transformed tanh networks vs the same networks untransformed, SGD at tuned rates, on mnist1d.

Arms (all tanh MLPs with hidden widths `--hidden`, trained by plain SGD, batch `--batch`):
- `plain`: `tanh_mlp`, Linear-Tanh-...-Linear, no shortcuts;
- `shortcuts`: `transformed_mlp(transform=False)`, the same blocks with shortcut connections
  but α = β = 0, γ = 1 for ever (Raiko et al. 2012's "shortcuts" control);
- `transformed`: α, β updated every `--every` steps (Raiko, Valpola, LeCun 2012);
- `transformed_gamma`: α, β and γ (Vatanen et al. 2013, arXiv 1301.3476).

Protocol: mnist1d generated offline (`make_dataset(get_dataset_args())`, 4000 train / 1000
test); the 4000 are split 3200 train / 800 validation. Each arm's rate is chosen from `--lrs` by
the validation accuracy (mean of the last 3 epochs, averaged over `--tune-seeds` tuning runs,
seeds 100, 101, ...); the chosen rate is then run with `--seeds` other seeds (1, 2, ...),
recording per epoch the training loss (whole training split, eval mode), validation and test
accuracy. A run whose loss is not finite counts as diverged and is never chosen. Writes
`transformed_mnist1d.json` and `.png` into `--out` and prints the summary as JSON.

    python experiments/transformed_mnist1d.py            # about 3.5 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from optim.transformed import TransformationScheduler, tanh_mlp, transformed_mlp

_log = logging.getLogger("transformed_mnist1d")

Data = dict[str, Tensor]


def load_mnist1d() -> Data:
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())
    x = torch.as_tensor(raw["x"], dtype=torch.float32)
    y = torch.as_tensor(raw["y"], dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:3200], perm[3200:]
    return {
        "x_train": x[train],
        "y_train": y[train],
        "x_val": x[val],
        "y_val": y[val],
        "x_test": torch.as_tensor(raw["x_test"], dtype=torch.float32),
        "y_test": torch.as_tensor(raw["y_test"], dtype=torch.long),
    }


def arms(hidden: list[int]) -> dict[str, Callable[[], nn.Module]]:
    return {
        "plain": lambda: tanh_mlp(40, hidden, 10),
        "shortcuts": lambda: transformed_mlp(40, hidden, 10, transform=False),
        "transformed": lambda: transformed_mlp(40, hidden, 10),
        "transformed_gamma": lambda: transformed_mlp(40, hidden, 10, scale=True),
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    loss = float(nn.functional.cross_entropy(out, y))
    return loss, float((out.argmax(1) == y).float().mean())


def train(
    make: Callable[[], nn.Module], data: Data, lr: float, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = TransformationScheduler(model, every=args.every)
    n = len(data["x_train"])
    g = torch.Generator().manual_seed(1000 + seed)
    curve: dict[str, list[float]] = {"train_loss": [], "val_acc": [], "test_acc": []}
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, args.batch):
            idx = perm[start : start + args.batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
            loss.backward()
            opt.step()
            scheduler.step()
        train_loss, _ = evaluate(model, data["x_train"], data["y_train"])
        curve["train_loss"].append(train_loss)
        curve["val_acc"].append(evaluate(model, data["x_val"], data["y_val"])[1])
        curve["test_acc"].append(evaluate(model, data["x_test"], data["y_test"])[1])
        if not math.isfinite(train_loss):
            break  # diverged: a result, recorded as such
    diverged = not math.isfinite(curve["train_loss"][-1])
    return {"lr": lr, "seed": seed, "diverged": diverged, **curve}


def _tail_mean(values: list[float], k: int = 3) -> float:
    return float(np.mean(values[-k:]))


def run_arm(
    name: str, make: Callable[[], nn.Module], data: Data, args: argparse.Namespace
) -> dict[str, Any]:
    sweep = []
    for lr in args.lrs:
        tuning = [train(make, data, lr, seed=100 + s, args=args) for s in range(args.tune_seeds)]
        diverged = any(r["diverged"] for r in tuning)
        score = (
            float("nan") if diverged else float(np.mean([_tail_mean(r["val_acc"]) for r in tuning]))
        )
        sweep.append({"lr": lr, "val_acc": score, "diverged": diverged})
        _log.info("%s lr=%g val_acc=%.4f", name, lr, score)
    finite = [s for s in sweep if not s["diverged"]]
    if not finite:
        raise SystemExit(f"{name}: every rate in --lrs diverged; add smaller rates")
    best_lr = max(finite, key=lambda s: s["val_acc"])["lr"]
    runs = [train(make, data, best_lr, seed=s, args=args) for s in range(1, args.seeds + 1)]
    final_test = [_tail_mean(r["test_acc"]) for r in runs]
    final_loss = [r["train_loss"][-1] for r in runs]
    _log.info("%s best lr=%g test_acc=%.4f±%.4f", name, best_lr, *_ms(final_test))
    return {
        "parameters": sum(p.numel() for p in make().parameters()),
        "sweep": sweep,
        "best_lr": best_lr,
        "runs": runs,
        "test_acc_last3": {"mean": _ms(final_test)[0], "std": _ms(final_test)[1]},
        "train_loss_final": {"mean": _ms(final_loss)[0], "std": _ms(final_loss)[1]},
        "epochs_to_target_val_acc": [_first_epoch(r["val_acc"], args.target) for r in runs],
    }


def _ms(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def _first_epoch(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v >= target), None)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    diverged: dict[str, list[float]] = {}
    for name, res in results["arms"].items():
        label = f"{name} (lr={res['best_lr']:g})"
        for ax, key in ((axes[0], "train_loss"), (axes[1], "test_acc")):
            curves = np.array([r[key] for r in res["runs"]])
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            (line,) = ax.plot(epochs, mean, label=label)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=line.get_color())
        lrs = [s["lr"] for s in res["sweep"]]
        (line,) = axes[2].plot(lrs, [s["val_acc"] for s in res["sweep"]], "o-", label=name)
        diverged[line.get_color()] = [s["lr"] for s in res["sweep"] if s["diverged"]]
    low, high = axes[2].get_ylim()
    for k, (color, lrs) in enumerate(diverged.items()):  # staggered so that marks do not hide
        y = low + (0.02 + 0.03 * k) * (high - low)
        axes[2].plot(lrs, [y] * len(lrs), "x", color=color, markersize=8)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    axes[2].set(xlabel="SGD rate", ylabel="validation accuracy (tuning seeds)", xscale="log")
    axes[2].set_title("rate sweep (x: diverged)")
    seeds = results["config"]["seeds"]
    hidden = results["config"]["hidden"]
    fig.suptitle(f"mnist1d, tanh MLP {hidden}, SGD at tuned rates; mean ± std over {seeds} seeds")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--every", type=int, default=25, help="steps between updates")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    )
    parser.add_argument("--tune-seeds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.55, help="validation accuracy")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.replot:
        saved = json.loads((args.out / "transformed_mnist1d.json").read_text())
        plot(saved, args.out / "transformed_mnist1d.png")
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = load_mnist1d()
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "arms": {name: run_arm(name, make, data, args) for name, make in arms(args.hidden).items()},
    }
    results["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformed_mnist1d.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "transformed_mnist1d.png")
    summary = {
        name: {
            "best_lr": res["best_lr"],
            "test_acc_last3": res["test_acc_last3"],
            "train_loss_final": res["train_loss_final"],
            "epochs_to_target_val_acc": res["epochs_to_target_val_acc"],
        }
        for name, res in results["arms"].items()
    }
    print(json.dumps({"wall_seconds": results["wall_seconds"], "arms": summary}, indent=1))


if __name__ == "__main__":
    main()
