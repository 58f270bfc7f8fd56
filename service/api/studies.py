"""`/studies`: submit, list, follow, cancel, and read a study's trials (JSON pages or one CSV
file) and leaderboard. The JSON bundle of a whole study is `service.api.export`'s, mounted here.

Each endpoint is `async def` and does all its database work in one function (`_submit`,
`_list`, …) that `Db.run` calls in a database thread with its own session, the API-key check
included, committed before the endpoint answers: a client that was told a study exists can
read it at once.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from service import queue
from service.api import export
from service.api.deps import RayDep, ReadDb, Tx, WriteDb, in_thread
from service.export import trial_csv
from service.leaderboards import study_arms
from service.models import ArmResult, StudyRecord, StudyStatus
from service.ray_runtime import RayRuntime
from service.schemas import Page, StudyLeaderboard, StudyOut, SubmittedStudy, TrialOut
from service.trial_pages import trial_page
from worker.fit import cluster_fit_problem
from worker.report.stats import seed_warning
from worker.spec import StudySpec
from worker.tasks import DataRoots, check_data_source

router = APIRouter(prefix="/studies", tags=["studies"])
log = logging.getLogger(__name__)

Limit = Annotated[int, Query(ge=1, le=200, description="page size")]
Offset = Annotated[int, Query(ge=0, le=2**63 - 1, description="items to skip")]


def _get_study(tx: Tx, study_id: str) -> StudyRecord:
    study = tx.session.get(StudyRecord, study_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    return study


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SubmittedStudy,
    responses={
        401: {"description": "missing or invalid API key"},
        409: {"description": "the Idempotency-Key was used by this key with another body"},
        413: {"description": "body too large"},
        422: {
            "description": "invalid spec, over the compute budget, or a trial larger than any "
            "node of the Ray cluster; `detail` gives each field path and the problem"
        },
        429: {"description": "this key has as many queued studies as it may"},
        503: {"description": "the database is unavailable; retry after `Retry-After` seconds"},
    },
)
async def submit_study(
    spec: StudySpec,
    db: WriteDb,
    ray: RayDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="a retried request with the same key returns the "
            "study the first one created",
        ),
    ] = None,
) -> SubmittedStudy:
    """Queue a study. Returns 202 with its id once it is stored; `Location` points at it."""
    queue.check_budget(spec.estimated_steps(), db.settings.max_study_steps)
    _check_data_source(spec, db.settings.allowed_data_roots())
    await _check_node_fit(spec, ray, request)
    study_id, study_status, created = await db.run(_submit, spec, idempotency_key)
    location = str(request.url_for("get_study", study_id=study_id).path)
    response.headers["Location"] = location
    if not created:
        response.status_code = status.HTTP_200_OK
    warnings = [w for w in (seed_warning(spec.budget.final_seeds),) if w]
    return SubmittedStudy(
        id=study_id, status=study_status, created=created, location=location, warnings=warnings
    )


def _check_data_source(spec: StudySpec, roots: DataRoots) -> None:
    """A 422 at `data.data_dir` unless the task's files are under the data roots (the same
    refusal whether a path outside them exists or not)."""
    problem = check_data_source(spec.task, spec.data.data_dir, roots)
    if problem is not None:
        error = {"type": "spec", "loc": ("body", "data", "data_dir"), "msg": problem}
        raise RequestValidationError([error])


async def _check_node_fit(spec: StudySpec, ray: RayRuntime, request: Request) -> None:
    """A 422 at `resources.cpus_per_trial` or `gpus_per_trial` when no alive node of the Ray
    cluster this API is connected to (as the scheduler it runs) can hold one trial
    (`worker.fit`). An API that does not run the scheduler is not connected and cannot tell:
    the scheduler's own check then fails the study with the same message when it starts."""
    if not ray.connected:
        return
    res = spec.resources
    try:
        problem = await in_thread(
            request, "health", cluster_fit_problem, res.cpus_per_trial, res.gpus_per_trial
        )
    except Exception:  # an unreachable cluster: the scheduler's check decides later
        log.warning("could not read the Ray cluster's nodes for a submit", exc_info=True)
        return
    if problem is not None:
        error = {"type": "spec", "loc": ("body", "resources", problem.field), "msg": str(problem)}
        raise RequestValidationError([error])


def _submit(tx: Tx, spec: StudySpec, idempotency_key: str | None) -> tuple[str, str, bool]:
    study, created = queue.submit(
        tx.session,
        spec.model_dump(mode="json"),
        name=spec.name,
        task=spec.task,
        idempotency_key=idempotency_key,
        api_key_id=tx.caller.id,
        limits=queue.KeyLimits(tx.settings.max_queued_per_key, tx.settings.max_running_per_key),
    )
    return study.id, study.status, created


@router.get("", response_model=Page[StudyOut])
async def list_studies(
    db: ReadDb,
    limit: Limit = 50,
    offset: Offset = 0,
    status_filter: Annotated[StudyStatus | None, Query(alias="status")] = None,
    task: str | None = None,
) -> Page[StudyOut]:
    """Newest first; filter by `status` and `task`."""
    return await db.run(_list, limit, offset, status_filter, task)


def _list(
    tx: Tx, limit: int, offset: int, status_filter: StudyStatus | None, task: str | None
) -> Page[StudyOut]:
    query = sa.select(StudyRecord)
    if status_filter is not None:
        query = query.where(StudyRecord.status == status_filter.value)
    if task is not None:
        query = query.where(StudyRecord.task == task)
    total = tx.session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = tx.session.scalars(
        query.order_by(StudyRecord.created_at.desc()).limit(limit).offset(offset)
    )
    items = [StudyOut.model_validate(row) for row in rows]
    return Page[StudyOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyOut, responses={404: {}})
async def get_study(study_id: str, db: ReadDb) -> StudyOut:
    """Status, per-arm progress, timestamps and errors."""
    return await db.run(_get, study_id)


def _get(tx: Tx, study_id: str) -> StudyOut:
    from worker.summary import edge_warnings

    study = StudyOut.model_validate(_get_study(tx, study_id))
    rows = tx.session.scalars(sa.select(ArmResult.summary).where(ArmResult.study_id == study_id))
    study.warnings = edge_warnings(list(rows))
    return study


@router.post("/{study_id}/cancel", response_model=StudyOut, responses={403: {}, 404: {}, 409: {}})
async def cancel_study(study_id: str, db: WriteDb) -> StudyOut:
    """Cancel: a queued study at once; a running one stops its trials promptly and keeps the
    results so far. Only the key that submitted the study, or an admin key, may cancel it
    (403 otherwise). Cancelling a finished study is a 409."""
    return await db.run(_cancel, study_id)


def _cancel(tx: Tx, study_id: str) -> StudyOut:
    study = _get_study(tx, study_id)
    queue.check_owner(study, tx.caller)
    if StudyStatus(study.status).finished:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"study {study_id} already {study.status}"
        )
    queue.request_cancel(tx.session, study)
    return StudyOut.model_validate(study)


@router.get("/{study_id}/trials", response_model=Page[TrialOut], responses={404: {}})
async def list_trials(
    study_id: str,
    db: ReadDb,
    limit: Limit = 50,
    offset: Offset = 0,
    arm: str | None = None,
) -> Page[TrialOut]:
    """Every trial of every arm (sweep and final seeds), with params, per-epoch metrics and
    state, ordered by arm then trial number."""
    return await db.run(_trials, study_id, arm, limit, offset)


@router.get(
    "/{study_id}/trials.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}, 404: {}},
)
async def trials_csv(
    study_id: str,
    db: ReadDb,
    request: Request,
    form: Annotated[
        Literal["wide", "long"],
        Query(
            description="`wide`: one row per trial, its history as `epoch_<n>_<metric>` "
            "columns; `long`: one row per trial × epoch × metric"
        ),
    ] = "wide",
    arm: str | None = None,
) -> Response:
    """Every trial (or one arm's) as CSV: arm, role, trial number, state and outcome
    (complete, pruned, diverged, failed), objective, duration, seed, one `param_<name>` column
    per hyperparameter, test metrics, error, and the per-epoch history (`service.export`)."""
    spec = await db.run(_study_spec, study_id)
    text = await in_thread(request, "heavy", _csv, db.settings.resolved_database_url(),
                           study_id, spec, arm, form)  # fmt: skip
    filename = f"{study_id}-trials{'' if form == 'wide' else '-long'}.csv"
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _csv(
    url: str, study_id: str, spec: StudySpec, arm: str | None, form: Literal["wide", "long"]
) -> str:
    from worker.results import load_trials

    return trial_csv(load_trials(url, study_id, spec, arm=arm), form)


def _study_spec(tx: Tx, study_id: str) -> StudySpec:
    return StudySpec.from_stored(_get_study(tx, study_id).spec)


def _trials(tx: Tx, study_id: str, arm: str | None, limit: int, offset: int) -> Page[TrialOut]:
    """One page, read in SQL from Optuna's tables in this request's session
    (`service.trial_pages`): its cost does not grow with the study."""
    spec = _study_spec(tx, study_id)
    return trial_page(tx.session, study_id, spec.labels, arm, limit, offset)


@router.get("/{study_id}/leaderboard", response_model=StudyLeaderboard, responses={404: {}})
async def study_leaderboard(study_id: str, db: ReadDb) -> StudyLeaderboard:
    """The study's arms ranked by the mean objective over the final seeds (stored when the
    study ends; empty while it runs)."""
    return await db.run(_leaderboard, study_id)


def _leaderboard(tx: Tx, study_id: str) -> StudyLeaderboard:
    study = _get_study(tx, study_id)
    rows = tx.session.scalars(
        sa.select(ArmResult).where(ArmResult.study_id == study.id).order_by(ArmResult.rank)
    )
    arms = study_arms(list(rows))
    return StudyLeaderboard(study_id=study.id, status=study.status, arms=arms)


router.include_router(export.router)
