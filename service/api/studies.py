"""`/studies`: submit, list, follow, cancel, and read a study's trials and leaderboard."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status

from service import queue
from service.api.auth import ReadAccess, WriteKey
from service.api.deps import SessionDep, SettingsDep
from service.models import ArmResult, StudyRecord, StudyStatus
from service.schemas import ArmRow, Page, StudyLeaderboard, StudyOut, SubmittedStudy, TrialOut
from worker.spec import StudySpec

router = APIRouter(prefix="/studies", tags=["studies"])

Limit = Annotated[int, Query(ge=1, le=200, description="page size")]
Offset = Annotated[int, Query(ge=0, description="items to skip")]


def _get_study(session: SessionDep, study_id: str) -> StudyRecord:
    study = session.get(StudyRecord, study_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    return study


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SubmittedStudy,
    responses={
        401: {"description": "missing or invalid API key"},
        413: {"description": "body too large"},
        422: {"description": "invalid spec; `detail` gives each field path and the problem"},
    },
)
def submit_study(
    spec: StudySpec,
    key: WriteKey,
    session: SessionDep,
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
    """Queue a study. Returns 202 with its id; `Location` points at the study."""
    study, created = queue.submit(
        session,
        spec.model_dump(mode="json"),
        name=spec.name,
        task=spec.task,
        idempotency_key=idempotency_key,
        api_key_id=key.id,
    )
    location = str(request.url_for("get_study", study_id=study.id).path)
    response.headers["Location"] = location
    if not created:
        response.status_code = status.HTTP_200_OK
    return SubmittedStudy(id=study.id, status=study.status, created=created, location=location)


@router.get("", response_model=Page[StudyOut])
def list_studies(
    session: SessionDep,
    _: ReadAccess,
    limit: Limit = 50,
    offset: Offset = 0,
    status_filter: Annotated[StudyStatus | None, Query(alias="status")] = None,
    task: str | None = None,
) -> Page[StudyOut]:
    """Newest first; filter by `status` and `task`."""
    query = sa.select(StudyRecord)
    if status_filter is not None:
        query = query.where(StudyRecord.status == status_filter.value)
    if task is not None:
        query = query.where(StudyRecord.task == task)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(StudyRecord.created_at.desc()).limit(limit).offset(offset)
    )
    items = [StudyOut.model_validate(row) for row in rows]
    return Page[StudyOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyOut, responses={404: {}})
def get_study(study_id: str, session: SessionDep, _: ReadAccess) -> StudyOut:
    """Status, per-arm progress, timestamps and errors."""
    return StudyOut.model_validate(_get_study(session, study_id))


@router.post("/{study_id}/cancel", response_model=StudyOut, responses={404: {}, 409: {}})
def cancel_study(study_id: str, session: SessionDep, _: WriteKey) -> StudyOut:
    """Cancel: a queued study at once; a running one stops its trials promptly and keeps the
    results so far. Cancelling a finished study is a 409."""
    study = _get_study(session, study_id)
    if StudyStatus(study.status).finished:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"study {study_id} already {study.status}"
        )
    queue.request_cancel(session, study)
    return StudyOut.model_validate(study)


@router.get("/{study_id}/trials", response_model=Page[TrialOut], responses={404: {}})
def list_trials(
    study_id: str,
    session: SessionDep,
    settings: SettingsDep,
    _: ReadAccess,
    limit: Limit = 50,
    offset: Offset = 0,
    arm: str | None = None,
) -> Page[TrialOut]:
    """Every trial of every arm (sweep and final seeds), with params, per-epoch metrics and
    state, ordered by arm then trial number."""
    from worker.results import load_trials

    study = _get_study(session, study_id)
    spec = StudySpec.model_validate(study.spec)
    trials = load_trials(settings.resolved_database_url(), study.id, spec, arm=arm)
    items = [TrialOut.model_validate(t.to_dict()) for t in trials[offset : offset + limit]]
    return Page[TrialOut](items=items, total=len(trials), limit=limit, offset=offset)


@router.get("/{study_id}/leaderboard", response_model=StudyLeaderboard, responses={404: {}})
def study_leaderboard(study_id: str, session: SessionDep, _: ReadAccess) -> StudyLeaderboard:
    """The study's arms ranked by the mean objective over the final seeds (stored when the
    study ends; empty while it runs)."""
    study = _get_study(session, study_id)
    rows = session.scalars(
        sa.select(ArmResult).where(ArmResult.study_id == study.id).order_by(ArmResult.rank)
    )
    arms = [ArmRow.model_validate(row, from_attributes=True) for row in rows]
    return StudyLeaderboard(study_id=study.id, status=study.status, arms=arms)
