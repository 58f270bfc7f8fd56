"""`GET /leaderboard?task=…` (a task's finished studies, grouped by setting, with filters on
the setting's fields: `service.comparability`) and the
performance profile across tasks (`GET /leaderboard/profile`, `…/profile.{png,svg}`).

Both pool only the studies the reader may read (`service.privacy.readable`). The profile's
picture is drawn once per distinct profile (`service.response_cache`, keyed by its data), so
repeated requests cost the data's one aggregate query, not a matplotlib render."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field

from service import response_cache
from service.api.deps import ReadDb, Tx, in_thread, read_filters, visible
from service.comparability import FILTER_HELP
from service.leaderboards import task_board, task_scores, task_times
from service.schemas import TaskLeaderboard
from worker.report import plots
from worker.report.stats import performance_profile

router = APIRouter(tags=["leaderboard"])

TAUS = [1.0 + 0.01 * i for i in range(0, 51)]
TIME_TAUS = [1.0 + 0.05 * i for i in range(0, 61)]  # time ratios 1 to 4, as AlgoPerf's profiles
Measure = Literal["score", "time", "steps"]
MEASURE_QUERY = Query(
    description="what the profile compares: `score` (the final seeds' mean objective; τ = 1 + "
    "its gap to the task's best), `time` (seconds of training to the study's target; τ = time "
    "/ the task's fastest arm's, as AlgoPerf's profiles) or `steps` (optimizer steps to it)",
)


@router.get(
    "/leaderboard",
    response_model=TaskLeaderboard,
    responses={404: {}, 422: {"description": "an unknown or repeated filter, named in `loc`"}},
    description="Per setting (the model, data, budget and objective a study shares: "
    "`service.comparability`), one table; in it, per arm label and arm setting (its fixed "
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
    board = await db.run(
        lambda tx: task_board(tx.session, task, metric, filters, visible=visible(tx))
    )
    if board is None:
        detail = f"no completed study on task {task!r}" + (f" with {metric!r}" if metric else "")
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=detail)
    return board


class Profile(BaseModel):
    measure: Measure = Field(description="score, time or steps (to the target)")
    taus: list[float] = Field(
        description="score: τ = 1 + relative gap to the task's best arm; time, steps: τ = the "
        "arm's time (steps) to target / the task's fastest arm's"
    )
    tasks: dict[str, str] = Field(description="task -> the metric its scores (targets) are on")
    schemes: dict[str, list[float]] = Field(
        description="arm -> per τ, the fraction of the tasks it was run on where it is within τ"
    )
    ran: dict[str, list[str]] = Field(description="arm -> the tasks it was run on")
    not_run: dict[str, list[str]] = Field(
        description="arm -> the tasks it was not run on (left out of its fractions, not 0)"
    )
    seeds: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="task -> arm -> its distinct final seeds there (each configuration and seed "
        "once: a re-run of the same configuration on the same seed is the same evidence)",
    )
    reruns: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="task -> arm -> final-seed values left out as re-runs (score: not in its "
        "mean; time, steps: a study whose seeds were all re-runs is not in its median)",
    )


def _profile(tx: Tx, measure: Measure) -> Profile:
    if measure == "score":
        scores, taus = task_scores(tx.session, visible(tx)), TAUS
    else:  # a time is minimised: 1 + gap to the fastest is Dolan and Moré's time ratio
        scores, taus = task_times(tx.session, measure, visible(tx)), TIME_TAUS
    results = {task: s.arms for task, s in scores.items()}
    maximize = {task: s.maximize for task, s in scores.items()}
    profile = performance_profile(results, maximize, taus)
    return Profile(
        measure=measure,
        taus=profile.taus,
        tasks={task: s.metric for task, s in scores.items()},
        schemes=profile.rho,
        ran=profile.ran,
        not_run=profile.not_run,
        seeds={task: {a: len(v) for a, v in s.seeds.items()} for task, s in scores.items()},
        reruns={task: dict(s.reruns) for task, s in scores.items()},
    )


@router.get("/leaderboard/profile", response_model=Profile)
async def profile_data(db: ReadDb, measure: Annotated[Measure, MEASURE_QUERY] = "score") -> Profile:
    """Performance profile (after Dolan & Moré): for each arm, the fraction of the tasks it was
    run on where it is within τ of the task's best. `measure=score` (default): τ = 1 + the
    relative gap of its mean objective to the best (defined for scores of 0 and below; see
    `worker.report.stats`). `measure=time` or `steps`: τ = its median time (steps) to each
    study's target over the fastest arm's, as AlgoPerf's profiles; an arm that did not reach
    the target in at least half of its studies on a task is never within τ there."""
    return await db.run(_profile, measure)


@router.get(
    "/leaderboard/profile.{fmt}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}},
    name="profile_plot",
)
async def profile_plot(
    fmt: Literal["png", "svg"],
    db: ReadDb,
    request: Request,
    measure: Annotated[Measure, MEASURE_QUERY] = "score",
) -> Response:
    data = await db.run(_profile, measure)
    drawn = {"schemes": data.schemes, "taus": data.taus, "ran": data.ran, "tasks": len(data.tasks)}
    key = ("profile", fmt, measure, json.dumps(drawn, sort_keys=True))  # what the picture shows

    def draw() -> bytes:
        return plots.profile(data.schemes, data.taus, fmt, ran=data.ran, n_tasks=len(data.tasks),
                             measure=measure)  # fmt: skip

    content, made = await in_thread(request, "heavy", response_cache.cache.get_or_make, key, draw)
    return Response(
        content, media_type=plots.FORMATS[fmt], headers={"X-Cache": "miss" if made else "hit"}
    )
