"""The durable queue on real databases: atomic claims, leases, cancellation, idempotency."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from service import queue
from service.db import get_engine, migrate, session_scope
from service.models import StudyRecord, StudyStatus, utcnow

LEASE = timedelta(seconds=30)
SPEC = {"name": "s", "task": "mnist1d-mlp"}


@pytest.fixture
def engine(database_url: str) -> sa.Engine:
    migrate(database_url)
    return get_engine(database_url)


def submit_many(engine: sa.Engine, n: int) -> list[str]:
    with session_scope(engine) as session:
        return [queue.submit(session, SPEC, name=f"s{i}", task="t")[0].id for i in range(n)]


def test_each_study_is_claimed_by_exactly_one_of_many_racing_schedulers(
    engine: sa.Engine,
) -> None:
    ids = submit_many(engine, 12)
    claims: dict[str, list[str]] = {}
    lock = threading.Lock()
    start = threading.Barrier(6)

    def scheduler(name: str) -> None:
        start.wait()
        while (study := queue.claim_next(engine, name, LEASE)) is not None:
            with lock:
                claims.setdefault(study.id, []).append(name)

    threads = [threading.Thread(target=scheduler, args=(f"s{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claims) == sorted(ids)
    assert all(len(owners) == 1 for owners in claims.values()), claims
    with session_scope(engine) as session:
        rows = session.scalars(sa.select(StudyRecord)).all()
        assert {r.status for r in rows} == {StudyStatus.RUNNING.value}
        assert all(r.claimed_by == claims[r.id][0] for r in rows)


def test_an_expired_lease_lets_another_scheduler_resume_and_fences_the_old_one(
    engine: sa.Engine,
) -> None:
    (study_id,) = submit_many(engine, 1)
    assert queue.claim_next(engine, "a", LEASE) is not None
    assert queue.claim_next(engine, "b", LEASE) is None  # the lease is fresh
    with engine.begin() as conn:
        conn.execute(
            sa.update(StudyRecord).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    resumed = queue.claim_next(engine, "b", LEASE)
    assert resumed is not None and resumed.id == study_id and resumed.attempts == 2
    # what ended attempt 1 is on record: its scheduler died without releasing the study
    assert [f["attempt"] for f in resumed.faults or []] == [1]
    assert "its scheduler a stopped renewing the lease" in (resumed.faults or [{}])[0]["error"]
    assert queue.renew_lease(engine, study_id, "a", LEASE) == (False, False)
    with session_scope(engine) as session:
        assert not queue.finish(session, study_id, "a", StudyStatus.COMPLETED)
        assert queue.finish(session, study_id, "b", StudyStatus.COMPLETED)
        assert session.get(StudyRecord, study_id).status == "completed"  # type: ignore[union-attr]


def test_release_makes_a_running_study_claimable_at_once(engine: sa.Engine) -> None:
    submit_many(engine, 1)
    study = queue.claim_next(engine, "a", LEASE)
    assert study is not None
    queue.release(engine, study.id, "a")
    again = queue.claim_next(engine, "b", LEASE)
    assert again is not None and again.id == study.id
    assert again.attempts == 2 and not again.faults  # a release is not a fault


def test_a_fault_is_noted_on_the_owned_study_and_counts_a_new_attempt(engine: sa.Engine) -> None:
    submit_many(engine, 1)
    study = queue.claim_next(engine, "a", LEASE)
    assert study is not None and study.attempts == 1
    first = queue.record_fault(engine, study.id, "a", "ActorDiedError: the mailbox died")
    second = queue.record_fault(engine, study.id, "a", "ConnectionError: Ray restarted")
    assert [f["attempt"] for f in second] == [1, 2] and second[:1] == first
    assert second[0]["error"] == "ActorDiedError: the mailbox died"
    assert queue.record_fault(engine, study.id, "b", "not its study") == []  # fenced
    with session_scope(engine) as session:
        row = session.get(StudyRecord, study.id)
        assert row is not None and row.attempts == 3 and row.faults == second


def test_cancel_queued_is_immediate_and_running_is_signalled(engine: sa.Engine) -> None:
    queued_id, running_id = submit_many(engine, 2)
    running = queue.claim_next(engine, "a", LEASE)
    assert running is not None and running.id == queued_id  # oldest first
    with session_scope(engine) as session:
        for study_id in (queued_id, running_id):
            queue.request_cancel(session, session.get(StudyRecord, study_id))  # type: ignore[arg-type]
    with session_scope(engine) as session:
        assert session.get(StudyRecord, running_id).status == "cancelled"  # type: ignore[union-attr]
        assert session.get(StudyRecord, queued_id).status == "running"  # type: ignore[union-attr]
    assert queue.renew_lease(engine, queued_id, "a", LEASE) == (True, True)
    assert queue.claim_next(engine, "b", LEASE) is None  # a cancelled study is never claimed


def test_idempotency_key_returns_the_first_study(engine: sa.Engine) -> None:
    with session_scope(engine) as session:
        first, created = queue.submit(session, SPEC, name="x", task="t", idempotency_key="k1")
        again, created_again = queue.submit(session, SPEC, name="x", task="t", idempotency_key="k1")
    assert created and not created_again and first.id == again.id
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(StudyRecord)).scalar() == 1
