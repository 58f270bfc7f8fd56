"""The leaderboard web pages: server-rendered HTML (Jinja2), no front-end build.

`/` lists tasks, the cross-task performance profile and recent studies; `/tasks/{task}` shows a
task's leaderboard; `/studies/{id}` a study's progress (refreshing while it runs), its arms
ranked with confidence intervals, and its plots. The pages read the same data as the JSON API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from service.api.auth import ReadAccess
from service.api.deps import SessionDep
from service.leaderboards import task_board, task_scores
from service.models import ArmResult, StudyRecord, StudyStatus
from worker.report.stats import rank_arms

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
STATIC_DIR = Path(__file__).parent / "static"
CONFIDENCE = 0.95
REFRESH_SECONDS = 5


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


templates.env.globals["fmt"] = fmt


@router.get("/", response_class=HTMLResponse, name="index")
def index(request: Request, session: SessionDep, _: ReadAccess) -> HTMLResponse:
    scores = task_scores(session)
    tasks = []
    for task, per_task in sorted(scores.items()):
        best = max(per_task.arms.items(), key=lambda kv: kv[1] if per_task.maximize else -kv[1])
        tasks.append(
            {
                "task": task,
                "studies": per_task.studies,
                "best_arm": best[0],
                "metric": per_task.metric,
            }
        )
    studies = session.scalars(
        sa.select(StudyRecord).order_by(StudyRecord.created_at.desc()).limit(20)
    ).all()
    return templates.TemplateResponse(
        request,
        "index.html",
        {
            "tasks": tasks,
            "studies": studies,
            "profile_available": bool(scores),
            "profile_url": request.url_for("profile_plot", fmt="svg").path,
            "refresh": None,
        },
    )


@router.get("/tasks/{task}", response_class=HTMLResponse, name="task_page")
def task_page(task: str, request: Request, session: SessionDep, _: ReadAccess) -> HTMLResponse:
    board = task_board(session, task)
    if board is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no completed study on {task!r}")
    studies = max((row.studies for row in board.arms), default=0)
    return templates.TemplateResponse(
        request, "task.html", {"board": board, "studies": studies, "refresh": None}
    )


def _ranked(rows: list[ArmResult], maximize: bool) -> list[dict[str, Any]]:
    by_arm = {row.arm: row for row in rows}
    seeds = {row.arm: row.summary.get("final_values") or [] for row in rows}
    ranked = rank_arms({arm: v for arm, v in seeds.items() if v}, maximize, CONFIDENCE)
    table = [
        {
            "rank": r.rank,
            "arm": r.arm,
            "scheme": by_arm[r.arm].scheme,
            "best_lr": by_arm[r.arm].best_lr,
            "mean": r.interval.mean,
            "low": r.interval.low,
            "high": r.interval.high,
            "test_mean": by_arm[r.arm].test_mean,
            "n_trials": by_arm[r.arm].n_trials,
            "n_diverged": by_arm[r.arm].n_diverged,
            "ties": r.not_distinguishable_from,
        }
        for r in ranked
    ]
    for row in rows:  # arms without final seeds (e.g. every trial diverged) rank last
        if not seeds[row.arm]:
            table.append(
                {"rank": len(table) + 1, "arm": row.arm, "scheme": row.scheme,
                 "best_lr": row.best_lr, "mean": None, "low": None, "high": None,
                 "test_mean": None, "n_trials": row.n_trials, "n_diverged": row.n_diverged,
                 "ties": []}
            )  # fmt: skip
    return table


@router.get("/studies/{study_id}", response_class=HTMLResponse, name="study_page")
def study_page(study_id: str, request: Request, session: SessionDep, _: ReadAccess) -> HTMLResponse:
    study = session.get(StudyRecord, study_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    rows = list(
        session.scalars(
            sa.select(ArmResult).where(ArmResult.study_id == study.id).order_by(ArmResult.rank)
        )
    )
    objective = study.spec.get("objective", {})
    maximize = objective.get("direction") == "maximize"
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
            "ranked": _ranked(rows, maximize),
            "metric": objective.get("metric"),
            "direction": objective.get("direction"),
            "confidence_pct": round(CONFIDENCE * 100),
            "plots": plots if study.status != StudyStatus.QUEUED.value else [],
            "refresh": REFRESH_SECONDS if running else None,
        },
    )
