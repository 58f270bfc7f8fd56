"""The leaderboard web pages: server-rendered HTML (Jinja2), no front-end build.

`/` lists tasks, the cross-task performance profile and recent studies; `/tasks/{task}` shows a
task's leaderboard, one table per setting, with the JSON API's filters; `/studies/{id}` a
study's progress (refreshing while it runs), its arms ranked with confidence intervals, and its
plots. The pages read the same data as the JSON API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from service.api.deps import ReadDb, Tx
from service.api.leaderboard import read_filters
from service.leaderboards import CONFIDENCE, TaskScores, study_arms, task_board, task_scores
from service.models import ArmResult, StudyRecord, StudyStatus
from service.web.timing import duration, study_timing
from worker.report.stats import MIN_SEEDS_TO_TELL
from worker.summary import edge_warnings

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
STATIC_DIR = Path(__file__).parent / "static"
REFRESH_SECONDS = 5


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


templates.env.globals["fmt"] = fmt


def _score_cell(scores: dict[str, float | None], arm: str) -> float | str:
    """An arm's score on a task for the home page: a scheme that was not run on a task must
    not read as a score of 0, nor one whose every seed failed as a bad score."""
    if arm not in scores:
        return "not run"
    score = scores[arm]
    return "no score" if score is None else score


@router.get("/", response_class=HTMLResponse, name="index")
async def index(request: Request, db: ReadDb) -> HTMLResponse:
    scores, studies = await db.run(_index_data)
    arms = sorted({arm for per_task in scores.values() for arm in per_task.arms})
    tasks = []
    for task, per_task in sorted(scores.items()):
        scored = {arm: v for arm, v in per_task.arms.items() if v is not None}
        pick = max if per_task.maximize else min
        tasks.append(
            {
                "task": task,
                "studies": per_task.studies,
                "best_arm": pick(scored, key=scored.__getitem__) if scored else None,
                "metric": per_task.metric,
                "scores": [_score_cell(per_task.arms, arm) for arm in arms],
            }
        )
    return templates.TemplateResponse(
        request,
        "index.html",
        {
            "tasks": tasks,
            "arms": arms,
            "studies": studies,
            "profile_available": bool(scores),
            "profile_url": request.url_for("profile_plot", fmt="svg").path,
            "refresh": None,
        },
    )


def _index_data(tx: Tx) -> tuple[dict[str, TaskScores], list[StudyRecord]]:
    studies = tx.session.scalars(
        sa.select(StudyRecord).order_by(StudyRecord.created_at.desc()).limit(20)
    ).all()
    return task_scores(tx.session), list(studies)


def query_value(value: Any) -> str:
    """A filter value as the query string writes it (`true`, `null`, `0.9`, `relu`)."""
    return value if isinstance(value, str) else json.dumps(value)


templates.env.globals["query_value"] = query_value


@router.get("/tasks/{task}", response_class=HTMLResponse, name="task_page")
async def task_page(
    task: str, request: Request, db: ReadDb, metric: str | None = None
) -> HTMLResponse:
    """The task's board, one table per setting; the query takes the JSON API's filters (a
    form's empty fields are ignored)."""
    filters = read_filters(request, skip_blank=True)
    metric = metric or None
    board = await db.run(lambda tx: task_board(tx.session, task, metric, filters))
    if board is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no completed study on {task!r}")
    studies = len({study for group in board.groups for study in group.studies})
    return templates.TemplateResponse(
        request,
        "task.html",
        {
            "board": board,
            "studies": studies,
            "chosen": {name: query_value(value) for name, value in board.filters.items()},
            "confidence_pct": round(CONFIDENCE * 100),
            "refresh": None,
        },
    )


@router.get("/studies/{study_id}", response_class=HTMLResponse, name="study_page")
async def study_page(study_id: str, request: Request, db: ReadDb) -> HTMLResponse:
    study, rows = await db.run(_study_rows, study_id)
    objective = study.spec.get("objective", {})
    running = not StudyStatus(study.status).finished
    plots = [
        {"title": title, "url": request.url_for("get_plot", study_id=study.id, kind=kind,
                                                 fmt="svg").path}
        for kind, title in (
            ("sensitivity", "rate sensitivity"),
            ("curves", "learning curves"),
            ("factors", "per-layer factors"),
        )
    ]  # fmt: skip
    return templates.TemplateResponse(
        request,
        "study.html",
        {
            "study": study,
            "arms": (study.progress or {}).get("arms", {}),
            "ranked": study_arms(rows, CONFIDENCE),
            "warnings": edge_warnings([row.summary for row in rows]),
            "min_seeds": MIN_SEEDS_TO_TELL,
            "metric": objective.get("metric"),
            "direction": objective.get("direction"),
            "confidence_pct": round(CONFIDENCE * 100),
            "plots": plots if study.status != StudyStatus.QUEUED.value else [],
            "refresh": REFRESH_SECONDS if running else None,
            "timing": study_timing(study),
            "duration": duration,
        },
    )


def _study_rows(tx: Tx, study_id: str) -> tuple[StudyRecord, list[ArmResult]]:
    study = tx.session.get(StudyRecord, study_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    rows = tx.session.scalars(
        sa.select(ArmResult).where(ArmResult.study_id == study.id).order_by(ArmResult.rank)
    )
    return study, list(rows)
