"""Reversible SGD with momentum: exact reversal, hypergradients against autograd and finite
differences, and the bytes a run holds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from optim.hypergrad import (
    BatchSchedule,
    Hyperparameters,
    Problem,
    TrainingDivergedError,
    evaluate,
    hypergradient,
    mlp_base_params,
    mlp_loss,
    unrolled_hypergradient,
)
from optim.hypergrad.fixedpoint import GAMMA_BITS
from optim.hypergrad.reversible import init_state, reverse, train_forward, validation_gradient

pytestmark = pytest.mark.usefixtures("one_thread")


def make_problem(steps: int, sizes: tuple[int, ...] = (6, 8, 3), seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(sizes[0], sizes[-1], generator=gen, dtype=torch.float64)
    x = torch.randn(160, sizes[0], generator=gen, dtype=torch.float64)
    y = (x @ teacher + 0.5 * torch.randn(160, sizes[-1], generator=gen)).argmax(1)
    return Problem(
        base_params=mlp_base_params(sizes, seed),
        loss=mlp_loss,
        train_x=x[:100],
        train_y=y[:100],
        val_x=x[100:],
        val_y=y[100:],
        steps=steps,
        batch_size=10,
        seed=seed,
    )


def varied(n_tensors: int, blocks: int, seed: int = 0) -> Hyperparameters:
    """Schedules that differ by block and tensor, with an L2 penalty on."""
    gen = torch.Generator().manual_seed(seed)
    hyper = Hyperparameters.constant(
        n_tensors, blocks, lr=0.2, momentum=0.85, init_scale=1.2, l2=1e-3
    )
    hyper.log_lr += 0.3 * torch.randn(hyper.log_lr.shape, generator=gen, dtype=torch.float64)
    hyper.logit_momentum += 0.5 * torch.randn(
        hyper.logit_momentum.shape, generator=gen, dtype=torch.float64
    )
    return hyper


@pytest.mark.slow
def test_reversal_after_1000_steps_restores_w0_v0_bit_for_bit() -> None:
    problem = make_problem(steps=1000)
    values = varied(4, blocks=20).values()
    state = init_state(problem, values)
    w0 = [w.ints.copy() for w in state.weights]
    train_forward(problem, values, state, problem.steps)
    assert not all(np.array_equal(w.ints, a) for w, a in zip(state.weights, w0, strict=True))
    _, dw = validation_gradient(problem, state)
    reverse(problem, values, state, dw)
    assert state.step == 0
    for w, a in zip(state.weights, w0, strict=True):
        np.testing.assert_array_equal(w.ints, a)
    for v in state.velocities:
        np.testing.assert_array_equal(v.ints, np.zeros_like(v.ints))
    assert all(b.is_empty() for b in state.buffers)


@pytest.mark.parametrize("blocks", [1, 30])
def test_hypergradients_equal_naive_unrolled_autograd(blocks: int) -> None:
    problem = make_problem(steps=30)
    hyper = varied(4, blocks)
    ours = hypergradient(problem, hyper)
    reference = unrolled_hypergradient(problem, hyper)
    assert ours.val_loss == pytest.approx(reference.val_loss, rel=1e-9)
    for kind, expected in reference.grad.fields().items():
        got = ours.grad.fields()[kind]
        assert got.shape == expected.shape
        scale = float(expected.abs().max())
        assert scale > 0, kind
        assert float((got - expected).abs().max()) <= 1e-6 * scale, kind


def test_hypergradients_agree_with_central_finite_differences() -> None:
    problem = make_problem(steps=40)
    hyper = varied(4, blocks=4)
    grad = hypergradient(problem, hyper).grad

    def loss_at(kind: str, index: tuple[int, ...], delta: float) -> float:
        h = hyper.detached()
        h.fields()[kind][index] += delta
        return evaluate(problem, h)

    # steps large enough that the fixed-point rounding (~1e-11) is far below f's change
    cases = [("lr", (1, 0), 1e-4), ("lr", (3, 3), 1e-4), ("init_scale", (2,), 1e-4)]
    for kind, index, eps in [*cases, ("l2", (0,), 1e-2)]:
        fd = (loss_at(kind, index, eps) - loss_at(kind, index, -eps)) / (2 * eps)
        assert float(grad.fields()[kind][index]) == pytest.approx(fd, rel=3e-4), kind

    # momentum moves on its 2**-16 grid: step the numerator, compare ∂f/∂γ
    values = hyper.values()
    b, i, m = 2, 1, 16
    gamma = float(values.gamma[b, i])
    gamma_exact = float(values.gamma_exact[b, i])
    analytic = float(grad.logit_momentum[b, i]) / (gamma_exact * (1 - gamma_exact))
    losses = []
    for sign in (1, -1):
        h = hyper.detached()
        h.logit_momentum[b, i] = math.log(gamma + sign * m * 2.0**-GAMMA_BITS) - math.log(
            1 - gamma - sign * m * 2.0**-GAMMA_BITS
        )
        losses.append(evaluate(problem, h))
    fd = (losses[0] - losses[1]) / (2 * m * 2.0**-GAMMA_BITS)
    assert analytic == pytest.approx(fd, rel=1e-4)


@pytest.mark.slow
def test_bytes_held_grow_with_steps_only_by_the_buffer_bits() -> None:
    problem = make_problem(steps=800, sizes=(6, 24, 3))
    hyper = Hyperparameters.constant(4, 1, lr=0.1, momentum=0.9)
    values = hyper.values()
    state = init_state(problem, values)
    n_params = sum(p.numel() for p in problem.base_params)
    sizes = []
    for stop in (200, 400, 800):
        train_forward(problem, values, state, stop)
        sizes.append(state.nbytes())
    for a, b in itertools.pairwise(sizes):
        assert {k: v for k, v in a.items() if k != "buffer_words"} == {
            k: v for k, v in b.items() if k != "buffer_words"
        }
    assert sizes[0]["weights"] == sizes[0]["velocities"] == sizes[0]["buffer_heads"]
    assert sizes[0]["weights"] == 8 * n_params
    bits_per_step = n_params * math.log2(1 / float(values.gamma[0, 0]))  # 0.152 per parameter
    grown = 8 * (sizes[2]["buffer_words"] - sizes[0]["buffer_words"])
    assert grown == pytest.approx(600 * bits_per_step, rel=0.05)
    assert grown < 600 * n_params * 128 / 200  # vs storing (w, v) in float64: < 0.5 %


def test_a_diverging_run_raises() -> None:
    problem = make_problem(steps=200)
    with pytest.raises(TrainingDivergedError):
        evaluate(problem, Hyperparameters.constant(4, 1, lr=1e4, momentum=0.5))


def test_batch_schedule_replays_and_covers_each_epoch() -> None:
    a, b = BatchSchedule(100, 10, seed=3), BatchSchedule(100, 10, seed=3)
    epoch = torch.cat([a.indices(t) for t in range(10, 20)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert torch.equal(a.indices(3), b.indices(3))
    assert not torch.equal(a.indices(3), BatchSchedule(100, 10, seed=4).indices(3))


def test_hyperparameters_are_checked_against_the_problem() -> None:
    problem = make_problem(steps=10)
    with pytest.raises(ValueError, match="lr: last dimension"):
        hypergradient(problem, Hyperparameters.constant(3, 1))
    with pytest.raises(ValueError, match="blocks"):
        hypergradient(problem, Hyperparameters.constant(4, 11))
    with pytest.raises(ValueError, match="momentum"):
        Hyperparameters.constant(4, 1, momentum=1.0)
