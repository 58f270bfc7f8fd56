"""A study's results where practitioners look for them: trials as CSV, and the whole study as
one JSON bundle that another ratebench database can import.

CSV (`trial_csv`), one row per trial of every arm (sweep, then final seeds), in two forms:

- `wide` (the default): `arm, role, trial, state, outcome, objective, duration_s, seed,
  attempt, node` (`node`: the host, Ray node address and Ray node id the trial ran on), one
  `param_<name>` column per hyperparameter of any arm (searched or fixed), then
  `steps, test_loss, test_accuracy, error`, then the per-epoch history as
  `epoch_<n>_<metric>` columns (`epoch_1_val_accuracy`, …);
- `long`: one row per trial × epoch × metric, `epoch, metric, value` after the trial's
  identity and parameters (a trial without history keeps one row with those cells empty),
  the shape plotting libraries want.

`outcome` is `complete`, `pruned`, `diverged` or `failed` (a diverged trial is COMPLETE in
Optuna). Strings a user chose (arm labels, errors, categorical parameters) that begin like a
spreadsheet formula get a leading `'`, so opening the file never runs one.

The bundle (`FORMAT`, `VERSION`) holds the study row, its stored leaderboard rows and every
Optuna study of its arms with each trial's parameters and distributions, values, state,
intermediate values, attributes and times (timezone-aware: Optuna's naive UTC is written with
its `+00:00`). `public_bundle` is what a reader who does not own the study gets
(`service.privacy`). `load_bundle` checks a bundle without writing; `import_bundle` writes it
into a database with the same study id, all or nothing.

A bundle is a file from elsewhere, so `load_bundle` trusts none of it: JSON nested deeper than
a bundle needs is refused before parsing; the study id must be one this service could have
made (`STUDY_ID_PATTERN`: no `/`, so its Optuna studies `<id>/<arm>` can never be named like
another study's, e.g. a forged `<victim>/<arm>` + `/final` that a running victim would adopt
as its final seeds; nor `..`, which would put its plot cache outside its folder); its name,
task and rows must fit their columns and agree with its spec; every leaderboard row must name
an arm of the spec with its scheme, the spec's objective, and numbers of the right kind.
`import_bundle` also refuses an id under which the database already holds any Optuna study.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import optuna
import sqlalchemy as sa
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial
from sqlalchemy.orm import Session

from service.db import session_scope
from service.json_depth import json_depth_exceeded
from service.models import STUDY_ID_PATTERN, ArmResult, StudyRecord, StudyStatus
from service.privacy import public_environment, public_spec, public_trial_attrs
from worker.arms.base import final_study_name, sweep_study_name
from worker.results import TrialRecord
from worker.spec import StudySpec
from worker.storage import open_storage

__all__ = [
    "FORMAT",
    "VERSION",
    "Bundle",
    "BundleError",
    "CsvForm",
    "import_bundle",
    "load_bundle",
    "optuna_studies",
    "public_bundle",
    "study_part",
    "trial_csv",
]

FORMAT = "ratebench-export"
VERSION = 1
CsvForm = Literal["wide", "long"]

_IDENTITY = ("arm", "role", "trial", "state", "outcome", "objective")
_WIDE_HEAD = (*_IDENTITY, "duration_s", "seed", "attempt", "node")
_WIDE_TAIL = ("steps", "test_loss", "test_accuracy", "error")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_OUTCOMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
_ARM_COLUMNS = (
    "task", "arm", "scheme", "metric", "direction", "rank", "best_lr", "objective_mean",
    "objective_std", "test_mean", "n_trials", "n_diverged", "summary",
)  # fmt: skip
_STUDY_TIMES = ("created_at", "started_at", "finished_at")
_OPTIONAL_STUDY_COLUMNS = ("environment", "source", "faults")  # newer: copied when both have


# --- CSV -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A CSV cell: numbers in full precision, structures as JSON, formula-like text defused."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _outcome(trial: TrialRecord) -> str:
    return trial.outcome or _OUTCOMES.get(trial.state, trial.state.lower())


def _params(trial: TrialRecord) -> dict[str, Any]:
    """The trial's hyperparameters: the arm's fixed ones, the rate, then the searched ones."""
    attrs = trial.user_attrs
    params: dict[str, Any] = dict(attrs.get("fixed") or {})
    if attrs.get("lr") is not None:
        params["lr"] = attrs["lr"]
    params.update(trial.params)
    return params


def _history(trial: TrialRecord) -> list[dict[str, Any]]:
    history = trial.user_attrs.get("history")
    return [r for r in history if isinstance(r, dict)] if isinstance(history, list) else []


def _duration(trial: TrialRecord) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 3)


def node_label(node: Any) -> str | None:
    """A trial's `node` attribute as one cell: host, Ray node address and Ray node id (the id
    tells apart nodes that share a machine), those that are known, space-separated."""
    if not isinstance(node, dict):
        return None
    parts = [node.get(k) for k in ("hostname", "ip", "ray_node_id")]
    return " ".join(str(p) for p in parts if p) or None


def _first_seen(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def trial_csv(trials: Sequence[TrialRecord], form: CsvForm = "wide") -> str:
    """The trials as CSV text in `form` (see the module's docstring for the columns)."""
    params = _first_seen(name for t in trials for name in _params(t))
    metrics = _first_seen(k for t in trials for r in _history(t) for k in r if k != "epoch")
    out = io.StringIO()
    writer = csv.writer(out)
    param_columns = [f"param_{name}" for name in params]
    if form == "wide":
        epochs = sorted({r["epoch"] for t in trials for r in _history(t) if "epoch" in r})
        seen = {(r["epoch"], k) for t in trials for r in _history(t) if "epoch" in r for k in r}
        pairs = [(e, m) for e in epochs for m in metrics if (e, m) in seen]
        writer.writerow(
            [*_WIDE_HEAD, *param_columns, *_WIDE_TAIL, *(f"epoch_{e}_{m}" for e, m in pairs)]
        )
        for t in trials:
            by_epoch = {r["epoch"]: r for r in _history(t) if "epoch" in r}
            values = _params(t)
            attrs = t.user_attrs
            row = [
                *_identity(t), _duration(t), attrs.get("seed"), attrs.get("attempt"),
                node_label(attrs.get("node")),
                *(values.get(name) for name in params),
                *(attrs.get(name) for name in _WIDE_TAIL),
                *(by_epoch.get(e, {}).get(m) for e, m in pairs),
            ]  # fmt: skip
            writer.writerow([_cell(v) for v in row])
    else:
        writer.writerow([*_IDENTITY, *param_columns, "epoch", "metric", "value"])
        for t in trials:
            values = _params(t)
            head = [*_identity(t), *(values.get(name) for name in params)]
            cells: list[tuple[Any, str | None, Any]] = [
                (r.get("epoch"), m, r[m]) for r in _history(t) for m in metrics if m in r
            ]
            for epoch, metric, value in cells or [(None, None, None)]:
                writer.writerow([_cell(v) for v in (*head, epoch, metric, value)])
    return out.getvalue()


def _identity(t: TrialRecord) -> list[Any]:
    return [t.arm, t.role, t.number, t.state, _outcome(t), t.value]


# --- export ----------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null (the worker stores none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 with its offset; a naive time (Optuna's) is UTC."""
    if value is None:
        return None
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()


def study_part(session: Session, study_id: str) -> dict[str, Any] | None:
    """The bundle without its Optuna studies: the study row and its leaderboard rows; None
    when there is no such study."""
    study = session.get(StudyRecord, study_id)
    if study is None:
        return None
    row: dict[str, Any] = {
        "id": study.id, "name": study.name, "task": study.task, "status": study.status,
        "spec": study.spec, "error": study.error, "progress": study.progress,
        "attempts": study.attempts,
        **{name: _iso(getattr(study, name)) for name in _STUDY_TIMES},
    }  # fmt: skip
    for name in _OPTIONAL_STUDY_COLUMNS:
        value = getattr(study, name, None)
        if value is not None:
            row[name] = value
    arms = session.scalars(
        sa.select(ArmResult).where(ArmResult.study_id == study.id).order_by(ArmResult.rank)
    )
    return _finite(
        {
            "format": FORMAT,
            "version": VERSION,
            "study": row,
            "arm_results": [{c: getattr(a, c) for c in _ARM_COLUMNS} for a in arms],
        }
    )


def _study_names(study_id: str, spec: StudySpec) -> list[str]:
    return [
        name(study_id, label)
        for label in spec.labels
        for name in (sweep_study_name, final_study_name)
    ]


def _trial_json(t: FrozenTrial) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "values": t.values,
        "params": t.params,
        "distributions": {
            k: json.loads(distribution_to_json(d)) for k, d in t.distributions.items()
        },
        "intermediate_values": {str(step): v for step, v in t.intermediate_values.items()},
        "user_attrs": t.user_attrs,
        "system_attrs": t.system_attrs,
        "datetime_start": _iso(t.datetime_start),
        "datetime_complete": _iso(t.datetime_complete),
    }


def optuna_studies(storage_url: str, study_id: str, spec: StudySpec) -> list[dict[str, Any]]:
    """Every Optuna study of the study's arms (sweep and final seeds) that exists, with all
    its trials in number order."""
    storage = open_storage(storage_url)
    out = []
    try:
        for name in _study_names(study_id, spec):
            try:
                optuna_id = storage.get_study_id_from_name(name)
            except KeyError:
                continue
            trials = storage.get_all_trials(optuna_id, deepcopy=False)
            out.append(
                {
                    "study_name": name,
                    "directions": [d.name for d in storage.get_study_directions(optuna_id)],
                    "user_attrs": storage.get_study_user_attrs(optuna_id),
                    "system_attrs": storage.get_study_system_attrs(optuna_id),
                    "trials": [_trial_json(t) for t in sorted(trials, key=lambda t: t.number)],
                }
            )
    finally:
        storage.engine.dispose()
    return list(_finite(out))


# --- import ----------------------------------------------------------------------------------


class BundleError(ValueError):
    """The bundle cannot be imported: not a bundle, a version this code cannot read, or it
    would overwrite a study the database has. One line, for the user."""


@dataclass(frozen=True)
class OptunaStudy:
    name: str
    directions: list[StudyDirection]
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    trials: list[FrozenTrial]


@dataclass(frozen=True)
class Bundle:
    """A checked bundle, ready to write."""

    study: StudyRecord
    arm_results: list[ArmResult]
    optuna_studies: list[OptunaStudy]


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _optuna_time(value: Any) -> datetime | None:
    """A trial's time as Optuna stores it: naive UTC (an older bundle's naive time is so)."""
    time = _time(value)
    if time is None or time.tzinfo is None:
        return time
    return time.astimezone(UTC).replace(tzinfo=None)


def _trial(data: dict[str, Any]) -> FrozenTrial:
    state = TrialState[data["state"]]
    trial = create_trial(
        state=state,
        values=data["values"],
        params=dict(data["params"]),
        distributions={
            k: json_to_distribution(json.dumps(d)) for k, d in data["distributions"].items()
        },
        user_attrs=dict(data["user_attrs"]),
        system_attrs=dict(data["system_attrs"]),
        intermediate_values={int(k): v for k, v in data["intermediate_values"].items()},
    )
    trial.datetime_start = _optuna_time(data["datetime_start"])
    trial.datetime_complete = _optuna_time(data["datetime_complete"])
    return trial


def public_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """The bundle as a reader who does not own the study sees it: without the hosts it ran on
    and its data folder (`service.privacy`)."""
    study = dict(bundle["study"])
    study["spec"] = public_spec(study["spec"])
    if "environment" in study:
        study["environment"] = public_environment(study["environment"])
    trials = [
        {**s, "trials": [{**t, "user_attrs": public_trial_attrs(t["user_attrs"])}
                         for t in s["trials"]]}
        for s in bundle.get("trials", [])
    ]  # fmt: skip
    return {**bundle, "study": study, "trials": trials}


def _check_study(data: dict[str, Any]) -> None:
    """The study row's identity and text fields, before anything uses them."""
    study_id = data["id"]
    if not isinstance(study_id, str) or not re.fullmatch(STUDY_ID_PATTERN, study_id):
        raise BundleError(
            f"study.id {str(study_id)[:120]!r}: not a study id (1 to 100 letters, digits, "
            "'_', '.' or '-', starting with a letter, digit or '_')"
        )
    for name, limit in (("name", 200), ("task", 100)):
        value = data[name]
        if not isinstance(value, str) or not 1 <= len(value) <= limit:
            raise BundleError(f"study.{name}: must be text of 1 to {limit} characters")
    if data.get("error") is not None and not isinstance(data["error"], str):
        raise BundleError("study.error: must be text or null")
    for name in ("spec", "progress", "environment"):
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            raise BundleError(f"study.{name}: must be an object")
    attempts = data.get("attempts") or 0
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise BundleError("study.attempts: must be a whole number, at least 0")


def _check_arm_rows(rows: Any, spec: StudySpec, task: str) -> None:
    """Every leaderboard row names an arm of `spec` (once) with its scheme, the study's task
    and objective, and has numbers where numbers go."""
    if not isinstance(rows, list):
        raise BundleError("arm_results: must be a list")
    schemes = {str(arm.label): arm.optimizer for arm in spec.arms}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"arm_results[{i}]"
        if not isinstance(row, dict):
            raise BundleError(f"{where}: must be an object")
        arm = row.get("arm")
        if arm not in schemes or arm in seen:
            raise BundleError(f"{where}.arm: {str(arm)[:80]!r} is not an arm of the study's spec "
                              "(or is listed twice)")  # fmt: skip
        seen.add(arm)
        expected = {
            "scheme": schemes[arm], "task": task, "metric": spec.objective.metric,
            "direction": spec.objective.direction,
        }  # fmt: skip
        for name, value in expected.items():
            if row.get(name) != value:
                raise BundleError(f"{where}.{name}: {str(row.get(name))[:80]!r}, but the "
                                  f"study's spec says {value!r}")  # fmt: skip
        for name in ("best_lr", "objective_mean", "objective_std", "test_mean"):
            value = row.get(name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not (number and math.isfinite(value)):
                raise BundleError(f"{where}.{name}: must be a finite number or null")
        for name in ("rank", "n_trials", "n_diverged"):
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BundleError(f"{where}.{name}: must be a whole number, at least 0")
        if not isinstance(row.get("summary"), dict):
            raise BundleError(f"{where}.summary: must be an object")


def _record(data: dict[str, Any]) -> StudyRecord:
    _check_study(data)
    study = StudyRecord(
        id=str(data["id"]), name=str(data["name"]), task=str(data["task"]), spec=data["spec"],
        status=StudyStatus(data["status"]).value, error=data.get("error"),
        progress=data.get("progress"), attempts=int(data.get("attempts") or 0),
        **{name: _time(data.get(name)) for name in _STUDY_TIMES},
    )  # fmt: skip
    for name in _OPTIONAL_STUDY_COLUMNS:
        if data.get(name) is not None and hasattr(StudyRecord, name):
            setattr(study, name, data[name])
    faults = data.get("faults")
    if faults is not None and not (
        isinstance(faults, list) and all(isinstance(f, dict) for f in faults)
    ):
        raise BundleError("study.faults: must be a list of objects")
    return study


def load_bundle(text: str) -> Bundle:
    """Parse and check a bundle without touching any database; BundleError when it is not
    one this code can import."""
    if json_depth_exceeded(text):
        raise BundleError("not a ratebench export: its JSON nests deeper than a bundle does")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"not valid JSON ({exc.msg} at line {exc.lineno}); truncated?") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f'not a ratebench export (expected "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise BundleError(
            f"export version {data.get('version')!r} is not supported (this ratebench reads "
            f"version {VERSION})"
        )
    try:
        study = _record(data["study"])
        if not StudyStatus(study.status).finished:
            raise BundleError(
                f"study {study.id} is {study.status}; only finished studies can be imported"
            )
        spec = StudySpec.from_stored(study.spec)
        if spec.task != study.task:
            raise BundleError(f"study.task {study.task!r} is not its spec's ({spec.task!r})")
        _check_arm_rows(data["arm_results"], spec, study.task)
        arms = [ArmResult(study_id=study.id, **{c: a[c] for c in _ARM_COLUMNS})
                for a in data["arm_results"]]  # fmt: skip
        expected = set(_study_names(study.id, spec))
        studies = []
        for s in data["trials"]:
            if s["study_name"] not in expected:
                raise BundleError(f"Optuna study {s['study_name']!r} is not study {study.id}'s")
            studies.append(
                OptunaStudy(
                    name=s["study_name"],
                    directions=[StudyDirection[d] for d in s["directions"]],
                    user_attrs=dict(s["user_attrs"]),
                    system_attrs=dict(s["system_attrs"]),
                    trials=[_trial(t) for t in sorted(s["trials"], key=lambda t: t["number"])],
                )
            )
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise BundleError(f"not a valid ratebench export: {what}") from None
    return Bundle(study, arms, studies)


def import_bundle(engine: sa.Engine, storage_url: str, bundle: Bundle) -> None:
    """Write the bundle's study, leaderboard rows and Optuna studies, or nothing: BundleError
    when the database already has the study id or one of its Optuna studies; on any failure
    the Optuna studies created so far are deleted again."""
    study_id = bundle.study.id
    with session_scope(engine, read_only=True) as session:
        if session.get(StudyRecord, study_id) is not None:
            raise BundleError(f"study {study_id} already exists in this database; not imported")
    storage = open_storage(storage_url)
    created: list[str] = []
    try:
        taken = [
            s.study_name
            for s in storage.get_all_studies()
            if s.study_name.startswith(f"{study_id}/")
        ]
        if taken:
            raise BundleError(
                f"Optuna study {taken[0]!r} already exists in this database: study {study_id}'s "
                "Optuna studies would mix with it; not imported"
            )
        for s in bundle.optuna_studies:
            study = optuna.create_study(storage=storage, study_name=s.name, directions=s.directions)
            created.append(s.name)
            for key, value in s.user_attrs.items():
                study.set_user_attr(key, value)
            optuna_id = storage.get_study_id_from_name(s.name)
            for key, value in s.system_attrs.items():
                storage.set_study_system_attr(optuna_id, key, value)
            study.add_trials(s.trials)
        try:
            with session_scope(engine) as session:
                session.add(bundle.study)
                session.flush()
                session.add_all(bundle.arm_results)
        except sa.exc.IntegrityError as exc:  # e.g. two leaderboard rows for one arm
            first = str(exc.orig).splitlines()[0]
            raise BundleError(f"the bundle's rows do not fit this database: {first}") from None
    except BaseException:
        for name in created:
            optuna.delete_study(study_name=name, storage=storage)
        raise
    finally:
        storage.engine.dispose()
