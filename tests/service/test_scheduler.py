"""The scheduler's lease holder on real databases: a live scheduler keeps its study however long
the sweep goes without polling (Ray's start-up, one long trial), and gives it up when it stops."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from service import queue
from service.db import get_engine, migrate, session_scope
from service.models import StudyRecord, utcnow
from service.scheduler import SchedulerConfig, StudyDriver
from tests.service.helpers import wait_for

LEASE_S = 1.0


@pytest.fixture
def engine(database_url: str) -> sa.Engine:
    migrate(database_url)
    return get_engine(database_url)


def claimed_study(engine: sa.Engine, config: SchedulerConfig) -> str:
    with session_scope(engine) as session:
        queue.submit(session, {"name": "s"}, name="s", task="t")
    study = queue.claim_next(engine, config.scheduler_id, config.lease)
    assert study is not None
    return study.id


def lease_expiry(engine: sa.Engine, study_id: str) -> datetime:
    with session_scope(engine) as session:
        study = session.get(StudyRecord, study_id)
        assert study is not None and study.lease_expires_at is not None
        return study.lease_expires_at


def test_the_heartbeat_keeps_the_lease_for_longer_than_the_lease(engine: sa.Engine) -> None:
    config = SchedulerConfig(storage_url="unused", lease_seconds=LEASE_S, scheduler_id="a")
    study_id = claimed_study(engine, config)
    first = lease_expiry(engine, study_id)
    with StudyDriver(engine, study_id, config) as driver:
        # A sweep that never polls should_stop meanwhile: wait until the first lease would
        # have run out twice over, by the clock the queue uses, and the heartbeat renewed it.
        wait_for(lambda: utcnow() > first + 2 * config.lease, 60, "the first lease to pass")
        wait_for(lambda: lease_expiry(engine, study_id) > utcnow(), 60, "a renewed lease")
        assert queue.claim_next(engine, "b", timedelta(seconds=30)) is None
        assert not driver.lost
    # The heartbeat has stopped: the lease runs out and another scheduler resumes the study.
    resumed = wait_for(
        lambda: queue.claim_next(engine, "b", timedelta(seconds=30)), 60, "the lease to expire"
    )
    assert resumed.id == study_id and resumed.attempts == 2


def test_the_heartbeat_learns_of_cancellation_and_of_a_lost_lease(engine: sa.Engine) -> None:
    config = SchedulerConfig(storage_url="unused", lease_seconds=LEASE_S, scheduler_id="a")
    study_id = claimed_study(engine, config)
    never = threading.Event()
    with StudyDriver(engine, study_id, config) as driver:
        assert not driver.should_stop(never)
        with session_scope(engine) as session:
            study = session.get(StudyRecord, study_id)
            assert study is not None
            queue.request_cancel(session, study)
        wait_for(lambda: driver.cancelled, 60, "the heartbeat to see the cancellation", 0.05)
        assert driver.should_stop(never)
        with session_scope(engine) as session:  # another scheduler took the study over
            session.execute(sa.update(StudyRecord).values(claimed_by="b"))
        wait_for(lambda: driver.lost, 60, "the heartbeat to see the lease lost", 0.05)
        assert driver.should_stop(never)
