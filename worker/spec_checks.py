"""The checks of a study spec that span fields: the data and model options against the task,
model sizes against the limits, each arm by its tuner (`worker.arms.optuna.check_arm`: its
scheme's hyperparameters, and its scheme built on the model it trains; `worker.arms.
hypergradient.check_arm`); arm labels.

Each check returns `(loc, message, value)` problems so that `StudySpec` reports them all at once,
each under its own field path. `worker.spec` calls `check_spec` from its validator; nothing here
imports `worker.spec` (the limits come from `worker.spec_base`), so the two form no cycle.
"""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType
from typing import TYPE_CHECKING

import optim
from worker.arms import hypergradient, optuna
from worker.spec_base import MAX_PARAMETERS, MAX_SYNTHETIC_VALUES, Problem
from worker.tasks import get_task
from worker.tasks.models import count_parameters

if TYPE_CHECKING:
    from worker.spec import ArmSpec, ModelOptions, StudySpec

__all__ = ["Problem", "assign_labels", "check_spec"]

# Each tuner's module: `check_arm(spec, index, arm)` and `check_build(spec, index, arm)`.
TUNERS: dict[str, ModuleType] = {"optuna": optuna, "hypergradient": hypergradient}


def _check_model(spec: StudySpec, options: ModelOptions) -> str | None:
    task = get_task(spec.task)
    model = task.model.name
    if options.transformed and model != "mlp":
        return f"transformed: only the mlp model has a transformed variant, not {model}"
    if options.transformed and importlib.util.find_spec("optim.transformed") is None:
        return "transformed: needs optim.transformed, which this installation lacks"
    if options.activation != "relu" and model != "mlp":
        return f"activation: only the mlp model takes an activation, not {model}"
    if options.depth is not None and task.model.default_depth is None:
        return f"depth: {model} has a fixed depth (the VGG13 shape); set width only"
    data = spec.data.model_dump()
    if task.model.needs_image and len(task.input_shape(data)) != 3:
        return None  # reported under data.input_shape
    try:
        n = count_parameters(
            model,
            task.input_shape(data),
            task.n_classes(data),
            width=options.width,
            depth=options.depth,
            activation=options.activation,
            transformed=options.transformed,
        )
    except ImportError as exc:
        return f"{model} cannot be built here: {exc}"
    if n > MAX_PARAMETERS:
        return f"{n:,} parameters; at most {MAX_PARAMETERS:,} (reduce width or depth)"
    return None


def _check_data(spec: StudySpec) -> list[Problem]:
    task = get_task(spec.task)
    data, dataset = spec.data, task.dataset.name
    problems: list[Problem] = []
    if dataset != "synthetic":
        for name in ("input_shape", "n_classes", "n_examples"):
            if getattr(data, name) is not None:
                message = f"only the synthetic dataset takes {name}, not {dataset}"
                problems.append((("data", name), message, getattr(data, name)))
    else:
        shape = task.input_shape(data.model_dump())
        if task.model.needs_image and len(shape) != 3:
            message = f"{task.model.name} needs images: input_shape [channels, height, width]"
            problems.append((("data", "input_shape"), message, None))
        size = (data.n_examples or 4096) * math.prod(shape)
        if size > MAX_SYNTHETIC_VALUES:
            message = f"{size:,} input values; at most {MAX_SYNTHETIC_VALUES:,}"
            problems.append((("data", "n_examples"), message, data.n_examples))
    if data.data_dir is not None and not dataset.startswith("cifar"):
        problems.append((("data", "data_dir"), f"{dataset} reads no files", data.data_dir))
    if data.n_train is not None and data.n_train < data.batch_size:
        message = f"batch_size {data.batch_size} is larger than n_train {data.n_train}"
        problems.append((("data", "batch_size"), message, data.batch_size))
    return problems


def check_spec(spec: StudySpec) -> list[Problem]:
    """Every cross-field problem of `spec`, each with its field path."""
    problems = _check_data(spec)
    for index, arm in enumerate(spec.arms):
        problems += TUNERS[arm.tuner].check_arm(spec, index, arm)
    seen: set[str] = set()
    model_problem = _check_model(spec, spec.model)
    if model_problem:
        problems.append((("model",), model_problem, None))
        seen.add(model_problem)
    for index, arm in enumerate(spec.arms):
        if arm.model.model_dump(exclude_none=True):
            problem = _check_model(spec, spec.arm_model(arm))
            if problem and problem not in seen:
                problems.append((("arms", index, "model"), problem, None))
    if not problems:  # the scheme on the model, once the arms and the models are valid
        for index, arm in enumerate(spec.arms):
            if refused := TUNERS[arm.tuner].check_build(spec, index, arm):
                problems.append(refused)
    labels: dict[str, int] = {}
    for index, arm in enumerate(spec.arms):
        if arm.label is not None:
            if arm.label in labels:
                message = (
                    f"label {arm.label!r} is also arms.{labels[arm.label]}'s; labels are unique"
                )
                problems.append((("arms", index, "label"), message, arm.label))
            labels.setdefault(arm.label, index)
            if refused := _check_label(spec, index, arm):
                problems.append(refused)
    return problems


_VARIANTS = {"bmp-local", "bmp-propagate-searched"}  # bmp arms that never pool with bmp


def _scheme_part(spec: StudySpec, arm: ArmSpec) -> str:
    """The scheme, or the bmp variant, that a label's first part names: arms with a different
    one must not share a label (leaderboards pool arms by label and scheme)."""
    if arm.optimizer == "bmp" and "propagate" in spec.arm_search_space(arm):
        return "bmp-propagate-searched"
    fixed = arm.fixed if arm.tuner == "optuna" else {}
    if arm.optimizer == "bmp" and fixed.get("propagate") is False:
        return "bmp-local"
    return arm.optimizer


def _check_label(spec: StudySpec, index: int, arm: ArmSpec) -> Problem | None:
    """A user label that names a scheme (or bmp variant) must name the arm's own."""
    assert arm.label is not None
    named, own = arm.label.split("+")[0], _scheme_part(spec, arm)
    if (named in optim.SCHEMES or named in _VARIANTS) and named != own:
        message = f"label {arm.label!r} names {named!r}, but this arm is {own!r}: choose another"
        return (("arms", index, "label"), message, arm.label)
    return None


def _derived_label(spec: StudySpec, arm: ArmSpec) -> str:
    parts = [_scheme_part(spec, arm)]
    for name, value in arm.model.model_dump(exclude_none=True).items():
        if getattr(spec.model, name) == value:
            continue
        if isinstance(value, bool):
            parts.append(name if value else f"no-{name}")
        else:
            parts.append(f"{name}={value}")
    return "+".join(parts)[:64]


def assign_labels(spec: StudySpec) -> None:
    """Give every unlabelled arm its derived label, made unique with -2, -3, … in order."""
    taken = {arm.label for arm in spec.arms if arm.label is not None}
    for arm in spec.arms:
        if arm.label is not None:
            continue
        base = _derived_label(spec, arm)
        label, n = base, 1
        while label in taken:
            n += 1
            label = f"{base[:60]}-{n}"
        arm.label = label
        taken.add(label)
