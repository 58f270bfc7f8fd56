"""The durable study queue: rows of `ratebench_studies` and the transitions between states.

    queued ──claim──▶ running ──finish──▶ completed | failed | cancelled
       └──────────cancel──────────────────────────▶ cancelled

A scheduler *claims* a study by one conditional UPDATE that succeeds only while the row is still
claimable (queued, or running with an expired lease): on SQLite the single writer makes that
atomic; on PostgreSQL the candidate is first locked with `SELECT … FOR UPDATE SKIP LOCKED`, so
concurrent schedulers pick different rows instead of queueing on one. A claim holds a lease
that the scheduler renews while it works; a scheduler that dies stops renewing, the lease
expires, and the next claim resumes the study from its Optuna storage. Every transition after
the claim is conditional on `claimed_by`, so a scheduler that lost its lease can write nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import StudyRecord, StudyStatus, utcnow

__all__ = [
    "claim_next",
    "finish",
    "release",
    "renew_lease",
    "request_cancel",
    "submit",
]


def submit(
    session: Session,
    spec: dict[str, Any],
    *,
    name: str,
    task: str,
    idempotency_key: str | None = None,
    api_key_id: int | None = None,
) -> tuple[StudyRecord, bool]:
    """Queue a validated spec; returns (study, created). A known idempotency key returns the
    study it created before, without writing anything."""
    if idempotency_key is not None:
        existing = session.scalars(
            sa.select(StudyRecord).where(StudyRecord.idempotency_key == idempotency_key)
        ).first()
        if existing is not None:
            return existing, False
    study = StudyRecord(
        id=uuid.uuid4().hex,
        name=name,
        task=task,
        spec=spec,
        idempotency_key=idempotency_key,
        api_key_id=api_key_id,
    )
    session.add(study)
    try:
        session.flush()
    except sa.exc.IntegrityError:  # a concurrent retry with the same key won the race
        session.rollback()
        existing = session.scalars(
            sa.select(StudyRecord).where(StudyRecord.idempotency_key == idempotency_key)
        ).one()
        return existing, False
    return study, True


def _claimable(now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(
        StudyRecord.status == StudyStatus.QUEUED.value,
        sa.and_(
            StudyRecord.status == StudyStatus.RUNNING.value,
            StudyRecord.lease_expires_at < now,
        ),
    )


def claim_next(engine: sa.Engine, scheduler_id: str, lease: timedelta) -> StudyRecord | None:
    """Claim the oldest claimable study for `scheduler_id`, or return None."""
    now = utcnow()
    with engine.begin() as conn:
        candidate = conn.execute(
            sa.select(StudyRecord.id)
            .where(_claimable(now), StudyRecord.cancel_requested.is_(False))
            .order_by(StudyRecord.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).scalar()
        if candidate is None:
            return None
        claimed = conn.execute(
            sa.update(StudyRecord)
            .where(StudyRecord.id == candidate, _claimable(now))
            .values(
                status=StudyStatus.RUNNING.value,
                claimed_by=scheduler_id,
                lease_expires_at=now + lease,
                started_at=sa.func.coalesce(StudyRecord.started_at, now),
                attempts=StudyRecord.attempts + 1,
            )
        ).rowcount
    if claimed != 1:
        return None
    with Session(engine, expire_on_commit=False) as session:
        return session.get(StudyRecord, candidate)


def _owned(study_id: str, scheduler_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        StudyRecord.id == study_id,
        StudyRecord.claimed_by == scheduler_id,
        StudyRecord.status == StudyStatus.RUNNING.value,
    )


def renew_lease(
    engine: sa.Engine,
    study_id: str,
    scheduler_id: str,
    lease: timedelta,
    progress: dict[str, Any] | None = None,
) -> tuple[bool, bool]:
    """Extend the lease (and store progress); returns (still owned, cancel requested)."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + lease}
    if progress is not None:
        values["progress"] = progress
    with engine.begin() as conn:
        owned = conn.execute(
            sa.update(StudyRecord).where(_owned(study_id, scheduler_id)).values(**values)
        ).rowcount
        cancel = conn.execute(
            sa.select(StudyRecord.cancel_requested).where(StudyRecord.id == study_id)
        ).scalar()
    return owned == 1, bool(cancel)


def release(engine: sa.Engine, study_id: str, scheduler_id: str) -> None:
    """Give a running study back (scheduler shutting down): the next claim resumes it at once."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(StudyRecord)
            .where(_owned(study_id, scheduler_id))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def finish(
    session: Session,
    study_id: str,
    scheduler_id: str,
    status: StudyStatus,
    *,
    error: str | None = None,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Move an owned running study to a final state; False when the lease was lost."""
    values: dict[str, Any] = {
        "status": status.value,
        "finished_at": utcnow(),
        "lease_expires_at": None,
        "error": error,
    }
    if progress is not None:
        values["progress"] = progress
    done = session.execute(
        sa.update(StudyRecord).where(_owned(study_id, scheduler_id)).values(**values)
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def request_cancel(session: Session, study: StudyRecord) -> None:
    """Cancel a queued study at once; ask the scheduler of a running one to stop."""
    if study.status == StudyStatus.QUEUED.value:
        session.execute(
            sa.update(StudyRecord)
            .where(StudyRecord.id == study.id, StudyRecord.status == StudyStatus.QUEUED.value)
            .values(status=StudyStatus.CANCELLED.value, finished_at=utcnow(), cancel_requested=True)
        )
    elif study.status == StudyStatus.RUNNING.value:
        study.cancel_requested = True
    session.flush()
    session.refresh(study)
