"""Every scheme on every task's model: what the spec accepts builds (the real model, built as a
trial builds it), and what cannot be built is refused at the arm's field."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import optim
from worker.spec import StudySpec
from worker.tasks import build_model, get_task, tasks

# The tasks whose data need no files (the files datasets' shapes come from the files).
TASKS = {name: t for name, t in tasks().items() if not name.startswith("files")}

VARIANTS: list[dict[str, Any]] = [{}, {"activation": "tanh"}, {"transformed": True}]


def _spec(task: str, scheme: str, model: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if task.startswith("synthetic") and get_task(task).model.inputs == "image":
        data["input_shape"] = [3, 8, 8]
    return {
        "name": "matrix",
        "task": task,
        "data": data,
        "model": {"width": 2, **model},
        "arms": [{"optimizer": scheme, "fixed": fixed}],
    }


def _build(spec: StudySpec) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """The arm's model and optimizer as `worker.runner` builds them, and a batch of inputs."""
    task, options = get_task(spec.task), spec.arm_model(spec.arms[0])
    data = spec.data.model_dump()
    shape = task.input_shape(data)
    torch.manual_seed(0)
    model = build_model(
        task.model.name,
        shape,
        task.n_classes(data),
        width=options.width,
        depth=options.depth,
        activation=options.activation,
        transformed=options.transformed,
    )
    optimizer = optim.build(spec.arms[0].optimizer, model, **spec.arms[0].fixed)
    x = torch.randn(2, *shape)
    return model, optimizer, x.reshape(2, -1) if task.flat_input(data) else x


def _one_step(spec: StudySpec) -> None:
    """What `worker.runner` does with one batch: the step runs and moves the weights."""
    model, optimizer, x = _build(spec)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (task, scheme, variant)
        for task, info in TASKS.items()
        for scheme in optim.SCHEMES
        for variant in VARIANTS
        if not variant or info.model.name == "mlp"
    ]


def test_every_accepted_combination_builds_and_every_refused_one_names_the_arm() -> None:
    accepted, refused = [], []
    for task, scheme, variant in _cases():
        try:
            spec = StudySpec.model_validate(_spec(task, scheme, variant, {}))
        except ValidationError as exc:
            (error,) = exc.errors()
            assert error["loc"] == ("arms", 0, "optimizer"), (task, scheme, variant, error)
            assert error["msg"].startswith(f"{scheme} cannot train the "), error["msg"]
            refused.append((task, scheme, variant))
            continue
        _build(spec)  # what failed every trial of such an arm
        accepted.append((task, scheme, variant))
    # Today the exact mode solves chains of Linear layers only: plain MLPs, nothing else.
    assert {(t, v.get("transformed", False)) for t, s, v in refused} == {
        (t, tr)
        for t, info in TASKS.items()
        for tr in ((False, True) if info.model.name == "mlp" else (False,))
        if info.model.name != "mlp" or tr
    }
    assert all(s == "bmp_exact" for _, s, _ in refused)
    assert len(accepted) + len(refused) == len(_cases())


@pytest.mark.parametrize("scheme", ["sgd", "bmp"])
def test_fixed_values_that_cannot_be_built_together_are_refused(scheme: str) -> None:
    with pytest.raises(ValidationError) as refused:
        StudySpec.model_validate(_spec("digits-mlp", scheme, {}, {"nesterov": True}))
    (error,) = refused.value.errors()
    assert error["loc"] == ("arms", 0, "fixed") and "momentum" in error["msg"]
    spec = StudySpec.model_validate(
        _spec("digits-mlp", scheme, {}, {"nesterov": True, "momentum": 0.9})
    )
    _one_step(spec)
