"""Leaderboards across studies, over `ratebench_arm_results`, and one study's leaderboard
with the statistics that say how far its order can be trusted.

One row per arm per finished study is stored when the study ends, so these queries cost in the
number of studies on a task, never in the number of trials. Task leaderboards count the arms
with results of finished studies: `completed` ones and the arms that did not fail in
`completed_with_errors` ones (a failed arm has no score: it is neither 0 nor a rank).
A task board (`task_board`) reads those rows with their study's spec and groups them by
setting (`service.settings`): one group per study-level setting (model, data, budget,
objective), and in it one row per (arm setting, arm label). A row pools the final seeds of
every study in it into one mean with a Student-t interval: results of 2-epoch and 15-epoch
studies, or of sgd with and without momentum, are never averaged together.
A study's arms (`study_arms`) carry the final seeds' confidence interval, clipped to the
metric's range, and which other arms Welch's test could not separate them from: ties, or
"too few seeds to tell" (`worker.report.stats`). The JSON API, the CLI and the web page all
show the same rows; a failed arm (`status` "failed", with its first `error`) is ranked after
every arm with results.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import ArmResult, StudyRecord, StudyStatus
from service.schemas import ArmRow, SettingGroup, TaskArmRow, TaskLeaderboard
from service.settings import Setting, arm_setting, filter_fields, matches, study_setting
from worker.report.stats import mean_interval, metric_range, rank_arms
from worker.spec import StudySpec

__all__ = ["CONFIDENCE", "TaskScores", "study_arms", "task_board", "task_scores"]

CONFIDENCE = 0.95


_WITH_RESULTS = (StudyStatus.COMPLETED.value, StudyStatus.COMPLETED_WITH_ERRORS.value)


def _completed() -> sa.Select[ArmResult]:
    """The arm rows that count on task leaderboards: of studies that produced results, the
    arms that did not fail (rows stored before arms had a status count as ok)."""
    status = sa.func.coalesce(ArmResult.summary["status"].as_string(), "ok")
    return (
        sa.select(ArmResult)
        .join(StudyRecord, StudyRecord.id == ArmResult.study_id)
        .where(StudyRecord.status.in_(_WITH_RESULTS), status != "failed")
    )


def _main_metric(session: Session, task: str) -> tuple[str, str] | None:
    """The task's most used (metric, direction) among the rows that count."""
    scope = _completed().where(ArmResult.task == task).subquery()
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
    values: list[float] = field(default_factory=list)
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

    @classmethod
    def of(cls, stored: dict[str, Any]) -> _StudySettings:
        try:
            spec = StudySpec.from_stored(stored)
        except ValueError:
            return cls(None, _UNREADABLE, {})
        arms = {
            label: arm_setting(spec, arm) for label, arm in zip(spec.labels, spec.arms, strict=True)
        }
        return cls(spec, study_setting(spec), arms)

    def arm(self, label: str) -> Setting:
        if self.spec is None:
            return _UNREADABLE
        found = self.arms.get(label)
        return found if found is not None else arm_setting(self.spec, None)

    def fields(self, label: str) -> dict[str, Any]:
        """The arm's filterable fields (`service.settings.filter_fields`), derived once."""
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
) -> TaskLeaderboard | None:
    """The task's arms with results on `metric` (default: the most used one), grouped by
    setting and pooled per (setting, arm label), each group best first; only the arms that
    pass `filters` (`service.settings.matches`). None when the task has no such result."""
    main = _main_metric(session, task)
    if main is None:
        return None
    if metric is None:
        metric, direction = main
    else:
        found = session.scalar(
            _completed().with_only_columns(ArmResult.direction)
            .where(ArmResult.task == task, ArmResult.metric == metric)
            .limit(1)
        )  # fmt: skip
        if found is None:
            return None
        direction = found
    filters = dict(filters or {})
    scope = _completed().where(ArmResult.task == task, ArmResult.metric == metric)
    # only the columns a row needs, the seeds' values taken out of the summary in SQL
    rows = session.execute(
        scope.with_only_columns(*_POOLED, ArmResult.summary["final_values"].label("final_values"))
        .order_by(ArmResult.id)
    ).all()  # fmt: skip
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
        _add(pool, arm_row)
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


_POOLED = (
    ArmResult.study_id, ArmResult.arm, ArmResult.scheme, ArmResult.objective_mean,
    ArmResult.best_lr, ArmResult.n_trials, ArmResult.n_diverged,
)  # fmt: skip


def _add(pool: _Pool, row: sa.Row[Any]) -> None:
    """One arm row (`_POOLED` and its `final_values`) into its pool."""
    pool.studies.append(row.study_id)
    pool.values.extend(float(v) for v in row.final_values or [])
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
        if pool.values:
            interval = mean_interval(pool.values, confidence, metric_range(metric))
            mean, low, high = interval.mean, interval.low, interval.high
        elif pool.means:  # rows stored without per-seed values: the studies' means
            mean = sum(m for m, _, _ in pool.means) / len(pool.means)
        best = min(pool.means, key=lambda m: sign * m[0]) if pool.means else None
        rows.append(
            TaskArmRow(
                rank=0, arm=pool.arm, scheme=pool.scheme, setting=pool.setting.id,
                setting_description=pool.setting.description,
                fixed=pool.setting.fields.get("fixed") or {},
                model=pool.setting.fields.get("model") or {}, studies=pool.studies,
                n_seeds=len(pool.values), objective_mean=mean, confidence=confidence,
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


def _row(row: ArmResult) -> ArmRow:
    """The stored row with its status and error lifted out of the summary; the summary's other
    fields, and only those, become `details` (the row's own fields are not repeated)."""
    summary = row.summary or {}
    fields = {name: getattr(row, name) for name in _LIFTED if hasattr(ArmResult, name)}
    return ArmRow(
        **fields,
        status=summary.get("status") or "ok",
        error=summary.get("error"),
        details={k: v for k, v in summary.items() if k not in _LIFTED},
    )


@dataclass
class TaskScores:
    """A task's main metric and each arm's score on it (None: the arm ran, with no score)."""

    metric: str
    maximize: bool
    studies: int
    arms: dict[str, float | None] = field(default_factory=dict)


def task_scores(session: Session) -> dict[str, TaskScores]:
    """Per task (its main metric): each arm label's mean over studies of its final mean, over
    the rows that count, every setting together (the cross-task profile asks how a scheme does
    on a task, not in which setting); an arm absent from a task was not run on it (or only
    failed on it)."""
    tasks = session.scalars(_completed().with_only_columns(ArmResult.task).distinct()).all()
    scores: dict[str, TaskScores] = {}
    for task in tasks:
        main = _main_metric(session, task)
        if main is None:
            continue
        metric, direction = main
        scope = _completed().where(ArmResult.task == task, ArmResult.metric == metric).subquery()
        rows = session.execute(
            sa.select(
                scope.c.arm,
                sa.func.avg(scope.c.objective_mean),
                sa.func.count(sa.distinct(scope.c.study_id)),
            ).group_by(scope.c.arm)
        ).all()
        if rows:
            arms = {arm: mean for arm, mean, _ in rows}
            studies = max(n for _, _, n in rows)
            scores[task] = TaskScores(metric, direction == "maximize", studies, arms)
    return scores
