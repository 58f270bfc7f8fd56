"""`GET /leaderboard?task=…` (every arm across a task's finished studies) and the
performance profile across tasks (`GET /leaderboard/profile`, `…/profile.{png,svg}`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field

from service.api.deps import ReadDb, Tx, in_thread
from service.leaderboards import task_board, task_scores
from service.schemas import TaskLeaderboard
from worker.report import plots
from worker.report.stats import performance_profile

router = APIRouter(tags=["leaderboard"])

TAUS = [1.0 + 0.01 * i for i in range(0, 51)]


@router.get("/leaderboard", response_model=TaskLeaderboard, responses={404: {}})
async def task_leaderboard(
    db: ReadDb,
    task: Annotated[str, Query(description="task name, e.g. mnist1d-mlp")],
    metric: Annotated[
        str | None, Query(description="objective metric (default: most used)")
    ] = None,
) -> TaskLeaderboard:
    """Per arm: mean over studies of the final-seed mean, the best study's value and rate,
    trial and divergence counts. Cost grows with studies, not trials."""
    board = await db.run(lambda tx: task_board(tx.session, task, metric))
    if board is None:
        detail = f"no completed study on task {task!r}" + (f" with {metric!r}" if metric else "")
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=detail)
    return board


class Profile(BaseModel):
    taus: list[float] = Field(description="τ = 1 + relative gap to the task's best arm")
    tasks: dict[str, str] = Field(description="task -> the metric its scores are on")
    schemes: dict[str, list[float]] = Field(
        description="arm -> per τ, the fraction of the tasks it was run on where it is within τ"
    )
    ran: dict[str, list[str]] = Field(description="arm -> the tasks it was run on")
    not_run: dict[str, list[str]] = Field(
        description="arm -> the tasks it was not run on (left out of its fractions, not 0)"
    )


def _profile(tx: Tx) -> Profile:
    scores = task_scores(tx.session)
    results = {task: s.arms for task, s in scores.items()}
    maximize = {task: s.maximize for task, s in scores.items()}
    profile = performance_profile(results, maximize, TAUS)
    return Profile(
        taus=profile.taus,
        tasks={task: s.metric for task, s in scores.items()},
        schemes=profile.rho,
        ran=profile.ran,
        not_run=profile.not_run,
    )


@router.get("/leaderboard/profile", response_model=Profile)
async def profile_data(db: ReadDb) -> Profile:
    """Performance profile (after Dolan & Moré) on the relative gap to each task's best arm:
    for each arm, the fraction of the tasks it was run on where its mean objective is within
    τ = 1 + gap of the best (defined for scores of 0 and below; see `worker.report.stats`)."""
    return await db.run(_profile)


@router.get(
    "/leaderboard/profile.{fmt}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}},
    name="profile_plot",
)
async def profile_plot(fmt: Literal["png", "svg"], db: ReadDb, request: Request) -> Response:
    data = await db.run(_profile)
    content = await in_thread(request, "heavy", plots.profile, data.schemes, data.taus, fmt,
                              ran=data.ran, n_tasks=len(data.tasks))  # fmt: skip
    return Response(content, media_type=plots.FORMATS[fmt])
