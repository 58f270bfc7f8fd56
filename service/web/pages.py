"""The leaderboard web pages: server-rendered HTML (Jinja2), no front-end build.

`/` lists tasks, the cross-task performance profile and recent studies; `/tasks` every installed
task (built-in or a plugin's) with its package, version and model options; `/tasks/{task}` a
task's leaderboard, one table per setting, with the JSON API's filters; `/studies/{id}` a
study's progress (refreshing while it runs), its arms ranked with confidence intervals, and its
plots. The pages read the same data as the JSON API, under the same privacy
(`service.privacy`: only studies the reader may read; where a study ran, only to its owner).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from service.api.deps import ReadDb, Tx, read_filters, visible
from service.api.reads import readable_study
from service.leaderboards import (
    CONFIDENCE,
    BestArm,
    TaskScores,
    best_arm,
    study_arms,
    task_board,
    task_scores,
)
from service.models import ArmResult, StudyRecord, StudyStatus
from service.privacy import owns_study, public_environment
from service.web.timing import duration, study_timing
from worker.report.stats import MIN_SEEDS_TO_TELL
from worker.spec_schedule import schedule_text
from worker.summary import edge_warnings
from worker.tasks import describe_tasks

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


def seconds(value: float) -> str:
    """Seconds as the study page shows a time: `0.42 s`, `12.3 s`, `2 min 5 s`."""
    if value < 10:
        return f"{value:.2g} s"
    if value < 60:
        return f"{value:.1f} s"
    return duration(value)


SHORT_ID = 8


def short_id(study_id: str) -> str:
    """A study id as a table shows it: its first `SHORT_ID` characters and `…` (a study id is
    32 hex digits, and two in a row pushed the task board past the window). The link and its
    title keep the full id."""
    return study_id if len(study_id) <= SHORT_ID + 2 else f"{study_id[:SHORT_ID]}…"


def breakable(text: str) -> Markup:
    """`text` escaped, with a line-break opportunity after each `+ = / _ ,` and `:`, and after
    a `.` or hyphen before a letter: an arm label (`adam+width=256`, `bmp-local-mean-positions`),
    an arm setting (`weight_decay 0.0005`) or a study name then wraps at its parts instead of
    widening its column, and numbers (`0.0005`, `1e-4`) stay whole."""
    return Markup(re.sub(r"([+=/_,:]|[.-](?=[A-Za-z]))", r"\1<wbr>", str(escape(text))))


templates.env.globals["fmt"] = fmt
templates.env.globals["short_id"] = short_id
templates.env.filters["breakable"] = breakable
templates.env.globals["seconds"] = seconds
templates.env.globals["schedule_text"] = schedule_text


def reruns_text(reruns: int, disagreeing: int = 0) -> str:
    """How many final-seed values a pool left out as re-runs: `` (none), `+3 re-runs counted
    once`, `+3 re-runs counted once, 1 disagreeing`."""
    if not reruns:
        return ""
    text = f"+{reruns} re-run{'s' if reruns != 1 else ''} counted once"
    return f"{text}, {disagreeing} disagreeing" if disagreeing else text


templates.env.globals["reruns_text"] = reruns_text


def best_arm_note(best: BestArm | None) -> str:
    """What the seeds cannot tell of the home page's best arm, in the study page's words:
    `` (it is told apart from every other arm), `(too few seeds to tell)`, `(ties: sgd)`."""
    notes = []
    if best is not None and best.too_few_seeds_to_tell:
        notes.append("too few seeds to tell")
    if best is not None and best.ties:
        notes.append(f"ties: {', '.join(best.ties)}")
    return f"({'; '.join(notes)})" if notes else ""


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
        best = best_arm(per_task)
        tasks.append(
            {
                "task": task,
                "studies": per_task.studies,
                "seeds": sum(len(values) for values in per_task.seeds.values()),
                "reruns": reruns_text(
                    sum(per_task.reruns.values()), sum(per_task.disagreeing.values())
                ),
                "best_arm": best.arm if best else None,
                "best_note": best_arm_note(best),
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
            "min_seeds": MIN_SEEDS_TO_TELL,
            "profile_url": request.url_for("profile_plot", fmt="svg").path,
            "refresh": None,
        },
    )


def _index_data(tx: Tx) -> tuple[dict[str, TaskScores], list[StudyRecord]]:
    studies = tx.session.scalars(
        sa.select(StudyRecord).where(visible(tx)).order_by(StudyRecord.created_at.desc()).limit(20)
    ).all()
    return task_scores(tx.session, visible(tx)), list(studies)


def query_value(value: Any) -> str:
    """A filter value as the query string writes it (`true`, `null`, `0.9`, `relu`)."""
    return value if isinstance(value, str) else json.dumps(value)


templates.env.globals["query_value"] = query_value


@router.get("/tasks", response_class=HTMLResponse, name="tasks_page")
async def tasks_page(request: Request, db: ReadDb) -> HTMLResponse:
    """Every installed task with its package, version, loss and model options; those with a
    finished study link to their leaderboard."""
    scores = await db.run(lambda tx: task_scores(tx.session))
    return templates.TemplateResponse(
        request,
        "tasks.html",
        {"tasks": describe_tasks(), "finished": set(scores), "refresh": None},
    )


@router.get("/tasks/{task}", response_class=HTMLResponse, name="task_page")
async def task_page(
    task: str, request: Request, db: ReadDb, metric: str | None = None
) -> HTMLResponse:
    """The task's board, one table per setting; the query takes the JSON API's filters (a
    form's empty fields are ignored)."""
    filters = read_filters(request, skip_blank=True)
    metric = metric or None
    board = await db.run(
        lambda tx: task_board(tx.session, task, metric, filters, visible=visible(tx))
    )
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
    study, rows, environment = await db.run(_study_rows, study_id)
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
            "environment": environment,
            "arms": (study.progress or {}).get("arms", {}),
            "ranked": study_arms(rows, CONFIDENCE),
            "target": next((row.summary.get("target") for row in rows if row.summary), None),
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


def _study_rows(
    tx: Tx, study_id: str
) -> tuple[StudyRecord, list[ArmResult], dict[str, Any] | None]:
    """The study (404 unless readable), its arm rows, and its environment as the reader may
    see it."""
    study = readable_study(tx, study_id)
    rows = tx.session.scalars(
        sa.select(ArmResult).where(ArmResult.study_id == study.id).order_by(ArmResult.rank)
    )
    environment = study.environment
    if not owns_study(study.api_key_id, tx.key):
        environment = public_environment(environment)
    return study, list(rows), environment
