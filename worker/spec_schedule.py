"""An arm's learning-rate schedule as a spec states it, and the schedule its trials train with.

The formulas are `optim.schedules`' (one place); this module owns what a spec may say:

- `ScheduleSpec`, an arm's `schedule`: `"cosine"` or `{"name": "cosine", "warmup": 0.05}`.
  `name` is `constant` (the default), `cosine`, `linear` or `step`; any of them takes a linear
  warm-up, as `warmup` (a fraction of training) or `warmup_epochs`; `floor` belongs to cosine
  and linear (the final rate as a fraction of the peak, default 0), `milestones` (fractions of
  training, required) and `factor` (default 0.1) to step. A field that the named schedule does
  not use is refused at its own path, so a typo cannot pass as a setting.
- Swept fields are search-space entries `schedule.<field>` (`SWEPT_FIELDS`: `warmup`,
  `warmup_epochs`, `floor`, `factor`), ranges or values like any hyperparameter; each trial's
  value lands in its schedule (`split_params`), so members of one cohort may train with
  different schedules. `name` and `milestones` are not swept: a different shape is another arm.
- `check_schedule` holds the checks that need the rest of the spec (the budget, the search
  space); `label_part` and `setting_fields` are how labels and leaderboard settings name a
  schedule. An arm without one (or with the default) adds nothing to either, so labels and
  setting ids of specs without schedules stay what they were.

`ScheduleSpec.resolve` turns a trial's schedule into `optim.schedules.Schedule` once the
trial knows its steps per epoch: warm-up epochs become `round(warmup_epochs × steps per
epoch)` steps, a warm-up fraction `round(warmup × total steps)`.

Nothing here imports torch or `worker.spec` at load time (`worker.spec` imports this).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from worker.spec_base import MAX_EPOCHS, Problem, Strict, spec_error

if TYPE_CHECKING:
    from optim.schedules import Schedule
    from worker.arms.optuna.spec import OptunaArmSpec
    from worker.spec import StudySpec
    from worker.spec_options import SearchDimension

__all__ = [
    "PREFIX",
    "SWEPT_FIELDS",
    "ScheduleSpec",
    "check_schedule",
    "is_schedule_param",
    "label_part",
    "schedule_text",
    "setting_fields",
    "split_params",
    "swept_fields",
]

PREFIX = "schedule."  # a search-space entry `schedule.warmup` sweeps the schedule's warm-up
SWEPT_FIELDS = ("warmup", "warmup_epochs", "floor", "factor")
_USES = {"floor": ("cosine", "linear"), "milestones": ("step",), "factor": ("step",)}
_DEFAULTS = {"floor": 0.0, "factor": 0.1}


class ScheduleSpec(Strict):
    """The rate schedule of an arm's trials (module docstring; formulas in `optim.schedules`)."""

    name: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup: float | None = Field(
        None, ge=0, description="linear warm-up, as a fraction of training (or warmup_epochs)"
    )
    warmup_epochs: float | None = Field(
        None, ge=0, le=MAX_EPOCHS, description="linear warm-up in epochs (or warmup)"
    )
    floor: float | None = Field(
        None, ge=0, le=1, description="cosine, linear: the final rate, a fraction of the peak (0)"
    )
    milestones: list[float] | None = Field(
        None, min_length=1, max_length=32,
        description="step: where the rate drops, as fractions of training (required)",
    )  # fmt: skip
    factor: float | None = Field(
        None, gt=0, le=1, description="step: the rate's multiplier at each milestone (0.1)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("warmup")
    @classmethod
    def _fraction(cls, value: float | None) -> float | None:
        if value is not None and value >= 1:
            raise spec_error(
                f"a fraction of training, below 1; got {value:g} (give warmup_epochs for epochs)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleSpec:
        problems: list[tuple[str, str, Any]] = []
        for field, names in _USES.items():
            value = getattr(self, field)
            if value is not None and self.name not in names:
                message = f"only the {' and '.join(names)} schedules take {field}, not {self.name}"
                problems.append((field, message, value))
        if self.warmup is not None and self.warmup_epochs is not None:
            message = "give warmup (a fraction of training) or warmup_epochs, not both"
            problems.append(("warmup_epochs", message, self.warmup_epochs))
        if self.name == "step" and self.milestones is None:
            message = "the step schedule needs milestones, e.g. [0.5, 0.75] (fractions of training)"
            problems.append(("milestones", message, None))
        points = [0.0, *(self.milestones or []), 1.0]
        if any(not a < b for a, b in itertools.pairwise(points)):
            message = f"must increase strictly within (0, 1), got {self.milestones}"
            problems.append(("milestones", message, self.milestones))
        if problems:
            errors = [
                InitErrorDetails(type=spec_error(message), loc=(field,), input=value)
                for field, message, value in problems
            ]
            raise ValidationError.from_exception_data("ScheduleSpec", errors)
        return self

    def resolve(self, steps_per_epoch: int, epochs: int) -> Schedule:
        """The schedule of a trial that trains `epochs` × `steps_per_epoch` steps."""
        from optim.schedules import Schedule

        total = epochs * steps_per_epoch
        if self.warmup_epochs is not None:
            warmup = round(self.warmup_epochs * steps_per_epoch)
        else:
            warmup = round((self.warmup or 0.0) * total)
        return Schedule(
            total_steps=total,
            name=self.name,
            warmup_steps=min(warmup, total),
            floor=_DEFAULTS["floor"] if self.floor is None else self.floor,
            milestones=tuple(self.milestones or ()),
            factor=_DEFAULTS["factor"] if self.factor is None else self.factor,
        )


def is_schedule_param(name: str) -> bool:
    """Whether a search-space entry (an Optuna parameter) is a schedule field."""
    return name.startswith(PREFIX)


def split_params(
    values: Mapping[str, Any], schedule: ScheduleSpec
) -> tuple[dict[str, Any], ScheduleSpec]:
    """A trial's values as the scheme's hyperparameters, and the arm's `schedule` with the
    trial's swept schedule fields filled in."""
    own = {k[len(PREFIX) :]: v for k, v in values.items() if is_schedule_param(k)}
    hyperparameters = {k: v for k, v in values.items() if not is_schedule_param(k)}
    if own:
        schedule = ScheduleSpec.model_validate({**schedule.model_dump(exclude_none=True), **own})
    return hyperparameters, schedule


def swept_fields(spec: StudySpec, arm: OptunaArmSpec) -> list[str]:
    """The schedule fields the arm's search space sweeps, in order."""
    space = spec.arm_search_space(arm)
    return [name[len(PREFIX) :] for name in space if is_schedule_param(name)]


def _dimension_problem(
    schedule: ScheduleSpec, field: str, dim: SearchDimension, swept: list[str], epochs: int
) -> str | None:
    """Why a search-space entry `schedule.<field>` cannot be swept, or None."""
    if field not in SWEPT_FIELDS:
        known = ", ".join(PREFIX + f for f in SWEPT_FIELDS)
        return f"the schedule has no field {field!r} to search; searchable: {known}"
    if field in _USES and schedule.name not in _USES[field]:
        return f"only the {' and '.join(_USES[field])} schedules take {field}, not {schedule.name}"
    if getattr(schedule, field) is not None:
        return f"{field} is both fixed (the arm's schedule) and searched; keep one"
    other = {"warmup": "warmup_epochs", "warmup_epochs": "warmup"}.get(field)
    if other is not None and (getattr(schedule, other) is not None or other in swept):
        return "give warmup (a fraction of training) or warmup_epochs, not both"
    if dim.auto:
        return "a schedule field has no registered range; give low and high, or values"
    if dim.values is not None and any(isinstance(v, bool) for v in dim.values):
        return f"{field} is a number, got {dim.values}"
    points = list(dim.values) if dim.values is not None else [dim.low, dim.high]
    for value in points:
        assert value is not None
        valid = _range(field, epochs)
        if valid is not None and not valid[0](float(value)):
            return f"{field} must lie in {valid[1]}, got {value:g}"
    return None


def _range(field: str, epochs: int) -> tuple[Callable[[float], bool], str] | None:
    """The valid values of a swept schedule field: a test and its words."""
    if field == "warmup":
        return (lambda v: 0 <= v < 1), "[0, 1) (a fraction of training)"
    if field == "warmup_epochs":
        return (lambda v: 0 <= v < epochs), f"[0, {epochs}) (below budget.epochs)"
    if field == "floor":
        return (lambda v: 0 <= v <= 1), "[0, 1]"
    if field == "factor":
        return (lambda v: 0 < v <= 1), "(0, 1]"
    return None


def check_schedule(spec: StudySpec, index: int, arm: OptunaArmSpec) -> list[Problem]:
    """The arm's schedule against the budget, and its swept fields against the schedule."""
    schedule = spec.arm_schedule(arm)
    problems: list[Problem] = []
    if schedule.warmup_epochs is not None and schedule.warmup_epochs >= spec.budget.epochs:
        message = f"must be below budget.epochs ({spec.budget.epochs}): a warm-up within training"
        at = ("arms", index, "schedule", "warmup_epochs")
        problems.append((at, message, schedule.warmup_epochs))
    own = arm.search_space or {}
    swept = swept_fields(spec, arm)
    for name, dim in spec.arm_search_space(arm).items():
        if not is_schedule_param(name):
            continue
        field = name[len(PREFIX) :]
        problem = _dimension_problem(schedule, field, dim, swept, spec.budget.epochs)
        if problem is not None:
            loc: tuple[str | int, ...] = ("search_space", name)
            if name in own:  # the arm's own entry, not the study's
                loc = ("arms", index, *loc)
            else:  # the study's entry applies to every arm: say which one it fails
                problem = f"{problem} (arm {index})"
            problems.append((loc, problem, None))
    return problems


def _canonical(schedule: ScheduleSpec, swept: list[str]) -> dict[str, Any]:
    """Every field the named schedule uses, defaults filled in, swept ones as "searched"; a
    warm-up of 0 is no warm-up (left out)."""
    fields: dict[str, Any] = {"name": schedule.name}
    for field in ("warmup", "warmup_epochs"):
        value = getattr(schedule, field)
        if field in swept:
            fields[field] = "searched"
        elif value:
            fields[field] = value
    for field in ("floor", "milestones", "factor"):
        if schedule.name not in _USES[field]:
            continue
        value = getattr(schedule, field)
        if field in swept:
            fields[field] = "searched"
        else:
            fields[field] = _DEFAULTS[field] if value is None and field in _DEFAULTS else value
    return fields


def setting_fields(schedule: ScheduleSpec, swept: list[str]) -> dict[str, Any] | None:
    """The schedule as a leaderboard setting names it; None for the constant rate without
    warm-up (the default), so settings without a schedule keep their ids."""
    fields = _canonical(schedule, swept)
    return None if fields == {"name": "constant"} else fields


def label_part(schedule: ScheduleSpec, swept: list[str]) -> str | None:
    """The schedule's part of a derived arm label: `cosine`, `warmup-cosine`, `warmup` (a
    constant rate after a warm-up); None for the default."""
    fields = _canonical(schedule, swept)
    warm = "warmup" in fields or "warmup_epochs" in fields
    if schedule.name == "constant":
        return "warmup" if warm else None
    return f"warmup-{schedule.name}" if warm else schedule.name


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def schedule_text(fields: Mapping[str, Any] | None) -> str:
    """`cosine, warmup 0.05, floor 0` from `setting_fields` (None: `constant`)."""
    if not fields:
        return "constant"
    rest = ", ".join(f"{k.replace('_', ' ')} {_text(v)}" for k, v in fields.items() if k != "name")
    return f"{fields['name']}, {rest}" if rest else str(fields["name"])
