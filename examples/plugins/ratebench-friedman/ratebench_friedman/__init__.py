"""Friedman's regression problem, as a ratebench task plugin (an example of the task contract).

The data: Friedman (1991)'s first benchmark function ("Multivariate adaptive regression
splines", Annals of Statistics 19(1)), as scikit-learn's `make_friedman1` writes it. Ten inputs
drawn uniformly from [0, 1], of which the target uses five:

    y = 10 sin(π x0 x1) + 20 (x2 − 0.5)² + 10 x3 + 5 x4 + ε,    ε ~ N(0, 1)

4000 training and 1000 test examples, generated with a fixed seed (the same arrays on every
machine). The targets' mean is about 14.5 and their variance 25: a network that predicts their
mean scores a mean squared error of 25, one that has learned nothing (predicting about zero) of
234, ratebench's chance level for this regression, by which divergence is judged.

The tasks (`tasks()`, declared under the entry-point group `ratebench.tasks` in pyproject.toml):

- `friedman-gmlp`: a gated MLP, none of ratebench's built-in models: a linear stem, `blocks`
  residual gated blocks `x + W_out(W_value h ⊙ gate(W_gate h))` with `h = LayerNorm(x)`, and a
  linear head with one output. Options: `hidden`, `blocks`, `gate` (silu or sigmoid). `bmp`
  does not understand the gated block (a product of two paths) and refuses it by name.
- `friedman-mlp`: a plain `nn.Sequential` MLP (Linear-ReLU stacks), with options `width` and
  `depth`; every scheme trains it, `bmp` included.

Both are regressions: the loss is the mean squared error, the objective `val_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ratebench import Dataset, DataShape, Model, Option, Splits, Task

__all__ = ["GatedBlock", "tasks"]

N_TRAIN, N_TEST, N_FEATURES = 4000, 1000, 10


def friedman1(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(size=(n, N_FEATURES))
    y = (
        10 * np.sin(math.pi * x[:, 0] * x[:, 1])
        + 20 * (x[:, 2] - 0.5) ** 2
        + 10 * x[:, 3]
        + 5 * x[:, 4]
        + rng.standard_normal(n)
    )
    return x.astype(np.float32), y.astype(np.float32)


def _load(options: Mapping[str, Any]) -> Splits:
    rng = np.random.default_rng(1991)
    x_train, y_train = friedman1(N_TRAIN, rng)
    x_test, y_test = friedman1(N_TEST, rng)
    return Splits(x_train, y_train, x_test, y_test)


FRIEDMAN = Dataset(
    name="friedman1",
    description="Friedman #1: 10 uniform inputs, a smooth nonlinear target plus N(0, 1) noise",
    kind="regression",
    load=_load,
    shape=DataShape(input_shape=(N_FEATURES,), n_outputs=1, train_pool=N_TRAIN),
)


class GatedBlock(nn.Module):
    """`x + W_out(W_value h ⊙ gate(W_gate h))`, `h = LayerNorm(x)`."""

    def __init__(self, width: int, gate: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.value = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.act = nn.SiLU() if gate == "silu" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        out: torch.Tensor = x + self.out(self.value(h) * self.act(self.gate(h)))
        return out


def _gated_mlp(
    input_shape: tuple[int, ...], n_outputs: int, hidden: int, blocks: int, gate: str
) -> nn.Module:
    return nn.Sequential(
        nn.Linear(math.prod(input_shape), hidden),
        *[GatedBlock(hidden, gate) for _ in range(blocks)],
        nn.Linear(hidden, n_outputs),
    )


def _mlp(input_shape: tuple[int, ...], n_outputs: int, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    n_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, n_outputs))


GATED_MLP = Model(
    name="gmlp",
    description="gated MLP: residual LayerNorm-gated blocks, a linear head",
    build=_gated_mlp,
    options=(
        Option("hidden", "int", 64, 4, 1024, description="width of the blocks"),
        Option("blocks", "int", 2, 1, 8, description="gated residual blocks"),
        Option("gate", "str", "silu", choices=("silu", "sigmoid"), description="gate function"),
    ),
    inputs="flat",
)
MLP = Model(
    name="mlp",
    description="plain MLP: Linear-ReLU layers, a linear head",
    build=_mlp,
    options=(
        Option("width", "int", 64, 1, 1024, description="units per hidden layer"),
        Option("depth", "int", 2, 1, 8, description="hidden layers"),
    ),
    inputs="flat",
)


def tasks() -> list[Task]:
    """The plugin's tasks (the entry point's object); version: the package's."""
    return [Task("friedman-gmlp", FRIEDMAN, GATED_MLP), Task("friedman-mlp", FRIEDMAN, MLP)]
