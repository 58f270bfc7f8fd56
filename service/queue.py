"""The durable study queue: rows of `ratebench_studies` and the transitions between states.

    queued ──claim──▶ running ──finish──▶ completed | failed | cancelled
       └──────────cancel──────────────────────────▶ cancelled

A scheduler *claims* a study by one conditional UPDATE that succeeds only while the row is still
claimable (queued, or running with an expired lease), in fair order across keys (`claim_next`:
a key's backlog never keeps another key's first study waiting for more than one slot): on
SQLite the single writer makes that atomic; on PostgreSQL the candidate is first locked with
`SELECT … FOR UPDATE SKIP LOCKED`, so concurrent schedulers pick different rows instead of
queueing on one. A claim holds a lease
that the scheduler renews while it works; a scheduler that dies stops renewing, the lease
expires, and the next claim resumes the study from its Optuna storage. Every transition after
the claim is conditional on `claimed_by`, so a scheduler that lost its lease can write nothing.

Submitting and cancelling are a key's acts, and the queue enforces who may do what:
- a study belongs to the API key that submitted it; only that key or an admin key may cancel
  it (`NotOwnerError` otherwise);
- an idempotency key is scoped to the API key that sent it: a retry with the same body returns
  the first study, a different body under the same key is an `IdempotencyConflictError` (bodies are
  compared by the SHA-256 of their canonical JSON, stored as `spec_hash`);
- a key may have at most `KeyLimits.max_queued` studies waiting (`TooManyStudiesError` beyond), and
  `claim_next` starts none of a key's queued studies while it has `max_running` running;
- a study's estimated optimizer steps must fit the operator's maximum (`check_budget`).
The refusals are plain exceptions; `service.errors` gives each its HTTP status.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from service.models import ApiKey, StudyRecord, StudySource, StudyStatus, utcnow
from service.optuna_tables import trial_nodes
from service.refusals import (
    BudgetExceededError,
    IdempotencyConflictError,
    NotOwnerError,
    QueueRefusalError,
    StudyBusyError,
    TooManyStudiesError,
    check_budget,
    spec_hash,
)

__all__ = [
    "BudgetExceededError",
    "IdempotencyConflictError",
    "KeyLimits",
    "NotOwnerError",
    "QueueRefusalError",
    "StudyBusyError",
    "TooManyStudiesError",
    "cancel_queued_of_key",
    "check_budget",
    "check_owner",
    "claim_next",
    "finish",
    "owns",
    "record_fault",
    "release",
    "renew_lease",
    "request_cancel",
    "spec_hash",
    "start_local",
    "submit",
]


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits: studies waiting in the queue, and studies running at once."""

    max_queued: int
    max_running: int


def check_owner(study: StudyRecord, key: ApiKey) -> None:
    """Only the submitting key, or an admin key, may act on a study."""
    if not key.is_admin and study.api_key_id != key.id:
        raise NotOwnerError(
            f"study {study.id} belongs to another API key; only the key that submitted it or "
            "an admin key (`ratebench keys create --admin`) may cancel it or change who may "
            "read it"
        )


def _by_idempotency_key(api_key_id: int | None, idempotency_key: str) -> sa.Select[Any]:
    owner = (
        StudyRecord.api_key_id.is_(None)
        if api_key_id is None
        else StudyRecord.api_key_id == api_key_id
    )
    return sa.select(StudyRecord).where(owner, StudyRecord.idempotency_key == idempotency_key)


def _the_same_study(existing: StudyRecord, digest: str) -> StudyRecord:
    if existing.spec_hash is not None and existing.spec_hash != digest:
        raise IdempotencyConflictError(
            f"Idempotency-Key {existing.idempotency_key!r} was already used by this API key "
            f"for study {existing.id} with a different body; send a new Idempotency-Key for a "
            "new study"
        )
    return existing


def _check_queued(session: Session, api_key_id: int, limits: KeyLimits) -> None:
    """Called after the new row is flushed: SQLite's write lock (taken by the flush) and
    PostgreSQL's lock on the key's row make concurrent submits of one key count in turn."""
    queued = session.scalar(
        sa.select(sa.func.count())
        .select_from(StudyRecord)
        .where(
            StudyRecord.api_key_id == api_key_id,
            StudyRecord.status == StudyStatus.QUEUED.value,
        )
    )
    if (queued or 0) > limits.max_queued:
        raise TooManyStudiesError(
            f"this API key already has {limits.max_queued} queued studies, the most it may "
            "have waiting; submit again when one has started, or cancel one"
        )


def submit(
    session: Session,
    spec: dict[str, Any],
    *,
    name: str,
    task: str,
    idempotency_key: str | None = None,
    api_key_id: int | None = None,
    limits: KeyLimits | None = None,
    public: bool = False,
) -> tuple[StudyRecord, bool]:
    """Queue a validated spec; returns (study, created). An idempotency key this API key used
    before returns the study it created, without writing anything, if the body is the same
    (`IdempotencyConflictError` if not). With `limits`, a key over its queued limit gets
    `TooManyStudiesError` and nothing is written (the caller's transaction is rolled back)."""
    digest = spec_hash(spec)
    if idempotency_key is not None:
        existing = session.scalars(_by_idempotency_key(api_key_id, idempotency_key)).first()
        if existing is not None:
            return _the_same_study(existing, digest), False
    if limits is not None and api_key_id is not None:  # serialise this key's submits
        session.execute(sa.select(ApiKey.id).where(ApiKey.id == api_key_id).with_for_update())
    study = StudyRecord(
        id=uuid.uuid4().hex,
        name=name,
        task=task,
        spec=spec,
        spec_hash=digest,
        idempotency_key=idempotency_key,
        api_key_id=api_key_id,
        public=public,
    )
    session.add(study)
    try:
        session.flush()
    except sa.exc.IntegrityError:  # a concurrent retry with the same key won the race
        session.rollback()
        if idempotency_key is None:
            raise
        existing = session.scalars(_by_idempotency_key(api_key_id, idempotency_key)).one()
        return _the_same_study(existing, digest), False
    if limits is not None and api_key_id is not None:
        try:
            _check_queued(session, api_key_id, limits)
        except TooManyStudiesError:
            session.rollback()
            raise
    return study, True


def _claimable(now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(
        StudyRecord.status == StudyStatus.QUEUED.value,
        sa.and_(
            StudyRecord.status == StudyStatus.RUNNING.value,
            StudyRecord.lease_expires_at < now,
        ),
    )


def _key_not_busy(now: datetime, max_running: int | None) -> sa.ColumnElement[bool]:
    """A queued study may start unless its key already runs `max_running` studies (a running
    study whose lease expired is resumed regardless: it already counted when it started)."""
    if max_running is None:
        return sa.true()
    busy = (
        sa.select(StudyRecord.api_key_id)
        .where(
            StudyRecord.status == StudyStatus.RUNNING.value,
            StudyRecord.lease_expires_at >= now,
            StudyRecord.api_key_id.is_not(None),
        )
        .group_by(StudyRecord.api_key_id)
        .having(sa.func.count() >= max_running)
    )
    return sa.or_(
        StudyRecord.status != StudyStatus.QUEUED.value,
        StudyRecord.api_key_id.is_(None),
        StudyRecord.api_key_id.not_in(busy.scalar_subquery()),
    )


def _fair_order(now: datetime) -> list[sa.ColumnElement[Any]]:
    """Claim order: first the running studies whose scheduler died (they already held a slot),
    then queued studies by how many studies their key runs now, fewest first, then oldest
    first. So however many studies one key has queued, another key's first study is the next
    to start when a slot frees: it waits for at most one study's slot time."""
    running = aliased(StudyRecord)
    key_running = (
        sa.select(sa.func.count())
        .select_from(running)
        .where(
            running.api_key_id == StudyRecord.api_key_id,
            running.status == StudyStatus.RUNNING.value,
            running.lease_expires_at >= now,
        )
        .scalar_subquery()
    )
    resume_first = sa.case((StudyRecord.status == StudyStatus.RUNNING.value, 0), else_=1)
    return [resume_first, key_running, StudyRecord.created_at.asc()]


def claim_next(
    engine: sa.Engine,
    scheduler_id: str,
    lease: timedelta,
    *,
    max_running_per_key: int | None = None,
    driving: Collection[str] = (),
) -> StudyRecord | None:
    """Claim the next claimable study for `scheduler_id` in fair order (`_fair_order`), or
    return None; with `max_running_per_key`, a key's queued studies wait while it runs that
    many. `driving`: the studies the caller is driving now, never claimed again even when
    their lease ran out (a database outage longer than the lease stops the renewals, not the
    drivers)."""
    now = utcnow()
    with engine.begin() as conn:
        found = conn.execute(
            sa.select(StudyRecord.id, StudyRecord.status, StudyRecord.claimed_by)
            .where(
                _claimable(now),
                StudyRecord.source == StudySource.API.value,  # `ratebench run` drives its own
                StudyRecord.cancel_requested.is_(False),
                _key_not_busy(now, max_running_per_key),
                StudyRecord.id.not_in(list(driving)),
            )
            .order_by(*_fair_order(now))
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if found is None:
            return None
        candidate, status, previous_owner = found
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
    if status == StudyStatus.RUNNING.value and previous_owner is not None:  # not released
        record_fault(
            engine, candidate, scheduler_id,
            f"its scheduler {previous_owner} stopped renewing the lease before the study "
            "finished (it crashed, was killed, or lost the database for longer than the lease)",
            previous_attempt=True,
        )  # fmt: skip
    _record_environment(engine, candidate, scheduler_id)
    with Session(engine, expire_on_commit=False) as session:
        return session.get(StudyRecord, candidate)


def _record_environment(engine: sa.Engine, study_id: str, owner: str) -> None:
    """The environment of the host that starts (or resumes) the study; gathered once per
    process and written after the claim, so the claim's write lock is not held meanwhile."""
    from worker.environment import collect

    environment = collect()
    environment["task"] = _task_source(engine, study_id)
    with engine.begin() as conn:
        conn.execute(
            sa.update(StudyRecord).where(_owned(study_id, owner)).values(environment=environment)
        )


def _task_source(engine: sa.Engine, study_id: str) -> dict[str, Any] | None:
    """The study's task as this process has it: its package and version (None for an inline
    task of the Python API: its package), or None when it is not installed here."""
    from worker.tasks import UnknownTaskError, get_task

    with engine.connect() as conn:
        name = conn.execute(sa.select(StudyRecord.task).where(StudyRecord.id == study_id)).scalar()
    try:
        task = get_task(str(name))
    except UnknownTaskError:
        return None
    return {"name": task.name, "package": task.package, "version": task.version}


def start_local(
    engine: sa.Engine,
    study_id: str,
    owner: str,
    lease: timedelta,
    spec: dict[str, Any],
    *,
    name: str,
    task: str,
    source: StudySource = StudySource.CLI,
) -> StudyRecord:
    """Create or find `ratebench run`'s study `study_id` (source "cli", or "python" for the
    Python API's) and claim it for `owner`, as `claim_next` claims an API study: running,
    leased, its environment recorded.
    A re-run of the same spec claims the same row again (resuming its Optuna studies); a
    finished row starts over as running (its results are written again at the end).
    `StudyBusyError` when the row runs under a fresh lease elsewhere, belongs to the API, or
    holds a different spec."""
    digest = spec_hash(spec)
    now = utcnow()
    try:
        claimed = _claim_local(
            engine, study_id, owner, now + lease, spec, digest, name, task, source
        )
    except sa.exc.IntegrityError:  # another process created the row meanwhile
        claimed = False
    if not claimed:
        raise StudyBusyError(f"study {study_id} is running in another process")
    _record_environment(engine, study_id, owner)
    with Session(engine, expire_on_commit=False) as session:
        found = session.get(StudyRecord, study_id)
    assert found is not None
    return found


def _claim_local(
    engine: sa.Engine,
    study_id: str,
    owner: str,
    until: datetime,
    spec: dict[str, Any],
    digest: str,
    name: str,
    task: str,
    source: StudySource,
) -> bool:
    now = utcnow()
    with Session(engine) as session, session.begin():
        study = session.get(StudyRecord, study_id)
        if study is None:
            session.add(
                StudyRecord(
                    id=study_id,
                    name=name,
                    task=task,
                    spec=spec,
                    spec_hash=digest,
                    source=source.value,
                )
            )
            session.flush()
        elif study.source == StudySource.API.value:
            raise StudyBusyError(f"study {study_id} was submitted to the API; choose another key")
        elif study.source != source.value:
            raise StudyBusyError(
                f"study {study_id} was recorded by {study.source}, not {source.value}; choose "
                "another key"
            )
        elif study.spec_hash != digest:
            raise StudyBusyError(
                f"study {study_id} holds a different spec; run this one under another key"
            )
        claimed = session.execute(
            sa.update(StudyRecord)
            .where(
                StudyRecord.id == study_id,
                sa.or_(
                    StudyRecord.status != StudyStatus.RUNNING.value,
                    StudyRecord.lease_expires_at < now,
                ),
            )
            .values(
                status=StudyStatus.RUNNING.value,
                claimed_by=owner,
                lease_expires_at=until,
                started_at=now,
                finished_at=None,
                error=None,
                cancel_requested=False,
                attempts=StudyRecord.attempts + 1,
            )
        ).rowcount  # type: ignore[attr-defined]
    return bool(claimed == 1)


def _owned(study_id: str, scheduler_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        StudyRecord.id == study_id,
        StudyRecord.claimed_by == scheduler_id,
        StudyRecord.status == StudyStatus.RUNNING.value,
    )


def owns(engine: sa.Engine, study_id: str, scheduler_id: str) -> bool:
    """Whether `scheduler_id` still holds the running study (its lease not taken over)."""
    with engine.connect() as conn:
        found = conn.execute(sa.select(StudyRecord.id).where(_owned(study_id, scheduler_id)))
        return found.first() is not None


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
    """Give a running study back (scheduler shutting down): the next claim resumes it at once.
    The owner is cleared, which tells that claim a release from a crash (no fault recorded)."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(StudyRecord)
            .where(_owned(study_id, scheduler_id))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1), claimed_by=None)
        )


def record_fault(
    engine: sa.Engine,
    study_id: str,
    scheduler_id: str,
    error: str,
    *,
    previous_attempt: bool = False,
) -> list[dict[str, Any]]:
    """Note that a fault ended an attempt of the owned running study, and return every fault
    noted so far ([] when the study is no longer `scheduler_id`'s). The fault is the current
    attempt's, which ends, and the attempt count grows for the resume that follows; with
    `previous_attempt` it is the attempt before the claim that just counted the new one."""
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(StudyRecord.attempts, StudyRecord.faults)
            .where(_owned(study_id, scheduler_id))
            .with_for_update()
        ).first()
        if row is None:
            return []
        attempts, faults = row
        attempt = attempts - 1 if previous_attempt else attempts
        entry = {"attempt": attempt, "at": utcnow().isoformat(), "error": error[:2000]}
        faults = [*(faults or []), entry]
        values: dict[str, Any] = {"faults": faults}
        if not previous_attempt:
            values["attempts"] = attempts + 1
        conn.execute(sa.update(StudyRecord).where(_owned(study_id, scheduler_id)).values(**values))
    return faults


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
    environment = session.scalar(
        sa.select(StudyRecord.environment).where(_owned(study_id, scheduler_id))
    )
    nodes = trial_nodes(session, study_id)  # Optuna's tables: `service.optuna_tables`
    if environment is not None or nodes:
        values["environment"] = {**(environment or {}), "nodes": nodes}
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


def cancel_queued_of_key(session: Session, api_key_id: int) -> tuple[list[str], list[str]]:
    """Cancel every queued study of a key (it is being revoked: nothing of it should start);
    returns (the cancelled ids, the ids of its studies still running, which go on)."""
    now = utcnow()
    queued = list(
        session.scalars(
            sa.select(StudyRecord.id).where(
                StudyRecord.api_key_id == api_key_id,
                StudyRecord.status == StudyStatus.QUEUED.value,
            )
        )
    )
    if queued:
        session.execute(
            sa.update(StudyRecord)
            .where(StudyRecord.id.in_(queued), StudyRecord.status == StudyStatus.QUEUED.value)
            .values(
                status=StudyStatus.CANCELLED.value,
                finished_at=now,
                cancel_requested=True,
                error="cancelled: its API key was revoked before it started",
            )
        )
    running = list(
        session.scalars(
            sa.select(StudyRecord.id).where(
                StudyRecord.api_key_id == api_key_id,
                StudyRecord.status == StudyStatus.RUNNING.value,
            )
        )
    )
    return queued, running
