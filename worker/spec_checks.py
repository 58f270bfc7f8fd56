"""The checks of a study spec that span fields: the data and model options against the task's
declarations (`worker.tasks.contract`), model sizes against the limits, the objective against
the task's metrics, each arm by its tuner's `checks` (`worker.arms.TUNERS`: the Optuna
tuner's check its scheme's hyperparameters and its scheme built on the model it trains); arm
labels. Everything a check knows of a task comes from the task itself (its
data options, its data's shape, its model's options, its kind of loss), so a new task, built-in
or a plugin's, needs no case here.

Each check returns `(loc, message, value)` problems so that `StudySpec` reports them all at once,
each under its own field path. A `deadline` (`time.monotonic()` seconds, from the validation's
context: the service bounds how long one submit may validate) is checked before each model
build; past it the spec is refused with a problem that says so, at the spec itself.
`worker.spec` calls `check_spec` from its validator (imported then: the checks build models,
which imports PyTorch); nothing here, nor in the tuners' checks, imports `worker.spec` (the
limits come from `worker.spec_base`, the value models from `worker.spec_options`), so the
import graph has no cycle (`tests/test_layering.py`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import optim
from worker.arms import TUNERS
from worker.arms.optuna.spec import OptunaArmSpec
from worker.spec_base import MAX_PARAMETERS, Problem, given_options
from worker.spec_schedule import label_part, swept_fields
from worker.tasks import DataPathError, Task, get_task
from worker.tasks.contract import DATA_OPTIONS
from worker.tasks.losses import LOSSES

if TYPE_CHECKING:
    from pydantic import BaseModel

    from worker.spec import ArmSpec, StudySpec

__all__ = ["Problem", "assign_labels", "check_spec", "pin_variants", "task_defaults"]


def task_defaults(spec: StudySpec) -> None:
    """Fill in what defaults to the task's: a regression task's objective metric is `val_loss`
    (it reports no accuracy) unless the spec names one."""
    task = get_task(spec.task)
    if task.kind == "regression" and "metric" not in spec.objective.model_fields_set:
        spec.objective.metric, spec.objective.direction = "val_loss", "minimize"


def pin_variants(spec: StudySpec) -> None:
    """Write each scheme's pinned options (`optim.registry.Hyperparameter.pinned`) that an
    Optuna arm neither fixes nor searches into its `fixed`, at today's default: the stored spec
    then says which variant the arm is, whatever the default becomes later (stored specs of
    version 1 get the defaults of their day by migration, `worker.spec`)."""
    for arm in spec.arms:
        if not isinstance(arm, OptunaArmSpec) or arm.optimizer not in optim.SCHEMES:
            continue
        searched = spec.arm_search_space(arm)
        for option in optim.scheme(arm.optimizer).hyperparameters:
            if option.pinned and option.name not in arm.fixed and option.name not in searched:
                arm.fixed[option.name] = option.default


def _options_problems(
    task: Task, given: dict[str, Any], where: tuple[str | int, ...]
) -> list[Problem]:
    declared = {o.name: o for o in task.model.options}
    problems: list[Problem] = []
    for name, value in given.items():
        option = declared.get(name)
        if option is None:
            known = ", ".join(declared) or "none"
            model = f"the {task.model.name} model of {task.name}"
            message = f"{model} has no option {name!r}; its options: {known}"
            problems.append(((*where, name), message, value))
        elif (problem := option.check(value)) is not None:
            problems.append(((*where, name), problem, value))
    return problems


def _parameters(task: Task, data: dict[str, Any], given: dict[str, Any]) -> int:
    import torch

    with torch.device("meta"):
        model = task.build(data, given)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_model(
    spec: StudySpec, options: BaseModel, where: tuple[str | int, ...]
) -> list[Problem]:
    task = get_task(spec.task)
    given = given_options(options)
    problems = _options_problems(task, given, where)
    if problems:
        return problems
    data = spec.data.model_dump()
    try:
        shape = task.shape(data)
    except (DataPathError, OSError, ValueError):
        return []  # reported under data
    if task.model.inputs == "image" and len(shape.input_shape) != 3:
        return []  # reported under data
    try:
        n = _parameters(task, data, given)
    except ImportError as exc:
        return [(where, f"{task.model.name} cannot be built here: {exc}", None)]
    except Exception as exc:  # a plugin's builder: its own error, in a line
        message = (
            f"the {task.model.name} model of {task.name} cannot be built on PyTorch's meta "
            f"device, where ratebench sizes it: {type(exc).__name__}: {exc}"
        )
        return [(where, message, None)]
    if n > MAX_PARAMETERS:
        message = f"{n:,} parameters; at most {MAX_PARAMETERS:,} (reduce width or depth)"
        return [(where, message, None)]
    return []


def _image_field(task: Task) -> tuple[str, ...]:
    for name in ("input_shape", "data_dir"):
        if name in task.dataset.options:
            return ("data", name)
    return ("task",)


def _check_data(spec: StudySpec) -> list[Problem]:
    task = get_task(spec.task)
    data, dataset = spec.data, task.dataset
    problems: list[Problem] = []
    takes = ", ".join(sorted(dataset.options)) or "none"
    for name in sorted(DATA_OPTIONS - dataset.options):
        if getattr(data, name) is not None:
            what = "reads no files" if name == "data_dir" else f"takes no {name}"
            message = f"{dataset.name} {what} (its data options: {takes})"
            problems.append((("data", name), message, getattr(data, name)))
    if problems:
        return problems
    options = data.model_dump()
    for name, message in dataset.limits(options) if dataset.limits is not None else []:
        problems.append((("data", name), message, getattr(data, name, None)))
    try:
        shape = task.shape(options)
    except (DataPathError, OSError, ValueError) as exc:
        problems.append((("data", "data_dir"), str(exc), data.data_dir))
        return problems
    if task.model.inputs == "image" and len(shape.input_shape) != 3:
        message = (
            f"{task.model.name} needs images: inputs of shape [channels, height, width], "
            f"not {list(shape.input_shape)}"
        )
        problems.append((_image_field(task), message, None))
    if data.n_train is not None and data.n_train < data.batch_size:
        message = f"batch_size {data.batch_size} is larger than n_train {data.n_train}"
        problems.append((("data", "batch_size"), message, data.batch_size))
    return problems


def _check_objective(spec: StudySpec) -> list[Problem]:
    task = get_task(spec.task)
    loss = LOSSES[task.kind]
    if spec.objective.metric in loss.metrics:
        return []
    message = (
        f"{task.name} is a {task.kind} task ({loss.name}); its metrics: {', '.join(loss.metrics)}"
    )
    return [(("objective", "metric"), message, spec.objective.metric)]


class _OutOfTimeError(Exception):
    pass


def _in_time(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _OutOfTimeError


def check_spec(spec: StudySpec, deadline: float | None = None) -> list[Problem]:
    """Every cross-field problem of `spec`, each with its field path (see the module docstring
    for `deadline`)."""
    try:
        return _check_spec(spec, deadline)
    except _OutOfTimeError:
        message = (
            "validating this spec took longer than this service allows; use fewer arms or "
            "fewer distinct model options"
        )
        return [((), message, None)]


def _check_spec(spec: StudySpec, deadline: float | None) -> list[Problem]:
    problems = _check_data(spec) + _check_objective(spec)
    for index, arm in enumerate(spec.arms):
        problems += TUNERS[arm.tuner].checks().check_arm(spec, index, arm)
    seen: set[str] = set()
    _in_time(deadline)
    model_problems = _check_model(spec, spec.model, ("model",))
    problems += model_problems
    seen.update(message for _, message, _ in model_problems)
    for index, arm in enumerate(spec.arms):
        if given_options(arm.model):
            _in_time(deadline)
            for loc, message, value in _check_model(
                spec, spec.arm_model(arm), ("arms", index, "model")
            ):
                if message not in seen:
                    problems.append((loc, message, value))
    if not problems:  # the scheme on the model, once the arms and the models are valid
        for index, arm in enumerate(spec.arms):
            _in_time(deadline)
            if refused := TUNERS[arm.tuner].checks().check_build(spec, index, arm):
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


# bmp arms that never pool with bmp: each option that changes its rates, set away from the
# paper's form (propagating, sums over positions) or searched, is named in the label's first
# part (`bmp-local-mean-positions`, the default variant since revision 3). Labels name the
# variant, not its distance from today's defaults, so a stored label keeps its meaning.
_BMP_PROPAGATE: dict[object, str] = {False: "-local", "searched": "-propagate-searched"}
_BMP_POSITIONS: dict[object, str] = {True: "-mean-positions", "searched": "-positions-searched"}
_VARIANTS = {
    f"bmp{a}{b}" for a in ("", *_BMP_PROPAGATE.values()) for b in ("", *_BMP_POSITIONS.values())
}


def _scheme_part(spec: StudySpec, arm: ArmSpec) -> str:
    """The scheme, or the bmp variant, that a label's first part names: arms with a different
    one must not share a label (leaderboards pool arms by label and scheme)."""
    if arm.optimizer != "bmp":
        return arm.optimizer
    searched = spec.arm_search_space(arm)
    fixed = arm.fixed_values()
    parts = ["bmp"]
    for name, names in (("propagate", _BMP_PROPAGATE), ("mean_over_positions", _BMP_POSITIONS)):
        default = optim.scheme("bmp").hyperparameter(name).default  # until `pin_variants`
        value = "searched" if name in searched else fixed.get(name, default)
        parts.append(names.get(value, ""))
    return "".join(parts)


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
    if isinstance(arm, OptunaArmSpec):  # its schedule (`warmup-cosine`), when not constant
        schedule = label_part(spec.arm_schedule(arm), swept_fields(spec, arm))
        parts += [schedule] if schedule else []
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
