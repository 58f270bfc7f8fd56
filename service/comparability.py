"""What makes results comparable across studies: an arm's *setting*, and the filters on it.

Two studies on the same task are only comparable when they trained the same model on the same
data for the same budget and judged it by the same objective; two arms with the same label are
only the same arm when they also fix the same hyperparameters (sgd with momentum 0.9 is not sgd
without). So task leaderboards pool an arm's results only within one setting:

- a study's **group** (one table on the task page): the study's model options, its data
  options (where the data lie, `data_dir`, is left out: it says where, not what), its budget's
  `epochs` and `steps_per_epoch`, and its objective (`metric`, `direction`);
- an arm's **setting**: the group's fields with the model options after the arm's overrides,
  plus the arm's `fixed` hyperparameters, its `tuner` and its learning-rate `schedule`
  (`worker.spec_schedule.setting_fields`: only when it is not the constant rate, so the ids of
  settings without a schedule are what they were). Rows of a table are keyed by
  (setting, arm label), so arms a study compared side by side (e.g. `sgd` and `sgd+transformed`)
  stay in one table, as separate rows, and arms with different schedules never pool.

Each has a stable short id: the first 10 hex digits of the SHA-256 of its canonical JSON (keys
sorted, no spaces), so the id of a setting never depends on which study or machine computed it.

Filters (`GET /api/v1/leaderboard?task=…&epochs=15&model.width=64&fixed.momentum=0.9`) select
arms by setting field; `parse_filters` turns query parameters into them, refusing unknown names.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.arms.optuna.spec import OptunaArmSpec
from worker.spec import ArmSpec, DataOptions, ModelOptions, StudySpec
from worker.spec_schedule import ScheduleSpec, schedule_text, setting_fields, swept_fields

__all__ = [
    "FILTER_HELP",
    "FilterError",
    "Setting",
    "arm_setting",
    "filter_fields",
    "matches",
    "parse_filters",
    "study_setting",
]

_DATA_LEFT_OUT = {"data_dir"}
_BUDGET = ("epochs", "steps_per_epoch")
_PLAIN = ("setting", "epochs", "steps_per_epoch")
_PREFIXES = {
    "model": set(ModelOptions.model_fields),
    "data": set(DataOptions.model_fields) - _DATA_LEFT_OUT,
    "schedule": set(ScheduleSpec.model_fields),
}

FILTER_HELP = (
    "Filters on the arms' settings, as further query parameters (each one narrows the board; "
    "values are JSON scalars or plain text, `null` for an option left at its default): "
    "`setting=<id>` (a group's or an arm setting's id), `epochs=15`, `steps_per_epoch=50`, "
    "`model.<option>=…` for any model option (`model.width=64`, `model.transformed=true`), "
    "`data.<option>=…` for any data option (`data.batch_size=128`), and `fixed.<name>=…` for a "
    "fixed hyperparameter (`fixed.momentum=0.9`; `null` for the arms that do not fix it), and "
    "`schedule.<field>=…` for the learning-rate schedule (`schedule.name=cosine`, "
    "`schedule.warmup=0.05`; `searched` for a swept field, `null` where the schedule has none). "
    "An unknown parameter name is refused with 422 naming it."
)


@dataclass(frozen=True)
class Setting:
    id: str
    fields: dict[str, Any]
    description: str


def _id(fields: Mapping[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pairs(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {_text(value)}" for key, value in options.items() if value is not None)


def _model_text(model: Mapping[str, Any]) -> str:
    shown = dict(model)
    if not shown.get("transformed"):  # the plain network: say nothing of transformed units
        shown.pop("transformed", None)
        shown.pop("transform_every", None)
    shown = {k: ("default" if v is None else v) for k, v in shown.items()}
    return _pairs(shown)


def _budget_text(budget: Mapping[str, Any]) -> str:
    epochs, steps = budget["epochs"], budget["steps_per_epoch"]
    per_epoch = "one pass" if steps is None else f"{steps} steps"
    return f"{epochs} epoch{'s' if epochs != 1 else ''} × {per_epoch}"


def study_setting(spec: StudySpec) -> Setting:
    """The study's group: what every arm of the study shares."""
    fields = {
        "model": spec.model.model_dump(),
        "data": spec.data.model_dump(exclude=_DATA_LEFT_OUT),
        "budget": {name: getattr(spec.budget, name) for name in _BUDGET},
        "objective": {"metric": spec.objective.metric, "direction": spec.objective.direction},
    }
    description = " · ".join(
        [
            f"model: {_model_text(fields['model'])}",
            f"data: {_pairs(fields['data'])}",
            f"budget: {_budget_text(fields['budget'])}",
            f"objective: {spec.objective.metric} ({spec.objective.direction})",
        ]
    )
    return Setting(_id(fields), fields, description)


def arm_setting(spec: StudySpec, arm: ArmSpec | None) -> Setting:
    """The arm's setting; its description names only what the arm sets beyond its group (an
    arm missing from its study's spec gets the group's fields and says so)."""
    group = study_setting(spec).fields
    if arm is None:
        fields = {**group, "arm": None}
        return Setting(_id(fields), fields, "arm not found in its study's spec")
    fixed: dict[str, Any] = getattr(arm, "fixed", None) or {}  # a hypergradient arm has none
    fields = {
        **group,
        "model": spec.arm_model(arm).model_dump(),
        "fixed": dict(sorted(fixed.items())),
        "tuner": arm.tuner,
    }
    schedule = None
    if isinstance(arm, OptunaArmSpec):
        schedule = setting_fields(spec.arm_schedule(arm), swept_fields(spec, arm))
    if schedule is not None:  # absent for the constant rate: those ids stay as they were
        fields["schedule"] = schedule
    parts = []
    overrides = arm.model.model_dump(exclude_none=True)
    if overrides:
        parts.append(f"model: {_pairs(overrides)}")
    if fixed:
        parts.append(f"fixed: {_pairs(fields['fixed'])}")
    if schedule is not None:
        parts.append(f"schedule: {schedule_text(schedule)}")
    if arm.tuner != "optuna":
        parts.append(f"tuner: {arm.tuner}")
    return Setting(_id(fields), fields, " · ".join(parts) or "scheme defaults")


class FilterError(ValueError):
    """A query parameter that names no filter, or one given twice."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _value(text: str) -> Any:
    if text.lstrip()[:1] in ("[", "{"):  # never a scalar; and JSON's parser recurses on depth
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return value  # a step schedule's milestones
    return value if value is None or isinstance(value, bool | int | float | str) else text


def _known(name: str) -> bool:
    if name in _PLAIN:
        return True
    prefix, _, rest = name.partition(".")
    if prefix == "fixed":
        return bool(rest)
    return rest in _PREFIXES.get(prefix, set())


def parse_filters(
    params: Iterable[tuple[str, str]], reserved: Iterable[str] = (), skip_blank: bool = False
) -> dict[str, Any]:
    """`{name: value}` from query parameters, leaving out the `reserved` ones (e.g. `task`);
    a web form's empty fields are skipped with `skip_blank`. FilterError names the parameter."""
    skip = set(reserved)
    filters: dict[str, Any] = {}
    for name, text in params:
        if name in skip or (skip_blank and text == ""):
            continue
        if not _known(name):
            raise FilterError(name, f"unknown filter {name!r}; {_known_names()}")
        if name in filters:
            raise FilterError(name, f"filter {name!r} given twice")
        filters[name] = text if name == "setting" else _value(text)
    return filters


def _known_names() -> str:
    model = ", ".join(f"model.{n}" for n in sorted(_PREFIXES["model"]))
    data = ", ".join(f"data.{n}" for n in sorted(_PREFIXES["data"]))
    schedule = ", ".join(f"schedule.{n}" for n in sorted(_PREFIXES["schedule"]))
    return f"known: {', '.join(_PLAIN)}, {model}, {data}, fixed.<hyperparameter>, {schedule}"


def filter_fields(group: Setting, arm: Setting) -> dict[str, Any]:
    """The filterable fields of an arm's row (`epochs`, `model.width`, `fixed.momentum`, …)."""
    out: dict[str, Any] = {name: group.fields["budget"][name] for name in _BUDGET}
    for prefix in ("model", "data"):
        out.update({f"{prefix}.{k}": v for k, v in (arm.fields[prefix] or {}).items()})
    out.update({f"fixed.{k}": v for k, v in (arm.fields.get("fixed") or {}).items()})
    if arm.fields:  # an unreadable study's arm has no fields at all
        schedule = arm.fields.get("schedule") or {"name": "constant"}
        out.update({f"schedule.{k}": v for k, v in schedule.items()})
    return out


def _equal(a: Any, b: Any) -> bool:
    """JSON-ish equality: 64 equals 64.0, but a flag is never a number (True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def matches(filters: Mapping[str, Any], group: Setting, arm: Setting) -> bool:
    """Whether an arm's row passes every filter (`setting` matches its group's or its own id)."""
    fields = filter_fields(group, arm)
    for name, wanted in filters.items():
        if name == "setting":
            if wanted not in (group.id, arm.id):
                return False
        elif not _equal(fields.get(name), wanted):  # an unfixed hyperparameter reads as null
            return False
    return True
