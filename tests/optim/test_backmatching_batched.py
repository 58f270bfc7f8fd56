"""Batched bmp and bmp_exact (`optim.batched`): K stacked models, each member on its own.

Each test trains K copies of a network twice, one by one with `BackMatching` (or
`BackMatchingExact`) and together as a stack (`vmap` over `functional_call`, the way
`worker.cohort` runs a cohort), in float64, and requires every member's factors at every step
and its final weights and BatchNorm statistics to equal its separate run's to 1e-10 (relative;
the vmapped kernels round in another order).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

import optim
from optim.batched import BatchedBackMatching, BatchedOptimizer, build_batched

pytestmark = pytest.mark.usefixtures("float64_default")

RTOL = 1e-10
STEPS = 6


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def _conv_bn() -> nn.Module:
    """Conv2d + BatchNorm2d with padding, a residual block with a strided projection, pooling."""
    branch = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6),
    )  # fmt: skip
    shortcut = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2), nn.BatchNorm2d(6))
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        optim.Residual(branch, shortcut), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (10,)),
    "conv-bn": (_conv_bn, (2, 6, 6)),
}

# (options every member shares, each member's own)
CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "mixed-momentum": (
        {},
        [
            {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
            {"lr": 0.1, "ema": 0.5, "clamp": 3.0},
            {"lr": 0.02, "warmup_steps": 4},
        ],
    ),
    "local-mean-no-momentum": (
        {"propagate": False, "mean_over_positions": True},
        [{"lr": 0.05}, {"lr": 0.1, "weight_decay": 1e-2}, {"lr": 0.02, "ema": 0.9}],
    ),
    "nesterov-mean": (
        {"nesterov": True, "mean_over_positions": True},
        [
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3, "clamp": 5.0},
        ],
    ),
}


def _data(shape: tuple[int, ...], steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, *shape, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(steps)
    ]


def _separate(
    model: nn.Module,
    options: dict[str, Any],
    data: Sequence[tuple[Tensor, Tensor]],
    scheme: str = "bmp",
) -> tuple[nn.Module, list[dict[str, float]]]:
    opt = optim.build(scheme, model, **options)
    factors = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        factors.append(getattr(opt, "layer_factors", dict)())
    return model, factors


class _Stack:
    """The members stacked as `worker.cohort` stacks them (BatchNorm's batch counter shared)."""

    def __init__(
        self, models: list[nn.Module], options: list[dict[str, Any]], scheme: str = "bmp"
    ) -> None:
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self.shared = {n: b[0].clone() for n, b in buffers.items() if "num_batches" in n}
        self.buffers = {n: b for n, b in buffers.items() if n not in self.shared}
        self.template = copy.deepcopy(models[0])
        dims = {n: p.dim() for n, p in self.template.named_parameters()}
        values = [optim.validate(scheme, o) for o in options]
        self.opt: BatchedOptimizer = build_batched(scheme, params, values, dims, self.template)

    def step(self, x: Tensor, y: Tensor) -> None:
        def call(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Any:
            out = functional_call(self.template, ({**p, **b}, self.shared), (x,))
            return out, self.opt.forward_statistics()

        logits, statistics = vmap(call, in_dims=(0, 0, None))(self.opt.params, self.buffers, x)
        self.opt.record_statistics(statistics)
        self.opt.watch_output(logits)
        losses = torch.stack([F.cross_entropy(z, y) for z in logits])
        self.opt.zero_grad()
        losses.sum().backward()
        self.opt.step()

    def select(self, index: list[int]) -> None:
        self.opt.select(index)
        self.buffers = {n: b[index] for n, b in self.buffers.items()}


def _close(a: Tensor | float, b: Tensor | float) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return bool(((a - b).abs() <= RTOL * torch.maximum(a.abs(), torch.ones_like(a))).all())


def _compare(stack: _Stack, k: int, model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert _close(stack.opt.params[name][k], p.detach()), name
    for name, b in model.named_buffers():
        if name in stack.buffers:
            assert _close(stack.buffers[name][k], b), name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("network", list(MODELS))
def test_each_member_equals_its_separate_training(network: str, case: str) -> None:
    make, shape = MODELS[network]
    shared, own = CASES[case]
    options = [{**shared, **o} for o in own]
    models = []
    for seed in range(len(options)):
        torch.manual_seed(seed)
        models.append(make())
    data = _data(shape, STEPS)
    stack = _Stack([copy.deepcopy(m) for m in models], options)
    factors: list[dict[str, Tensor]] = []
    for x, y in data:
        stack.step(x, y)
        factors.append(stack.opt.layer_factors())
    for k, (model, o) in enumerate(zip(models, options, strict=True)):
        trained, separate = _separate(model, o, data)
        for step, (mine, theirs) in enumerate(zip(factors, separate, strict=True)):
            assert list(mine) == list(theirs)
            for name, value in theirs.items():
                assert _close(mine[name][k], value), (step, name, float(mine[name][k]), value)
        _compare(stack, k, trained)


@pytest.mark.parametrize("split", [True, False])
def test_bmp_exact_members_equal_their_separate_training(split: bool) -> None:
    """Each member's damped least-squares step solved on its own slices, momentum per member
    (one member without). Damping 0 (the pseudo-inverse) is left out: its minimum-norm
    solutions amplify the batched forward pass's rounding through the smallest singular values
    (2 epochs of the mnist1d MLP: 7e-11, against 1e-15 with damping)."""
    make, shape = MODELS["mlp"]
    options = [
        {"lr": 0.1, "damping": 0.1, "momentum": 0.9, "split": split},
        {"lr": 0.3, "damping": 1.0, "split": split},
        {"lr": 0.05, "damping": 0.5, "momentum": 0.5, "split": split},
    ]
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(make())
    data = _data(shape, STEPS)
    stack = _Stack([copy.deepcopy(m) for m in models], options, "bmp_exact")
    for x, y in data:
        stack.step(x, y)
    for k, (model, o) in enumerate(zip(models, options, strict=True)):
        initial = model[0].weight.detach().clone()
        trained, _ = _separate(model, o, data, "bmp_exact")
        _compare(stack, k, trained)
        assert not _close(stack.opt.params["0.weight"][k], initial)  # it did train


def test_a_member_that_leaves_takes_its_state_and_the_others_still_match() -> None:
    """`select` drops a member's parameters, momentum, factors and running scalars (a pruned or
    diverged trial leaves a cohort this way)."""
    make, shape = MODELS["conv-bn"]
    options = [
        {"lr": 0.05, "momentum": 0.9, "ema": 0.5},
        {"lr": 0.1, "momentum": 0.5},
        {"lr": 0.02, "momentum": 0.9, "ema": 0.8, "weight_decay": 1e-3},
    ]
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(make())
    data = _data(shape, STEPS)
    stack = _Stack([copy.deepcopy(m) for m in models], options)
    for i, (x, y) in enumerate(data):
        if i == 3:
            stack.select([2, 0])
        stack.step(x, y)
    assert stack.opt.members == 2
    for k, member in enumerate([2, 0]):
        trained, _ = _separate(models[member], options[member], data)
        _compare(stack, k, trained)


def test_a_step_without_a_forward_pass_is_refused() -> None:
    torch.manual_seed(0)
    stack = _Stack([_mlp(), _mlp()], [{"lr": 0.1}, {"lr": 0.2}])
    assert isinstance(stack.opt, BatchedBackMatching)
    with pytest.raises(RuntimeError, match="bmp: no training forward pass"):
        stack.opt.step()
    exact = _Stack([_mlp(), _mlp()], [{"lr": 0.1}, {"lr": 0.2}], "bmp_exact")
    with pytest.raises(RuntimeError, match="bmp_exact: no gradient of the loss"):
        exact.opt.step()
    with pytest.raises(ValueError, match="propagate: members differ"):
        _Stack([_mlp(), _mlp()], [{"propagate": True}, {"propagate": False}])
