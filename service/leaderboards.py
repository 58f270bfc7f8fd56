"""Leaderboards across studies, as SQL aggregates over `ratebench_arm_results`.

One row per arm per finished study is stored when the study ends, so these queries cost in the
number of studies on a task, never in the number of trials. Only completed studies count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import ArmResult, StudyRecord, StudyStatus
from service.schemas import TaskArmRow, TaskLeaderboard

__all__ = ["TaskScores", "task_board", "task_scores"]


def _completed() -> sa.Select[ArmResult]:
    return (
        sa.select(ArmResult)
        .join(StudyRecord, StudyRecord.id == ArmResult.study_id)
        .where(StudyRecord.status == StudyStatus.COMPLETED.value)
    )


def _main_metric(session: Session, task: str) -> tuple[str, str] | None:
    """The task's most used (metric, direction) among completed studies."""
    scope = _completed().where(ArmResult.task == task).subquery()
    row = session.execute(
        sa.select(scope.c.metric, scope.c.direction, sa.func.count().label("n"))
        .group_by(scope.c.metric, scope.c.direction)
        .order_by(sa.desc("n"))
        .limit(1)
    ).first()
    return (row[0], row[1]) if row else None


def task_board(session: Session, task: str, metric: str | None = None) -> TaskLeaderboard | None:
    """Every arm of the task's completed studies with `metric` (default: the most used one),
    best first; None when there is none."""
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


@dataclass
class TaskScores:
    metric: str
    maximize: bool
    studies: int
    arms: dict[str, float] = field(default_factory=dict)


def task_scores(session: Session) -> dict[str, TaskScores]:
    """Per task (its main metric): each arm's mean objective over completed studies."""
    tasks = session.scalars(_completed().with_only_columns(ArmResult.task).distinct()).all()
    scores: dict[str, TaskScores] = {}
    for task in tasks:
        board = task_board(session, task)
        if board is None:
            continue
        arms = {r.arm: r.objective_mean for r in board.arms if r.objective_mean is not None}
        if arms:
            studies = max(r.studies for r in board.arms)
            scores[task] = TaskScores(board.metric, board.direction == "maximize", studies, arms)
    return scores
