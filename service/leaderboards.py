"""Leaderboards across studies, as SQL aggregates over `ratebench_arm_results`, and one
study's leaderboard with the statistics that say how far its order can be trusted.

One row per arm per finished study is stored when the study ends, so these queries cost in the
number of studies on a task, never in the number of trials. Task leaderboards count the arms
with results of finished studies: `completed` ones and the arms that did not fail in
`completed_with_errors` ones (a failed arm has no score: it is neither 0 nor a rank).
A study's arms (`study_arms`) carry the final seeds' confidence interval, clipped to the
metric's range, and which other arms Welch's test could not separate them from: ties, or
"too few seeds to tell" (`worker.report.stats`). The JSON API, the CLI and the web page all
show the same rows; a failed arm (`status` "failed", with its first `error`) is ranked after
every arm with results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import ArmResult, StudyRecord, StudyStatus
from service.schemas import ArmRow, TaskArmRow, TaskLeaderboard
from worker.report.stats import metric_range, rank_arms

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


def task_board(session: Session, task: str, metric: str | None = None) -> TaskLeaderboard | None:
    """Every arm with results in the task's finished studies with `metric` (default: the most
    used one), best first; None when there is none."""
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
    maximize = direction == "maximize"
    scope = _completed().where(ArmResult.task == task, ArmResult.metric == metric).subquery()
    best = sa.func.max if maximize else sa.func.min
    aggregates = session.execute(
        sa.select(
            scope.c.arm,
            scope.c.scheme,
            sa.func.count(sa.distinct(scope.c.study_id)),
            sa.func.avg(scope.c.objective_mean),
            best(scope.c.objective_mean),
            sa.func.sum(scope.c.n_trials),
            sa.func.sum(scope.c.n_diverged),
        ).group_by(scope.c.arm, scope.c.scheme)
    ).all()
    order = scope.c.objective_mean.desc() if maximize else scope.c.objective_mean.asc()
    ranked = sa.select(
        scope.c.arm,
        scope.c.best_lr,
        sa.func.row_number().over(partition_by=scope.c.arm, order_by=order).label("n"),
    ).subquery()
    best_lr = dict(
        session.execute(sa.select(ranked.c.arm, ranked.c.best_lr).where(ranked.c.n == 1)).all()
    )
    rows = [
        TaskArmRow(
            arm=arm, scheme=scheme, studies=studies, objective_mean=mean, objective_best=top,
            best_lr=best_lr.get(arm), n_trials=int(trials or 0), n_diverged=int(diverged or 0),
        )
        for arm, scheme, studies, mean, top, trials, diverged in aggregates
    ]  # fmt: skip
    sign = -1.0 if maximize else 1.0
    rows.sort(key=lambda r: (r.objective_mean is None, sign * (r.objective_mean or 0.0)))
    return TaskLeaderboard(task=task, metric=metric, direction=direction, arms=rows)


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


def _row(row: ArmResult) -> ArmRow:
    """The stored row with its status and error lifted out of the summary."""
    base = ArmRow.model_validate(row, from_attributes=True)
    summary = row.summary or {}
    return base.model_copy(
        update={"status": summary.get("status") or "ok", "error": summary.get("error")}
    )


@dataclass
class TaskScores:
    """A task's main metric and each arm's score on it (None: the arm ran, with no score)."""

    metric: str
    maximize: bool
    studies: int
    arms: dict[str, float | None] = field(default_factory=dict)


def task_scores(session: Session) -> dict[str, TaskScores]:
    """Per task (its main metric): each arm's mean objective over the rows that count; an arm
    absent from a task was not run on it (or only failed on it)."""
    tasks = session.scalars(_completed().with_only_columns(ArmResult.task).distinct()).all()
    scores: dict[str, TaskScores] = {}
    for task in tasks:
        board = task_board(session, task)
        if board is None:
            continue
        arms = {r.arm: r.objective_mean for r in board.arms}
        if arms:
            studies = max(r.studies for r in board.arms)
            scores[task] = TaskScores(board.metric, board.direction == "maximize", studies, arms)
    return scores
