"""The scheduler's lease holder on real databases: a live scheduler keeps its study however long
the sweep goes without polling (Ray's start-up, one long trial), and gives it up when it stops."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from service import queue
from service.db import get_engine, migrate, session_scope
from service.models import StudyRecord
from service.scheduler import SchedulerConfig, _StudyDriver

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


def test_the_heartbeat_keeps_the_lease_for_longer_than_the_lease(engine: sa.Engine) -> None:
    config = SchedulerConfig(storage_url="unused", lease_seconds=LEASE_S, scheduler_id="a")
    study_id = claimed_study(engine, config)
    with _StudyDriver(engine, study_id, config) as driver:
        time.sleep(3 * LEASE_S)  # a sweep that never polls should_stop meanwhile
        assert queue.claim_next(engine, "b", timedelta(seconds=30)) is None
        assert not driver.lost
    time.sleep(1.5 * LEASE_S)  # the heartbeat has stopped: the lease runs out
    resumed = queue.claim_next(engine, "b", timedelta(seconds=30))
    assert resumed is not None and resumed.id == study_id and resumed.attempts == 2


def test_the_heartbeat_learns_of_cancellation_and_of_a_lost_lease(engine: sa.Engine) -> None:
    config = SchedulerConfig(storage_url="unused", lease_seconds=LEASE_S, scheduler_id="a")
    study_id = claimed_study(engine, config)
    never = threading.Event()
    with _StudyDriver(engine, study_id, config) as driver:
        assert not driver.should_stop(never)
        with session_scope(engine) as session:
            study = session.get(StudyRecord, study_id)
            assert study is not None
            queue.request_cancel(session, study)
        time.sleep(LEASE_S)
        assert driver.cancelled and driver.should_stop(never)
        with session_scope(engine) as session:  # another scheduler took the study over
            session.execute(sa.update(StudyRecord).values(claimed_by="b"))
        time.sleep(LEASE_S)
        assert driver.lost
