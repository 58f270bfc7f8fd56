"""`GET /leaderboard?task=…` (a task's finished studies, grouped by setting, with filters on
the setting's fields: `service.settings`) and the
performance profile across tasks (`GET /leaderboard/profile`, `…/profile.{png,svg}`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from service.api.deps import ReadDb, Tx, in_thread
from service.leaderboards import task_board, task_scores
from service.schemas import TaskLeaderboard
from service.settings import FILTER_HELP, FilterError, parse_filters
from worker.report import plots
from worker.report.stats import performance_profile

router = APIRouter(tags=["leaderboard"])

TAUS = [1.0 + 0.01 * i for i in range(0, 51)]


_RESERVED = ("task", "metric")


def read_filters(request: Request, skip_blank: bool = False) -> dict[str, Any]:
    """The request's setting filters (every query parameter but `task` and `metric`); an
    unknown or repeated name is a 422 that names the parameter, as FastAPI's own are."""
    try:
        return parse_filters(request.query_params.multi_items(), _RESERVED, skip_blank)
    except FilterError as exc:
        error = {"type": "value_error", "loc": ("query", exc.name), "msg": str(exc), "input": None}
        raise RequestValidationError([error]) from None


@router.get(
    "/leaderboard",
    response_model=TaskLeaderboard,
    responses={404: {}, 422: {"description": "an unknown or repeated filter, named in `loc`"}},
    description="Per setting (the model, data, budget and objective a study shares: "
    "`service.settings`), one table; in it, per arm label and arm setting (its fixed "
    "hyperparameters and model overrides), the final seeds of every study pooled into one mean "
    "with a Student-t interval, the best study's value and rate, and trial and divergence "
    "counts. Results of different settings are never averaged together. Cost grows with "
    "studies, not trials.\n\n" + FILTER_HELP + " `filter_values` lists, for the whole board, "
    "the filters that would narrow it and their values.",
)
async def task_leaderboard(
    request: Request,
    db: ReadDb,
    task: Annotated[str, Query(description="task name, e.g. mnist1d-mlp")],
    metric: Annotated[
        str | None, Query(description="objective metric (default: most used)")
    ] = None,
    setting: Annotated[str | None, Query(description="a group's or an arm setting's id")] = None,
    epochs: Annotated[int | None, Query(ge=1, description="the budget's epochs")] = None,
    steps_per_epoch: Annotated[
        int | None, Query(ge=1, description="the budget's steps per epoch")
    ] = None,
) -> TaskLeaderboard:
    # `setting`, `epochs` and `steps_per_epoch` are declared for /docs and their types; they
    # are read with the other filters, whose names are open-ended (`model.width`, …)
    filters = read_filters(request)
    board = await db.run(lambda tx: task_board(tx.session, task, metric, filters))
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
