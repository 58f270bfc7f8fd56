"""What the service refuses of a valid spec (`POST /studies`, and `ratebench validate` which
says what it would refuse), in one place: `admission_problems`.

- the task's data folder outside the data roots, or its files missing (`data.data_dir`);
- the compute budget: estimated optimizer steps over `RATEBENCH_MAX_STUDY_STEPS` (`budget`);
- what one step would cost a node: the memory and the floating-point operations of one
  training step (`worker.footprint`), against `RATEBENCH_MAX_STEP_MEMORY_GB` and
  `RATEBENCH_MAX_STEP_GFLOP`.

A step's refusal names what the user can change, one item per field:
`data.batch_size`, `data.input_shape` (a synthetic dataset's), the model's `width` (the study's
`model.width`, or `arms.N.model.width` where an arm overrides it), and `resources.cohort_size`
when only the cohort (K trials trained together in one task) is over the memory limit.
`ratebench run` trains on the user's own machine and does not apply these limits.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from service.refusals import BudgetExceededError, check_budget
from worker.footprint import ArmFootprint, arm_footprint
from worker.spec import StudySpec
from worker.tasks import check_data_source, get_task, public_paths

if TYPE_CHECKING:
    from service.config import Settings

__all__ = ["Problem", "admission_problems", "step_problems"]

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str, str]  # the field, the message, the kind (an error `type` of the 422)
_GIB = 2**30


def _model_loc(spec: StudySpec, index: int, field: str) -> Loc:
    arm = spec.arms[index]
    if getattr(arm.model, field) is not None:
        return ("arms", index, "model", field)
    return ("model", field)


def _size_locs(spec: StudySpec, index: int) -> list[Loc]:
    """The fields that set a step's size: batch, input shape, width."""
    locs: list[Loc] = [("data", "batch_size")]
    if get_task(spec.task).dataset.name == "synthetic":
        locs.append(("data", "input_shape"))
    locs.append(_model_loc(spec, index, "width"))
    return locs


def _names(locs: list[Loc]) -> str:
    return ", ".join(".".join(str(part) for part in loc) for loc in locs)


def _shape(spec: StudySpec) -> str:
    task = get_task(spec.task)
    shape = list(task.input_shape(spec.data.model_dump()))
    return f"{task.model.name} on inputs {shape} in batches of {spec.data.batch_size}"


def _memory_problem(spec: StudySpec, item: ArmFootprint, limit: int) -> list[tuple[Loc, str]]:
    step = item.footprint
    allowed = f"this service allows {limit / _GIB:.3g} GiB per trial (RATEBENCH_MAX_STEP_MEMORY_GB)"
    if step.memory_bytes > limit:
        locs = _size_locs(spec, item.index)
        message = (
            f"one training step of the {_shape(spec)} needs an estimated "
            f"{step.memory_bytes / _GIB:.3g} GiB ({step.activations * 4 / _GIB:.3g} GiB of "
            f"activations); {allowed}: lower {_names(locs)}"
        )
        return [(loc, message) for loc in locs]
    if item.task_memory_bytes > limit:
        message = (
            f"a cohort of {item.cohort} trials trained together needs an estimated "
            f"{item.task_memory_bytes / _GIB:.3g} GiB ({step.memory_bytes / _GIB:.3g} GiB each); "
            f"{allowed}: set resources.cohort_size to at most "
            f"{max(1, limit // step.memory_bytes)}"
        )
        return [(("resources", "cohort_size"), message)]
    return []


def _flops_problem(spec: StudySpec, item: ArmFootprint, limit: int) -> list[tuple[Loc, str]]:
    flops = item.footprint.flops
    if flops <= limit:
        return []
    locs = _size_locs(spec, item.index)
    message = (
        f"one training step of the {_shape(spec)} needs an estimated {flops:.3g} floating-point "
        f"operations; this service allows {limit:.3g} (RATEBENCH_MAX_STEP_GFLOP): lower "
        f"{_names(locs)}"
    )
    return [(loc, message) for loc in locs]


def step_problems(
    spec: StudySpec, memory_bytes: int, flops: int, deadline: float | None = None
) -> list[Problem]:
    """Each field at which an arm's step (or cohort task) is over the limits, once; past the
    `deadline` (`time.monotonic()`), one problem that says so."""
    problems: dict[Loc, str] = {}
    for index in range(len(spec.arms)):
        if deadline is not None and time.monotonic() > deadline:
            message = (
                "estimating this spec's steps took longer than this service allows; use fewer "
                "arms or fewer distinct model options"
            )
            return [((), message, "validation_time")]
        item = arm_footprint(spec, index)
        for loc, message in [
            *_memory_problem(spec, item, memory_bytes),
            *_flops_problem(spec, item, flops),
        ]:
            problems.setdefault(loc, message)
    return [(loc, message, "step_cost") for loc, message in problems.items()]


def admission_problems(
    spec: StudySpec, settings: Settings, *, redact: bool, deadline: float | None = None
) -> list[Problem]:
    """Everything the service refuses of `spec` (see the module docstring). `redact`: the
    answer goes to a client, so no server path appears in it (`worker.tasks.public_paths`)."""
    roots = settings.allowed_data_roots()
    problems: list[Problem] = []
    problem = check_data_source(spec.task, spec.data.model_dump(), roots)
    if problem is not None:
        shown = public_paths(problem, roots) if redact else problem
        problems.append((("data", "data_dir"), shown, "spec"))
    try:
        check_budget(spec.estimated_steps(), settings.max_study_steps)
    except BudgetExceededError as exc:
        problems.append((exc.loc, str(exc), "compute_budget"))
    memory = int(settings.max_step_memory_gb * _GIB)
    problems += step_problems(spec, memory, int(settings.max_step_gflop * 1e9), deadline)
    return problems
