"""`GET /leaderboard?task=…` (every arm across a task's finished studies) and the
performance profile across tasks (`GET /leaderboard/profile`, `…/profile.{png,svg}`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel

from service.api.auth import ReadAccess
from service.api.deps import SessionDep
from service.leaderboards import task_board, task_scores
from service.schemas import TaskLeaderboard
from worker.report import plots
from worker.report.stats import performance_profile

router = APIRouter(tags=["leaderboard"])

TAUS = [1.0 + 0.01 * i for i in range(0, 51)]


@router.get("/leaderboard", response_model=TaskLeaderboard, responses={404: {}})
def task_leaderboard(
    session: SessionDep,
    _: ReadAccess,
    task: Annotated[str, Query(description="task name, e.g. mnist1d-mlp")],
    metric: Annotated[
        str | None, Query(description="objective metric (default: most used)")
    ] = None,
) -> TaskLeaderboard:
    """Per arm: mean over studies of the final-seed mean, the best study's value and rate,
    trial and divergence counts. Cost grows with studies, not trials."""
    board = task_board(session, task, metric)
    if board is None:
        detail = f"no completed study on task {task!r}" + (f" with {metric!r}" if metric else "")
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=detail)
    return board


class Profile(BaseModel):
    taus: list[float]
    tasks: dict[str, str]  # task -> metric used
    schemes: dict[str, list[float]]  # arm -> fraction of tasks within τ of the best


def _profile(session: SessionDep) -> Profile:
    scores = task_scores(session)
    results = {task: s.arms for task, s in scores.items()}
    maximize = {task: s.maximize for task, s in scores.items()}
    return Profile(
        taus=TAUS,
        tasks={task: s.metric for task, s in scores.items()},
        schemes=performance_profile(results, maximize, TAUS),
    )


@router.get("/leaderboard/profile", response_model=Profile)
def profile_data(session: SessionDep, _: ReadAccess) -> Profile:
    """Performance profile (Dolan & Moré): for each arm, the fraction of tasks on which its
    mean objective is within a factor τ of the best arm's."""
    return _profile(session)


@router.get(
    "/leaderboard/profile.{fmt}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}},
    name="profile_plot",
)
def profile_plot(fmt: Literal["png", "svg"], session: SessionDep, _: ReadAccess) -> Response:
    data = _profile(session)
    content = plots.profile(data.schemes, data.taus, fmt)
    return Response(content, media_type=plots.FORMATS[fmt])
