"""ratebench's answer for your own PyTorch model, from Python (README, "Your own network").

Run from the repository root: `.venv/bin/python examples/compare.py`. It compares SGD with
momentum and Adam on a small CNN of its own, trained on scikit-learn's bundled 8x8 digits, on a
local Ray runtime, and records the study in the service's database (data/ratebench.db), where
`./scripts/serve` shows it at http://127.0.0.1:8000/ (marked as run from the Python API).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import ratebench


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, global average pooling, a linear head: your network goes here."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:]
    result = ratebench.compare(
        model=SmallCNN,  # called once per trial, after the trial's seed is set
        data=(x[train], y[train], x[test], y[test]),  # integer labels: a classification
        arms=[{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, "adam"],
        name="digits-small-cnn",
        data_options={"batch_size": 64},
        search_space={"lr": {"low": 1e-3, "high": 1.0, "log": True}},
        budget={"trials_per_arm": 6, "epochs": 8, "final_seeds": 3},
        sampler="grid",
        pruner="none",
        resources={"cpus_per_trial": 0.5, "max_concurrent_trials": 4},
    )
    print(result)  # the arms ranked by validation accuracy over the final seeds
    print("best rates:", result.best_rates)
    for path in result.plots("plots"):
        print(path)


if __name__ == "__main__":
    main()
