"""One scheduler driving several studies at once, on real databases: at most
`max_running_studies` run, a key never runs more than `max_running_per_key`, and a cancel, a
lost lease or a shutdown acts on each study alone. The sweep is replaced by one that runs until
it is told to stop or to finish (its real counterpart, with Ray, is in
tests/service/test_concurrent_studies.py); the claims, leases, heartbeats and records are real.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from service import queue
from service.auth import create_key
from service.db import get_engine, migrate, session_scope
from service.models import StudyRecord, StudyStatus
from service.scheduler import Scheduler, SchedulerConfig
from tests.service.helpers import wait_for
from worker.slots import StudySlots
from worker.spec import StudySpec
from worker.sweep import StudyResult, TakenOverError

SPEC = StudySpec.model_validate(
    {"name": "s", "task": "digits-mlp", "arms": [{"optimizer": "sgd"}]}
).model_dump(mode="json")


class Sweeps:
    """Stands in for `worker.sweep.run_study`: each study runs until `finish(name)` or until
    its `should_stop()` says so; records which run at once and the trial seat each got."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[str, str] = {}  # study id → name
        self.most = 0
        self.names: dict[str, str] = {}
        self.seats: dict[str, StudySlots] = {}
        self.done: dict[str, threading.Event] = {}
        self.starts: Counter[str] = Counter()  # name → sweeps started for it

    def run_study(self, spec: Any, url: str, key: str, **options: Any) -> StudyResult:
        should_stop, slots = options["should_stop"], options["slots"]
        name = self.names[key]
        with self.lock:
            self.starts[name] += 1
            self.active[key] = name
            self.most = max(self.most, len(self.active))
            self.seats[name] = slots
            done = self.done.setdefault(name, threading.Event())
        try:
            while not done.wait(0.05) and not should_stop():
                pass
            return StudyResult(key, [], stopped=not done.is_set(), wall_time=0.0)
        finally:
            with self.lock:
                del self.active[key]

    def running(self) -> set[str]:
        with self.lock:
            return set(self.active.values())

    def finish(self, name: str) -> None:
        with self.lock:
            self.done.setdefault(name, threading.Event()).set()


@pytest.fixture
def engine(database_url: str) -> sa.Engine:
    migrate(database_url)
    return get_engine(database_url, pool_size=20)


@pytest.fixture
def sweeps(monkeypatch: pytest.MonkeyPatch) -> Sweeps:
    fake = Sweeps()
    monkeypatch.setattr("worker.sweep.run_study", fake.run_study)
    return fake


@pytest.fixture
def scheduler(engine: sa.Engine, database_url: str) -> Iterator[Scheduler]:
    config = SchedulerConfig(
        storage_url=database_url,
        poll_seconds=0.1,
        lease_seconds=1.5,
        max_running_per_key=1,
        max_running_studies=2,
        scheduler_id="one",
    )
    scheduler = Scheduler(engine, config)
    yield scheduler
    scheduler.stop()


def status(engine: sa.Engine, study_id: str) -> tuple[str, int, str | None]:
    with session_scope(engine) as session:
        study = session.get(StudyRecord, study_id)
        assert study is not None
        return study.status, study.attempts, study.claimed_by


def test_both_limits_hold_and_each_study_stops_alone(
    engine: sa.Engine, scheduler: Scheduler, sweeps: Sweeps
) -> None:
    with session_scope(engine) as session:
        a, b, c = (create_key(session, name).id for name in "abc")
        ids = {
            name: queue.submit(session, SPEC, name=name, task="t", api_key_id=owner)[0].id
            for name, owner in [("a1", a), ("a2", a), ("b1", b), ("c1", c)]
        }
    sweeps.names = {study_id: name for name, study_id in ids.items()}
    scheduler.start_in_thread()

    # a2 waits for its key (one running per key), c1 for a free place (two at once).
    wait_for(lambda: sweeps.running() == {"a1", "b1"}, 60, "a1 and b1 to run", 0.05)
    assert status(engine, ids["a2"])[0] == status(engine, ids["c1"])[0] == "queued"
    assert sweeps.seats["a1"] is not sweeps.seats["b1"]  # each study its own trial seat

    sweeps.finish("b1")  # b1 ends: c1 takes its place, a2 still waits for a1
    wait_for(lambda: sweeps.running() == {"a1", "c1"}, 60, "c1 to take b1's place", 0.05)
    wait_for(lambda: status(engine, ids["b1"])[0] == "completed", 60, "b1 recorded", 0.05)
    assert status(engine, ids["a2"])[0] == "queued"

    with session_scope(engine) as session:  # cancel a1: only a1 stops, and a2 may start
        study = session.get(StudyRecord, ids["a1"])
        assert study is not None
        queue.request_cancel(session, study)
    wait_for(lambda: sweeps.running() == {"a2", "c1"}, 60, "a2 to replace a1", 0.05)
    assert status(engine, ids["a1"])[0] == "cancelled"

    with session_scope(engine) as session:  # another scheduler took c1 over: c1 alone stops
        session.execute(
            sa.update(StudyRecord).where(StudyRecord.id == ids["c1"]).values(claimed_by="two")
        )
    wait_for(lambda: sweeps.running() == {"a2"}, 60, "c1 to stop on its lost lease", 0.05)
    assert status(engine, ids["c1"])[:1] == ("running",)  # left to its new owner

    scheduler.stop()  # a2 is given back for the next claim, not finished
    assert sweeps.running() == set() and scheduler.running == []
    state, attempts, _ = status(engine, ids["a2"])
    assert (state, attempts) == ("running", 1)
    assert sweeps.most == 2
    assert [status(engine, ids[n])[1] for n in ("a1", "b1", "c1")] == [1, 1, 1]
    assert scheduler.gate.seats == 0  # every study's seat was closed
    resumed = queue.claim_next(engine, "three", SchedulerConfig("x").lease)
    assert resumed is not None and resumed.id == ids["a2"] and resumed.attempts == 2


def test_run_once_still_drives_one_study_in_the_callers_thread(
    engine: sa.Engine, scheduler: Scheduler, sweeps: Sweeps
) -> None:
    with session_scope(engine) as session:
        study_id = queue.submit(session, SPEC, name="only", task="t")[0].id
    sweeps.names = {study_id: "only"}
    sweeps.finish("only")
    assert scheduler.run_once()
    assert status(engine, study_id)[:2] == (StudyStatus.COMPLETED.value, 1)
    assert not scheduler.run_once()  # nothing else waits


@pytest.mark.parametrize("taken_over", [True, False], ids=["lease-lost", "still-owned"])
def test_an_error_after_another_scheduler_took_the_study_over_is_not_a_failure(
    engine: sa.Engine,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    taken_over: bool,
) -> None:
    """A driver that finds its trials closed by another's resume raises `TakenOverError`, possibly
    before its heartbeat has seen the lease go. The study is the new owner's: the old one logs
    a lost lease and writes nothing. The same error while the study is still its own (a fault)
    fails the study. The takeover is written, not waited for, so the lease is long: a short one
    could run out between two renewals on a loaded machine, a loss this test does not cause."""
    scheduler = Scheduler(engine, SchedulerConfig(storage_url=database_url, scheduler_id="one"))
    with session_scope(engine) as session:
        study_id = queue.submit(session, SPEC, name="s", task="t")[0].id

    def sweep_that_loses_its_trials(*args: Any, **options: Any) -> StudyResult:
        if taken_over:  # what a second scheduler's claim does once the lease ran out
            with session_scope(engine) as session:
                session.execute(
                    sa.update(StudyRecord)
                    .where(StudyRecord.id == study_id)
                    .values(claimed_by="two", attempts=StudyRecord.attempts + 1)
                )
        raise TakenOverError(f"study {study_id}: another driver closed a trial")

    monkeypatch.setattr("worker.sweep.run_study", sweep_that_loses_its_trials)
    try:
        with caplog.at_level(logging.WARNING, logger="service.scheduler"):
            assert scheduler.run_once()
    finally:
        scheduler.stop()
    failed_logs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if taken_over:
        assert status(engine, study_id) == ("running", 2, "two")  # the new owner's, untouched
        assert scheduler.leases.losses == 1
        assert not failed_logs
        assert any("lease lost" in r.getMessage() for r in caplog.records)
    else:
        assert status(engine, study_id)[:2] == (StudyStatus.FAILED.value, 1)
        assert scheduler.leases.losses == 0
        assert failed_logs


def test_a_study_whose_renewals_fail_is_not_claimed_again_by_its_own_scheduler(
    engine: sa.Engine, scheduler: Scheduler, sweeps: Sweeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database outage longer than the lease stops the renewals while the sweep goes on;
    when the database answers again the lease has run out. The scheduler's own polling must
    not claim the study a second time: two drivers of one study close each other's trials."""
    with session_scope(engine) as session:
        study_id = queue.submit(session, SPEC, name="s", task="t")[0].id
    sweeps.names = {study_id: "s"}

    def renewal_fails(*args: Any, **kwargs: Any) -> tuple[bool, bool]:
        raise sa.exc.OperationalError("UPDATE ratebench_studies", {}, Exception("outage"))

    claims: list[float] = []
    real_claim = queue.claim_next

    def counted_claim(*args: Any, **kwargs: Any) -> Any:
        claims.append(time.monotonic())
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(queue, "renew_lease", renewal_fails)
    monkeypatch.setattr(queue, "claim_next", counted_claim)
    scheduler.start_in_thread()
    wait_for(lambda: sweeps.running() == {"s"}, 60, "the study to run", 0.05)
    expired = time.monotonic() + scheduler.config.lease_seconds
    wait_for(lambda: sum(t > expired + 0.5 for t in claims) >= 3, 60,
             "three claims after the lease ran out", 0.05)  # fmt: skip
    assert sweeps.starts["s"] == 1
    state, attempts, owner = status(engine, study_id)
    assert (state, attempts, owner) == ("running", 1, "one")
    sweeps.finish("s")
    wait_for(lambda: status(engine, study_id)[0] == "completed", 60, "the study recorded", 0.05)


def test_max_running_studies_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_running_studies"):
        SchedulerConfig(storage_url="x", max_running_studies=0)
