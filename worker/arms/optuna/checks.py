"""The Optuna tuner's checks of a spec: the arm's `fixed` hyperparameters and its
`search_space` (the study's, with the arm's entries replacing) against its scheme's registered
hyperparameters (`check_arm`), and the scheme built on the task's model on the meta device
(`check_build`), so that a spec every trial would refuse is refused at submission. The model
probes here (its parameter count, whether `vmap` batches it) are also what the arm's cohort size
is chosen by (`worker.arms.optuna.arm`).
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import optim
from worker.arms.optuna.spec import OptunaArmSpec
from worker.cohort import auto_cohort_size, batching_problem, batching_slows
from worker.spec_base import Problem, given_options
from worker.spec_schedule import check_schedule, is_schedule_param
from worker.tasks import Task, get_task

if TYPE_CHECKING:
    from worker.spec import StudySpec
    from worker.spec_options import SearchDimension

__all__ = [
    "check_arm",
    "check_build",
    "largest_cohort",
    "model_batching_problem",
    "model_key",
    "probe_values",
]


def _check_value(scheme: str, name: str, value: Any) -> str | None:
    """The rule `value` breaks, without the scheme and the name: the field path says them."""
    try:
        optim.SCHEMES[scheme].hyperparameter(name).check(scheme, value)
    except optim.HyperparameterError as exc:
        return exc.detail
    return None


def _known(scheme: str) -> str:
    return ", ".join(h.name for h in optim.SCHEMES[scheme].hyperparameters)


def _check_dimension(scheme: str, name: str, dim: SearchDimension) -> str | None:
    hp = optim.SCHEMES[scheme].hyperparameter(name)
    if dim.values is not None:
        for value in dim.values:
            problem = _check_value(scheme, name, value)
            if problem:
                return f"value {value!r}: {problem}"
        return None
    if hp.type == "bool":
        return f"{name} of {scheme} is true/false; search it with values: [true, false]"
    for bound in (dim.low, dim.high):
        if hp.type == "int" and bound is not None and bound != int(bound):
            return f"{name} of {scheme} is an integer; bounds must be whole, got {bound:g}"
        problem = _check_value(scheme, name, bound)
        if problem:
            return f"{problem} (valid range of {name} for {scheme}: {hp.low:g} to {hp.high:g})"
    return None


def check_arm(spec: StudySpec, index: int, arm: OptunaArmSpec) -> list[Problem]:
    """An optuna arm's fixed values and search space against its scheme's hyperparameters."""
    where: tuple[str | int, ...] = ("arms", index)
    problems: list[Problem] = []
    scheme = arm.optimizer
    hyperparameters = {h.name for h in optim.SCHEMES[scheme].hyperparameters}
    for name, value in arm.fixed.items():
        if is_schedule_param(name):
            message = f"a schedule's fields are fixed in the arm's schedule, not fixed: {name!r}"
            problems.append(((*where, "fixed", name), message, value))
        elif name not in hyperparameters:
            message = f"{scheme} has no hyperparameter {name!r}; known: {_known(scheme)}"
            problems.append(((*where, "fixed", name), message, value))
        elif (problem := _check_value(scheme, name, value)) is not None:
            problems.append(((*where, "fixed", name), problem, value))
    space = spec.arm_search_space(arm)
    if not space:
        problems.append(((*where, "search_space"), "nothing to search; give a search_space", None))
    own = arm.search_space or {}
    for name, dim in space.items():
        loc = (*where, "search_space", name) if name in own else ("search_space", name)
        if is_schedule_param(name):
            continue  # checked against the arm's schedule, below
        if name not in hyperparameters:
            message = (
                f"{name!r} is not a hyperparameter of {scheme} (arm {index}); "
                f"known: {_known(scheme)}"
            )
            problems.append((loc, message, None))
        elif name in arm.fixed:
            message = f"{name!r} is both fixed and searched; keep one"
            problems.append(((*where, "fixed", name), message, arm.fixed[name]))
        elif (problem := _check_dimension(scheme, name, dim)) is not None:
            problems.append((loc, problem, None))
    return problems + check_schedule(spec, index, arm)


def model_key(spec: StudySpec, arm: OptunaArmSpec) -> tuple[Task, str, str]:
    """What decides the model a trial of `arm` builds, hashable (the task, the data options and
    the model options the spec sets, as canonical JSON)."""
    task = get_task(spec.task)
    data = json.dumps(spec.data.model_dump(), sort_keys=True)
    given = json.dumps(given_options(spec.arm_model(arm)), sort_keys=True)
    return task, data, given


@functools.lru_cache(maxsize=512)
def _build_error(
    scheme: str, hyperparameters: tuple[tuple[str, Any], ...], task: Task, data: str, given: str
) -> str | None:
    """Why `optim.build` refuses this scheme on this model, or None. The model is the one a
    trial builds (same shape and sizes), made on the meta device: nothing is allocated."""
    net = _meta_model(task, data, given)
    with _meta_device():
        try:
            optim.build(scheme, net, **dict(hyperparameters))
        except optim.HyperparameterError as exc:
            return f"{exc.name}: {exc.detail}" if exc.name else exc.detail
        except optim.UnsupportedModelError as exc:
            return exc.detail
    return None


def probe_values(arm: OptunaArmSpec, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The arm's fixed values, and each searched dimension at its top (a range's high,
    a list's last value), where a combination like nesterov without momentum shows."""
    values: dict[str, Any] = dict(arm.fixed)
    for name, dim in space.items():
        if name not in values:
            values[name] = dim.values[-1] if dim.values is not None else dim.high
    return values


def check_build(spec: StudySpec, index: int, arm: OptunaArmSpec) -> Problem | None:
    """An arm whose scheme cannot be built on the task's model (bmp_exact on a convolutional
    or residual network, bmp on a module it does not understand), or not with its fixed
    values: refused now rather than failing every trial. Run once the arms and the models are
    otherwise valid."""
    key = model_key(spec, arm)
    task, options = key[0], spec.arm_model(arm)
    reason = _build_error(arm.optimizer, (), *key)
    if reason is not None:
        kind = f"transformed {task.model.name}" if options.transformed else task.model.name
        message = f"{arm.optimizer} cannot train the {kind} of {spec.task}: {reason}"
        return (("arms", index, "optimizer"), message, arm.optimizer)
    probe = probe_values(arm, spec.arm_search_space(arm))
    values = {name: value for name, value in probe.items() if not is_schedule_param(name)}
    reason = _build_error(arm.optimizer, tuple(sorted(values.items())), *key)
    if reason is not None:
        return (("arms", index, "fixed" if arm.fixed else "search_space"), reason, None)
    return None


def _meta_device() -> Any:
    import torch

    return torch.device("meta")


def _meta_model(task: Task, data: str, given: str) -> Any:
    """The model a trial builds (same shape and sizes), on the meta device: nothing allocated."""
    with _meta_device():
        return task.build(json.loads(data), json.loads(given))


@functools.lru_cache(maxsize=64)
def _model_parameters(task: Task, data: str, given: str) -> int:
    """The parameter count of the model a trial builds (made on the meta device)."""
    net = _meta_model(task, data, given)
    return sum(p.numel() for p in net.parameters())


@functools.lru_cache(maxsize=64)
def _model_convolves(task: Task, data: str, given: str) -> bool:
    """Whether the model a trial builds has a convolution (made on the meta device)."""
    import torch

    net = _meta_model(task, data, given)
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in net.modules())


@functools.lru_cache(maxsize=64)
def model_batching_problem(task: Task, data: str, given: str) -> str | None:
    return batching_problem(task, json.loads(data), json.loads(given))


def _cohort_device(spec: StudySpec) -> str:
    res = spec.resources
    gpu = res.device == "cuda" or (res.device == "auto" and res.gpus_per_trial > 0)
    return "cuda" if gpu else "cpu"


def single_trial_reason(spec: StudySpec, arm: OptunaArmSpec) -> str:
    """Why `"auto"` trains `arm` one trial per task (`largest_cohort` gave 1)."""
    if batching_slows(_cohort_device(spec), _model_convolves(*model_key(spec, arm))):
        return "auto: a convolutional model trains faster one trial per task on the CPU"
    return "auto: the model is too large to gain from batching"


def largest_cohort(spec: StudySpec, arm: OptunaArmSpec) -> int:
    """The most trials of `arm` one task may train: `resources.cohort_size`, or what `"auto"`
    picks for the arm's model and device. The memory check (`worker.footprint`) multiplies a
    step's memory by it; `OptunaArmRun.cohort_choice` may still run fewer."""
    from optim.batched import BATCHED_SCHEMES

    wanted = spec.resources.cohort_size
    if arm.optimizer not in BATCHED_SCHEMES:  # a scheme without a batched optimizer
        return 1
    if wanted != "auto":
        return wanted
    key = model_key(spec, arm)
    return auto_cohort_size(_model_parameters(*key), _cohort_device(spec), _model_convolves(*key))
