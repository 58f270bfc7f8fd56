"""The meta-optimisation loop: it lowers the validation loss, reports every meta-iteration, and
treats divergence as a result."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from optim.hypergrad import Hyperparameters, MetaIteration, evaluate, tune
from optim.hypergrad.mlp import mlp_base_params, mlp_loss
from optim.hypergrad.problem import Problem

pytestmark = pytest.mark.usefixtures("one_thread")


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(5, 3, generator=gen)
    x = torch.randn(200, 5, generator=gen)
    y = (x @ teacher).argmax(1)
    return x[:120], y[:120], x[120:], y[120:]


@pytest.mark.slow
def test_tune_lowers_the_validation_loss_and_reports_each_meta_iteration() -> None:
    seen: list[MetaIteration] = []
    result = tune(
        *data(),
        layer_sizes=[5, 8, 3],
        steps=40,
        batch_size=12,
        meta_iterations=6,
        meta_lr=0.2,
        blocks=4,
        learn=("lr", "momentum", "init_scale", "l2"),
        lr=0.02,
        l2=1e-3,
        callback=seen.append,
    )
    assert [m.index for m in seen] == list(range(6))
    assert result.history == seen
    assert result.best.val_loss == min(m.val_loss for m in seen)
    assert result.best.val_loss < seen[0].val_loss - 0.05
    assert all(
        not m.diverged and set(m.grad_norms) == {"lr", "momentum", "init_scale", "l2"} for m in seen
    )
    first = seen[0]
    assert first.lr == [[0.02] * 4] * 4
    assert seen[1].lr != first.lr and seen[1].momentum != first.momentum
    flat = result.best.params()
    assert len(flat) == 2 * 4 * 4 + 4 + 4
    assert flat["lr/b03/layer2.bias"] == result.best.lr[3][3]
    assert set(result.schedule) == {"layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"}
    json.dumps(dataclasses.asdict(result.best))  # plain floats and lists only

    train_x, train_y, val_x, val_y = data()
    problem = Problem(
        base_params=mlp_base_params([5, 8, 3], 0),
        loss=mlp_loss,
        train_x=train_x.double(),
        train_y=train_y,
        val_x=val_x.double(),
        val_y=val_y,
        steps=40,
        batch_size=12,
        seed=0,
    )
    assert evaluate(problem, result.hyperparameters) == pytest.approx(result.best.val_loss)


def test_a_diverged_meta_iteration_is_reported_and_recovered_from() -> None:
    seen: list[MetaIteration] = []
    result = tune(
        *data(),
        layer_sizes=[5, 8, 3],
        steps=40,
        batch_size=12,
        meta_iterations=8,
        lr=300.0,
        momentum=0.5,
        callback=seen.append,
    )
    assert seen[0].diverged and seen[0].val_loss == math.inf and seen[0].grad_norms == {}
    assert seen[1].lr[0][0] == pytest.approx(150.0)
    assert not result.best.diverged and math.isfinite(result.best.val_loss)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learn": ("lr", "dropout")}, "learn"),
        ({"learn": ("l2",), "l2": 0.0}, "l2"),
        ({"meta_iterations": 0}, "meta_iterations"),
        ({"meta_lr": -1.0}, "meta_lr"),
        ({"layer_sizes": [4, 3]}, "layer_sizes"),
        ({"batch_size": 1000}, "batch_size"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {
        "layer_sizes": [5, 3],
        "steps": 5,
        "batch_size": 4,
        "blocks": 1,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=field):
        tune(*data(), **arguments)  # type: ignore[arg-type]


def test_constant_hyperparameters_round_trip_through_values() -> None:
    hyper = Hyperparameters.constant(2, 3, lr=[0.1, 0.2], momentum=0.9, init_scale=2.0, l2=0.0)
    values = hyper.values()
    np.testing.assert_allclose(values.alpha, [[0.1, 0.2]] * 3, rtol=1e-15)
    np.testing.assert_allclose(values.gamma, 0.9, atol=2.0**-17)
    assert values.numerator.dtype == np.int64
    assert values.l2.tolist() == [0.0, 0.0]
    np.testing.assert_allclose(values.init_scale, [2.0, 2.0], rtol=1e-15)
