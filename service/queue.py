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

import hashlib
import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import ApiKey, StudyRecord, StudySource, StudyStatus, utcnow

__all__ = [
    "BudgetExceededError",
    "IdempotencyConflictError",
    "KeyLimits",
    "NotOwnerError",
    "QueueRefusalError",
    "StudyBusyError",
    "TooManyStudiesError",
    "check_budget",
    "check_owner",
    "claim_next",
    "finish",
    "owns",
    "release",
    "renew_lease",
    "request_cancel",
    "spec_hash",
    "start_local",
    "submit",
    "trial_nodes",
]


class QueueRefusalError(Exception):
    """A request the queue refuses; the message says why, for the client."""


class NotOwnerError(QueueRefusalError):
    """The key is neither the study's submitter nor an admin key."""


class IdempotencyConflictError(QueueRefusalError):
    """The idempotency key was used before, by the same API key, with a different body."""


class BudgetExceededError(QueueRefusalError):
    """The study's estimated optimizer steps exceed the configured maximum."""

    loc = ("budget",)


class TooManyStudiesError(QueueRefusalError):
    """The key already has as many queued studies as it may."""


class StudyBusyError(QueueRefusalError):
    """`ratebench run` found its study key taken: running elsewhere, or not a study of its own."""


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits: studies waiting in the queue, and studies running at once."""

    max_queued: int
    max_running: int


def spec_hash(spec: dict[str, Any]) -> str:
    """SHA-256 of the spec's canonical JSON (sorted keys, no spaces): equal bodies, equal hash."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_budget(estimated_steps: int, max_steps: int) -> None:
    """Refuse a study whose estimated optimizer steps exceed `max_steps`."""
    if estimated_steps > max_steps:
        raise BudgetExceededError(
            f"the study needs an estimated {estimated_steps:,} optimizer steps (arms × (trials "
            f"+ final seeds) × epochs × steps per epoch); this service allows at most "
            f"{max_steps:,} per study: lower budget.trials_per_arm, budget.epochs, "
            "budget.steps_per_epoch or the number of arms"
        )


def check_owner(study: StudyRecord, key: ApiKey) -> None:
    """Only the submitting key, or an admin key, may act on a study."""
    if not key.is_admin and study.api_key_id != key.id:
        raise NotOwnerError(
            f"study {study.id} belongs to another API key; only the key that submitted it or "
            "an admin key (`ratebench keys create --admin`) may cancel it"
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


def claim_next(
    engine: sa.Engine,
    scheduler_id: str,
    lease: timedelta,
    *,
    max_running_per_key: int | None = None,
    driving: Collection[str] = (),
) -> StudyRecord | None:
    """Claim the oldest claimable study for `scheduler_id`, or return None; with
    `max_running_per_key`, a key's queued studies wait while it runs that many. `driving`: the
    studies the caller is driving now, never claimed again even when their lease ran out (a
    database outage longer than the lease stops the renewals, not the drivers)."""
    now = utcnow()
    with engine.begin() as conn:
        candidate = conn.execute(
            sa.select(StudyRecord.id)
            .where(
                _claimable(now),
                StudyRecord.source == StudySource.API.value,  # `ratebench run` drives its own
                StudyRecord.cancel_requested.is_(False),
                _key_not_busy(now, max_running_per_key),
                StudyRecord.id.not_in(list(driving)),
            )
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
    _record_environment(engine, candidate, scheduler_id)
    with Session(engine, expire_on_commit=False) as session:
        return session.get(StudyRecord, candidate)


def _record_environment(engine: sa.Engine, study_id: str, owner: str) -> None:
    """The environment of the host that starts (or resumes) the study; gathered once per
    process and written after the claim, so the claim's write lock is not held meanwhile."""
    from worker.environment import collect

    environment = collect()
    with engine.begin() as conn:
        conn.execute(
            sa.update(StudyRecord).where(_owned(study_id, owner)).values(environment=environment)
        )


def start_local(
    engine: sa.Engine,
    study_id: str,
    owner: str,
    lease: timedelta,
    spec: dict[str, Any],
    *,
    name: str,
    task: str,
) -> StudyRecord:
    """Create or find `ratebench run`'s study `study_id` (source "cli") and claim it for
    `owner`, as `claim_next` claims an API study: running, leased, its environment recorded.
    A re-run of the same spec claims the same row again (resuming its Optuna studies); a
    finished row starts over as running (its results are written again at the end).
    `StudyBusyError` when the row runs under a fresh lease elsewhere, belongs to the API, or
    holds a different spec."""
    digest = spec_hash(spec)
    now = utcnow()
    try:
        claimed = _claim_local(engine, study_id, owner, now + lease, spec, digest, name, task)
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
                    source=StudySource.CLI.value,
                )
            )
            session.flush()
        elif study.source != StudySource.CLI.value:
            raise StudyBusyError(f"study {study_id} was submitted to the API; choose another key")
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
    environment = session.scalar(
        sa.select(StudyRecord.environment).where(_owned(study_id, scheduler_id))
    )
    nodes = trial_nodes(session, study_id)
    if environment is not None or nodes:
        values["environment"] = {**(environment or {}), "nodes": nodes}
    done = session.execute(
        sa.update(StudyRecord).where(_owned(study_id, scheduler_id)).values(**values)
    )
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


# Optuna's own tables (optuna.storages._rdb.models), read-only and only these columns.
_optuna_studies = sa.table("studies", sa.column("study_id"), sa.column("study_name"))
_optuna_trials = sa.table("trials", sa.column("trial_id"), sa.column("study_id"))
_optuna_user_attrs = sa.table(
    "trial_user_attributes", sa.column("trial_id"), sa.column("key"), sa.column("value_json")
)
MAX_NODES = 100  # a study's environment lists at most this many distinct machines


def trial_nodes(session: Session, study_id: str) -> list[dict[str, Any]]:
    """The distinct machines the study's trials ran on (their `node` attribute, set by
    `worker.remote`), read in one query from Optuna's tables; [] before any trial ran."""
    if not sa.inspect(session.connection()).has_table("trial_user_attributes"):
        return []
    studies, trials, attrs = _optuna_studies.c, _optuna_trials.c, _optuna_user_attrs.c
    values = session.scalars(
        sa.select(attrs.value_json)
        .distinct()
        .select_from(
            _optuna_user_attrs.join(_optuna_trials, trials.trial_id == attrs.trial_id).join(
                _optuna_studies, studies.study_id == trials.study_id
            )
        )
        .where(
            attrs.key == "node",
            studies.study_name.startswith(f"{study_id}/", autoescape=True),
        )
    )
    nodes: dict[str, dict[str, Any]] = {}
    for value in values:
        node = json.loads(value)
        if isinstance(node, dict):
            nodes.setdefault(json.dumps(node, sort_keys=True), node)
    return [nodes[key] for key in sorted(nodes)][:MAX_NODES]


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
