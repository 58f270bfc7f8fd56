"""Leaderboards across studies, over `ratebench_arm_results`, and one study's leaderboard
with the statistics that say how far its order can be trusted.

One row per arm per finished study is stored when the study ends, so these queries cost in the
number of studies on a task, never in the number of trials. Task leaderboards count the arms
with results of finished studies: `completed` ones and the arms that did not fail in
`completed_with_errors` ones (a failed arm has no score: it is neither 0 nor a rank).
A task board (`task_board`) reads those rows with their study's spec and groups them by
setting (`service.comparability`): one group per study-level setting (model, data, budget,
objective), and in it one row per (arm setting, arm label). A row pools the final seeds of
every study in it into one mean with a Student-t interval: results of 2-epoch and 15-epoch
studies, or of sgd with and without momentum, are never averaged together. A re-run of the
same configuration on the same seed is the same evidence, counted once wherever seeds are
pooled (the board, the profile, the home page's best arm: `service.evidence`); each row says
how many values it folded (`n_reruns`) and how many of those differed (`n_disagreeing`).
A study's arms (`study_arms`) carry the final seeds' confidence interval, clipped to the
metric's range, and which other arms Welch's test could not separate them from: ties, or
"too few seeds to tell" (`worker.report.stats`). The JSON API, the CLI and the web page all
show the same rows; a failed arm (`status` "failed", with its first `error`) is ranked after
every arm with results. A study row lifts the schedule and the times (to target, of training)
out of the stored summary. The cross-task performance profile reads each arm's score
(`task_scores`) or its stored time or steps to its study's target (`task_times`); the home
page names each task's best arm and what the seeds can tell of it (`best_arm`).
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.comparability import Setting, arm_setting, filter_fields, matches, study_setting
from service.evidence import Evidence, configuration_id, row_seeds, run_fields
from service.models import ArmResult, StudyRecord, StudyStatus
from service.schemas import ArmRow, SettingGroup, TaskArmRow, TaskLeaderboard
from worker.report.stats import mean_interval, metric_range, rank_arms
from worker.spec import ArmSpec, StudySpec

__all__ = [
    "CONFIDENCE",
    "MEASURES",
    "BestArm",
    "TaskScores",
    "best_arm",
    "study_arms",
    "task_board",
    "task_scores",
    "task_times",
]

CONFIDENCE = 0.95


_WITH_RESULTS = (StudyStatus.COMPLETED.value, StudyStatus.COMPLETED_WITH_ERRORS.value)


def _completed(visible: sa.ColumnElement[bool] | None = None) -> sa.Select[ArmResult]:
    """The arm rows that count on task leaderboards: of studies that produced results (and
    that the reader may read: `visible`, `service.privacy.readable`), the arms that did not
    fail (rows stored before arms had a status count as ok)."""
    status = sa.func.coalesce(ArmResult.summary["status"].as_string(), "ok")
    return (
        sa.select(ArmResult)
        .join(StudyRecord, StudyRecord.id == ArmResult.study_id)
        .where(StudyRecord.status.in_(_WITH_RESULTS), status != "failed")
        .where(visible if visible is not None else sa.true())
    )


def _main_metric(
    session: Session, task: str, visible: sa.ColumnElement[bool] | None = None
) -> tuple[str, str] | None:
    """The task's most used (metric, direction) among the rows that count."""
    scope = _completed(visible).where(ArmResult.task == task).subquery()
    row = session.execute(
        sa.select(scope.c.metric, scope.c.direction, sa.func.count().label("n"))
        .group_by(scope.c.metric, scope.c.direction)
        .order_by(sa.desc("n"))
        .limit(1)
    ).first()
    return (row[0], row[1]) if row else None


@dataclass
class _Pool:
    """One row of a task board: an arm label in one setting, over the studies that ran it."""

    arm: str
    scheme: str
    setting: Setting
    studies: list[str] = field(default_factory=list)
    evidence: Evidence = field(default_factory=Evidence)
    means: list[tuple[float, float | None, str]] = field(default_factory=list)  # mean, lr, study
    n_trials: int = 0
    n_diverged: int = 0


_UNREADABLE = Setting("unreadable", {}, "the study's stored spec could not be read")


@dataclass(frozen=True)
class _StudySettings:
    """A study's group and its arms' settings (`spec` None: a stored spec that no longer
    reads, and every setting is `_UNREADABLE`)."""

    spec: StudySpec | None
    group: Setting
    arms: dict[str, Setting]
    filterable: dict[str, dict[str, Any]] = field(default_factory=dict)
    specs: dict[str, ArmSpec] = field(default_factory=dict)
    configurations: dict[Any, str] = field(default_factory=dict)

    @classmethod
    def of(cls, stored: dict[str, Any]) -> _StudySettings:
        try:
            spec = StudySpec.from_stored(stored)
        except ValueError:
            return cls(None, _UNREADABLE, {})
        arms = {
            label: arm_setting(spec, arm) for label, arm in zip(spec.labels, spec.arms, strict=True)
        }
        specs = dict(zip(spec.labels, spec.arms, strict=True))
        return cls(spec, study_setting(spec), arms, specs=specs)

    def arm(self, label: str) -> Setting:
        if self.spec is None:
            return _UNREADABLE
        found = self.arms.get(label)
        return found if found is not None else arm_setting(self.spec, None)

    def configuration(self, row: sa.Row[Any]) -> str:
        """The configuration id of a stored arm row's final seeds (`service.evidence`); a study
        whose spec no longer reads has one of its own per arm, never matched."""
        if self.spec is None:
            return f"unreadable/{row.study_id}/{row.arm}"
        params = row.best_params if isinstance(row.best_params, dict) else {}
        try:  # derived once per study, arm and chosen parameters, as the settings are
            key = (row.arm, row.best_lr, row.best_trial, frozenset(params.items()))
            found = self.configurations.get(key)
        except TypeError:  # a parameter whose value is a list: not kept
            key, found = None, None
        if found is None:
            arm = self.specs.get(row.arm)
            chosen = {"best_params": params, "best_lr": row.best_lr, "best_trial": row.best_trial}
            tuner = arm.tuner if arm is not None else None
            found = configuration_id(
                self.arm(row.arm).id, run_fields(self.spec, arm), tuner, chosen
            )
            if key is not None:
                self.configurations[key] = found  # same value from any thread that races here
        return found

    def fold(self, evidence: Evidence, row: sa.Row[Any]) -> int:
        """A stored arm row's final values (`_EVIDENCE`) into `evidence`, each (configuration,
        seed) once; how many were new."""
        values = [float(v) for v in row.final_values or []]
        if not values:
            return 0
        seeds = row_seeds(row.final_seeds, len(values), self.spec, (row.study_id, row.arm))
        return evidence.add(self.configuration(row), seeds, values)

    def fields(self, label: str) -> dict[str, Any]:
        """The arm's filterable fields (`service.comparability.filter_fields`), derived once."""
        found = self.filterable.get(label)
        if found is None:
            found = filter_fields(self.group, self.arm(label))
            self.filterable[label] = found  # same value from any thread that races here
        return found


class _SettingsCache:
    """Each study's settings, computed once per process rather than once per request: parsing
    a spec and deriving its settings is most of a task board's cost. A study's spec never
    changes once its row exists (written at submission, import, or `ratebench run`'s first
    claim, which refuses a different spec under the same key), so entries never go stale;
    they are keyed by database and study id, and the least recently used are dropped."""

    SIZE = 20_000
    _CHUNK = 500  # ids per IN list

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[str, str], _StudySettings] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: Session, study_ids: set[str]) -> dict[str, _StudySettings]:
        """The settings of `study_ids`, reading the specs of those not seen before."""
        db = session.get_bind().engine.url.render_as_string(hide_password=True)
        found: dict[str, _StudySettings] = {}
        with self._lock:
            for study_id in study_ids:
                entry = self._items.get((db, study_id))
                if entry is not None:
                    self._items.move_to_end((db, study_id))
                    found[study_id] = entry
        missing = sorted(study_ids - found.keys())
        for i in range(0, len(missing), self._CHUNK):
            chunk = missing[i : i + self._CHUNK]
            query = sa.select(StudyRecord.id, StudyRecord.spec).where(StudyRecord.id.in_(chunk))
            for study_id, stored in session.execute(query):
                found[study_id] = _StudySettings.of(stored)
        with self._lock:
            for study_id in missing:
                if study_id in found:
                    self._items[(db, study_id)] = found[study_id]
            while len(self._items) > self.SIZE:
                self._items.popitem(last=False)
        return found


_SETTINGS = _SettingsCache()


def task_board(
    session: Session,
    task: str,
    metric: str | None = None,
    filters: Mapping[str, Any] | None = None,
    confidence: float = CONFIDENCE,
    visible: sa.ColumnElement[bool] | None = None,
) -> TaskLeaderboard | None:
    """The task's arms with results on `metric` (default: the most used one), grouped by
    setting and pooled per (setting, arm label), each group best first; only the arms that
    pass `filters` (`service.comparability.matches`), of the studies that are `visible`. None
    when the task has no such result."""
    main = _main_metric(session, task, visible)
    if main is None:
        return None
    if metric is None:
        metric, direction = main
    else:
        found = session.scalar(
            _completed(visible).with_only_columns(ArmResult.direction)
            .where(ArmResult.task == task, ArmResult.metric == metric)
            .limit(1)
        )  # fmt: skip
        if found is None:
            return None
        direction = found
    filters = dict(filters or {})
    scope = _completed(visible).where(ArmResult.task == task, ArmResult.metric == metric)
    # only the columns a row needs, the seeds' values taken out of the summary in SQL
    rows = session.execute(scope.with_only_columns(*_POOLED).order_by(ArmResult.id)).all()
    settings = _SETTINGS.get(session, {row.study_id for row in rows})
    groups: dict[str, tuple[Setting, dict[tuple[str, str], _Pool]]] = {}
    values: dict[str, list[Any]] = {}
    for arm_row in rows:
        study = settings[arm_row.study_id]
        group, setting = study.group, study.arm(arm_row.arm)
        if group is _UNREADABLE:
            if filters:  # nothing to match a filter against
                continue
        else:
            for name, value in study.fields(arm_row.arm).items():
                if value not in values.setdefault(name, []):
                    values[name].append(value)
            if filters and not matches(filters, group, setting):
                continue
        pools = groups.setdefault(group.id, (group, {}))[1]
        pool = pools.setdefault(
            (setting.id, arm_row.arm), _Pool(arm_row.arm, arm_row.scheme, setting)
        )
        _add(pool, study, arm_row)
    maximize = direction == "maximize"
    out = [
        _group(group, list(pools.values()), maximize, metric, confidence)
        for group, pools in groups.values()
    ]
    out.sort(key=lambda g: (-len(g.studies), g.description))
    narrowing = {name: v for name, v in sorted(values.items()) if len(v) > 1}
    return TaskLeaderboard(
        task=task, metric=metric, direction=direction, filters=filters,
        filter_values=narrowing, groups=out,
    )  # fmt: skip


# what folding a row's final seeds needs (`_StudySettings.fold`): the seeds' values and seeds,
# and what they trained with, taken out of the summary in SQL
_EVIDENCE = (
    ArmResult.study_id, ArmResult.arm, ArmResult.best_lr,
    ArmResult.summary["final_values"].label("final_values"),
    ArmResult.summary["final_seeds"].label("final_seeds"),
    ArmResult.summary["best_params"].label("best_params"),
    ArmResult.summary["best_trial"].label("best_trial"),
)  # fmt: skip
_POOLED = (
    *_EVIDENCE, ArmResult.scheme, ArmResult.objective_mean, ArmResult.n_trials,
    ArmResult.n_diverged,
)  # fmt: skip


def _add(pool: _Pool, study: _StudySettings, row: sa.Row[Any]) -> None:
    """One arm row (`_POOLED`) into its pool: its final seeds once each."""
    pool.studies.append(row.study_id)
    study.fold(pool.evidence, row)
    if row.objective_mean is not None:
        pool.means.append((row.objective_mean, row.best_lr, row.study_id))
    pool.n_trials += row.n_trials
    pool.n_diverged += row.n_diverged


def _group(
    group: Setting, pools: list[_Pool], maximize: bool, metric: str, confidence: float
) -> SettingGroup:
    """A group's rows: each pool's seeds pooled into one mean and interval, best first."""
    sign = -1.0 if maximize else 1.0
    rows = []
    for pool in pools:
        mean: float | None = None
        low = high = None
        values = pool.evidence.values
        if values:
            interval = mean_interval(values, confidence, metric_range(metric))
            mean, low, high = interval.mean, interval.low, interval.high
        elif pool.means:  # rows stored without per-seed values: the studies' means
            mean = sum(m for m, _, _ in pool.means) / len(pool.means)
        best = min(pool.means, key=lambda m: sign * m[0]) if pool.means else None
        rows.append(
            TaskArmRow(
                rank=0, arm=pool.arm, scheme=pool.scheme, setting=pool.setting.id,
                setting_description=pool.setting.description,
                fixed=pool.setting.fields.get("fixed") or {},
                model=pool.setting.fields.get("model") or {},
                schedule=pool.setting.fields.get("schedule"), studies=pool.studies,
                n_seeds=len(values), n_reruns=pool.evidence.reruns,
                n_disagreeing=pool.evidence.disagreeing, objective_mean=mean, confidence=confidence,
                interval_low=low, interval_high=high,
                objective_best=best[0] if best else None, best_lr=best[1] if best else None,
                best_study=best[2] if best else None, n_trials=pool.n_trials,
                n_diverged=pool.n_diverged,
            )
        )  # fmt: skip
    rows.sort(key=lambda r: (r.objective_mean is None, sign * (r.objective_mean or 0.0), r.arm))
    for rank, row in enumerate(rows, start=1):
        row.rank = rank
    studies = sorted({study for pool in pools for study in pool.studies})
    return SettingGroup(
        id=group.id, description=group.description, setting=group.fields, studies=studies,
        arms=rows,
    )  # fmt: skip


def study_arms(rows: Sequence[ArmResult], confidence: float = CONFIDENCE) -> list[ArmRow]:
    """A study's stored arm rows ranked best first by the final seeds' mean, each with its
    interval and the arms it cannot be told apart from; arms without final seeds come next,
    and failed arms (`status` "failed", with their first `error`) last, in their stored order."""
    if not rows:
        return []
    metric, direction = rows[0].metric, rows[0].direction
    seeds = {row.arm: [float(v) for v in row.summary.get("final_values") or []] for row in rows}
    ranked = rank_arms(
        {arm: values for arm, values in seeds.items() if values},
        direction == "maximize",
        confidence,
        metric_range(metric),
    )
    by_arm = {row.arm: row for row in rows}
    out = []
    for r in ranked:
        base = _row(by_arm[r.arm])
        update = {
            "rank": r.rank,
            "n_seeds": r.interval.n,
            "confidence": confidence,
            "interval_low": r.interval.low,
            "interval_high": r.interval.high,
            "ties": r.not_distinguishable_from,
            "too_few_seeds_to_tell": r.too_few_seeds_to_tell,
        }
        out.append(base.model_copy(update=update))
    rest = sorted((row for row in rows if not seeds[row.arm]), key=lambda row: row.rank)
    for row in sorted(rest, key=lambda row: _failed(row)):  # stable: stored order within
        base = _row(row)
        out.append(base.model_copy(update={"rank": len(out) + 1, "confidence": confidence}))
    return out


def _failed(row: ArmResult) -> bool:
    return (row.summary or {}).get("status") == "failed"


_LIFTED = set(ArmRow.model_fields) - {"details"}
# read from the stored summary (null in rows stored before they were recorded)
_FROM_SUMMARY = ("error", "schedule", "target", "steps_to_target", "time_to_target_s",
                 "train_time_s", "ms_per_step")  # fmt: skip


def _row(row: ArmResult) -> ArmRow:
    """The stored row with its status, error, schedule and times lifted out of the summary
    (absent from rows stored before they were recorded: null); the summary's other fields, and
    only those, become `details` (the row's own fields are not repeated)."""
    summary = row.summary or {}
    fields = {name: getattr(row, name) for name in _LIFTED if hasattr(ArmResult, name)}
    lifted = {name: summary.get(name) for name in _FROM_SUMMARY}
    return ArmRow(
        **{**fields, **lifted, "status": summary.get("status") or "ok"},
        details={k: v for k, v in summary.items() if k not in _LIFTED},
    )


@dataclass
class TaskScores:
    """A task's main metric and each arm's score on it (None: the arm ran, with no score),
    with the distinct final-seed values behind each score (`seeds`) and how many re-run values
    were folded (`reruns`) and differed from the kept one (`disagreeing`)."""

    metric: str
    maximize: bool
    studies: int
    arms: dict[str, float | None] = field(default_factory=dict)
    seeds: dict[str, list[float]] = field(default_factory=dict)
    reruns: dict[str, int] = field(default_factory=dict)
    disagreeing: dict[str, int] = field(default_factory=dict)


def _task_rows(
    session: Session,
    visible: sa.ColumnElement[bool] | None,
    *columns: sa.ColumnElement[Any],
) -> dict[str, tuple[str, str, list[sa.Row[Any]]]]:
    """Per task with results: its main (metric, direction) and its arm rows on that metric,
    `_EVIDENCE` and `columns`, in the order they were stored (the earliest kept on a re-run)."""
    tasks = session.scalars(_completed(visible).with_only_columns(ArmResult.task).distinct()).all()
    out: dict[str, tuple[str, str, list[sa.Row[Any]]]] = {}
    for task in tasks:
        main = _main_metric(session, task, visible)
        if main is None:
            continue
        scope = _completed(visible).where(ArmResult.task == task, ArmResult.metric == main[0])
        query = scope.with_only_columns(*_EVIDENCE, *columns).order_by(ArmResult.id)
        out[task] = (main[0], main[1], list(session.execute(query).all()))
    return out


def task_scores(
    session: Session, visible: sa.ColumnElement[bool] | None = None
) -> dict[str, TaskScores]:
    """Per task (its main metric): each arm label's mean over its distinct final seeds (each
    configuration and seed once, `service.evidence`), over the rows that count, every setting
    together (the cross-task profile asks how a scheme does on a task, not in which setting);
    an arm whose rows have no per-seed values (stored before they were recorded) is scored by
    the mean of their means. An arm absent from a task was not run on it (or only failed on
    it). Only the studies that are `visible` count."""
    scores: dict[str, TaskScores] = {}
    for task, (metric, direction, rows) in _task_rows(
        session, visible, ArmResult.objective_mean.label("objective_mean")
    ).items():
        settings = _SETTINGS.get(session, {row.study_id for row in rows})
        pooled: dict[str, Evidence] = {}
        means: dict[str, list[float]] = {}
        studies: dict[str, set[str]] = {}
        for row in rows:
            settings[row.study_id].fold(pooled.setdefault(row.arm, Evidence()), row)
            studies.setdefault(row.arm, set()).add(row.study_id)
            if row.objective_mean is not None and not row.final_values:
                means.setdefault(row.arm, []).append(float(row.objective_mean))
        if not rows:
            continue
        out = TaskScores(metric, direction == "maximize", max(map(len, studies.values())))
        for arm, evidence in pooled.items():
            scored = evidence.values or means.get(arm, [])
            out.arms[arm] = statistics.fmean(scored) if scored else None
            out.seeds[arm] = list(evidence.values)
            out.reruns[arm] = evidence.reruns
            out.disagreeing[arm] = evidence.disagreeing
        scores[task] = out
    return scores


@dataclass(frozen=True)
class BestArm:
    """A task's best-scoring arm and what its seeds can tell: the arms Welch's test cannot
    separate it from (`ties`), and those it cannot because a side has too few seeds
    (`too_few_seeds_to_tell`, as `worker.report.stats.rank_arms` says them)."""

    arm: str
    ties: list[str] = field(default_factory=list)
    too_few_seeds_to_tell: list[str] = field(default_factory=list)


def best_arm(scores: TaskScores, confidence: float = CONFIDENCE) -> BestArm | None:
    """The arm with the task's best score (None when no arm has one), tested against the other
    scored arms on their distinct final seeds, every setting together as the score. An arm
    scored from stored means alone has no seeds to test: too few seeds to tell."""
    scored = {arm: v for arm, v in scores.arms.items() if v is not None}
    if not scored:
        return None
    pick = max if scores.maximize else min
    best = pick(sorted(scored), key=scored.__getitem__)
    seeds = {arm: scores.seeds.get(arm) or [] for arm in scored}
    if not seeds[best]:
        return BestArm(best, [], sorted(arm for arm in scored if arm != best))
    testable = {arm: values for arm, values in seeds.items() if values}
    ranked = rank_arms(testable, scores.maximize, confidence, metric_range(scores.metric))
    mine = next(r for r in ranked if r.arm == best)
    untested = [arm for arm in scored if arm not in testable]
    return BestArm(
        best, sorted(mine.not_distinguishable_from),
        sorted([*mine.too_few_seeds_to_tell, *untested]),
    )  # fmt: skip


# What a performance profile may measure: the score, or each study's stored time or steps to
# its target (`worker.summary`): AlgoPerf's profiles are on time to a target.
MEASURES = {"time": "time_to_target_s", "steps": "steps_to_target"}


def task_times(
    session: Session, measure: str, visible: sa.ColumnElement[bool] | None = None
) -> dict[str, TaskScores]:
    """Per task (its main metric): each arm label's time (`measure` "time", seconds) or steps
    ("steps") to the target of its study, the median over the studies that ran it, every
    setting together as `task_scores`. A study where the arm never reached its target counts
    as infinitely slow there, so the median is None (ran, never reached) when it failed in at
    least half of them. Each study has its own target (`objective.target`, or a fraction of
    its best arm's score), so the arms compared are timed to the same value only within a
    study. A study whose final seeds of the arm were all counted already (a re-run of the
    same configurations and seeds, `service.evidence`) is left out: it timed the same
    training again. Only the studies that are `visible` count."""
    name = MEASURES[measure]
    times: dict[str, TaskScores] = {}
    for task, (metric, _, rows) in _task_rows(
        session, visible, ArmResult.summary[name].label("value")
    ).items():
        settings = _SETTINGS.get(session, {row.study_id for row in rows})
        pooled: dict[str, Evidence] = {}
        per_arm: dict[str, list[float]] = {}
        studies: set[str] = set()
        for row in rows:
            evidence = pooled.setdefault(row.arm, Evidence())
            if settings[row.study_id].fold(evidence, row) == 0 and row.final_values:
                continue  # a re-run: its seeds were timed already
            per_arm.setdefault(row.arm, []).append(_finite_or_inf(row.value))
            studies.add(row.study_id)
        if per_arm:
            arms = {arm: _median(values) for arm, values in per_arm.items()}
            out = TaskScores(metric, False, len(studies), arms)
            for arm, evidence in pooled.items():
                out.seeds[arm] = list(evidence.values)
                out.reruns[arm] = evidence.reruns
                out.disagreeing[arm] = evidence.disagreeing
            times[task] = out
    return times


def _finite_or_inf(value: Any) -> float:
    """A stored time or step count; None (the target never reached) as infinity."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.inf


def _median(values: list[float]) -> float | None:
    middle = statistics.median(values)
    return None if math.isinf(middle) else middle
