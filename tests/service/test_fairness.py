"""Keys cannot starve each other, on real databases: claims go in fair order under a backlog (a
key's queued studies never keep another key's first study waiting for more than one study's
slot), each key's requests are rate-limited (429 with `Retry-After`), and so is its queue."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import queue
from service.auth import create_key
from service.db import get_engine, migrate, session_scope
from service.models import StudyStatus
from service.rate_limit import RateLimiter
from service.scheduler import Scheduler, SchedulerConfig
from tests.service.helpers import wait_for
from tests.service.test_scheduler_concurrency import SPEC, Sweeps
from tests.service.test_security import Api, make_api

LEASE = timedelta(seconds=30)


@pytest.fixture
def engine(database_url: str) -> sa.Engine:
    migrate(database_url)
    return get_engine(database_url, pool_size=20)


def _submit(engine: sa.Engine, owners: list[tuple[str, int]]) -> dict[str, str]:
    with session_scope(engine) as session:
        return {
            name: queue.submit(session, SPEC, name=name, task="t", api_key_id=owner)[0].id
            for name, owner in owners
        }


def test_claims_go_to_the_key_with_fewest_running_studies_first(engine: sa.Engine) -> None:
    with session_scope(engine) as session:
        alice, bob = create_key(session, "alice").id, create_key(session, "bob").id
    ids = _submit(engine, [(f"a{i}", alice) for i in range(5)] + [("b0", bob), ("b1", bob)])
    names = {study_id: name for name, study_id in ids.items()}

    def claim() -> str | None:
        study = queue.claim_next(engine, "s", LEASE, max_running_per_key=4)
        return names[study.id] if study is not None else None

    # a0 is the oldest; then bob's first although alice queued four more before it; then
    # they alternate, oldest first within a key, while each key runs as many as the other
    assert [claim() for _ in range(4)] == ["a0", "b0", "a1", "b1"]
    with session_scope(engine) as session:  # bob's studies end: alice's backlog goes on
        for name in ("b0", "b1"):
            assert queue.finish(session, ids[name], "s", StudyStatus.COMPLETED)
    assert [claim() for _ in range(3)] == ["a2", "a3", None]  # a4 waits: 4 running per key


def test_a_second_keys_first_study_starts_within_one_studys_slot(
    engine: sa.Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's case: one key queues many long studies on a scheduler of two slots and is
    allowed to run four at once; a second key submits one study after them. When the first of
    the running studies ends, the second key's study takes its slot, not the backlog's next.
    The sweep is replaced by one that runs until told to finish (as in
    tests/service/test_scheduler_concurrency.py); claims, leases and records are real."""
    sweeps = Sweeps()
    monkeypatch.setattr("worker.sweep.run_study", sweeps.run_study)
    with session_scope(engine) as session:
        alice, bob = create_key(session, "alice").id, create_key(session, "bob").id
    ids = _submit(engine, [(f"a{i}", alice) for i in range(20)] + [("b0", bob)])
    sweeps.names = {study_id: name for name, study_id in ids.items()}
    config = SchedulerConfig(
        storage_url=database_url,
        poll_seconds=0.1,
        lease_seconds=5,
        max_running_per_key=4,
        max_running_studies=2,
        scheduler_id="fair",
    )
    scheduler = Scheduler(engine, config)
    scheduler.start_in_thread()
    try:
        wait_for(lambda: len(sweeps.running()) == 2, 60, "two studies to run", 0.05)
        first = sweeps.running()
        assert "a0" in first  # the oldest; the other slot already went to bob
        if "b0" not in first:  # bob's study was submitted after alice's twenty
            sweeps.finish("a0")
            wait_for(lambda: "b0" in sweeps.running(), 60, "b0 to take the first free slot", 0.05)
        assert sum(sweeps.starts[f"a{i}"] for i in range(20)) <= 2  # one slot's time at most
    finally:
        for name in ids:
            sweeps.finish(name)
        scheduler.stop()


@pytest.fixture
def limited(sqlite_url: str, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(sqlite_url, tmp_path, rate_limit_per_minute=60, rate_limit_burst=3)


def test_each_key_has_its_own_request_rate(limited: Api) -> None:
    api = limited
    for _ in range(3):
        assert api.client.get("/api/v1/studies", headers=api.headers("alice")).status_code == 200
    refused = api.client.get("/api/v1/studies", headers=api.headers("alice"))
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "1"  # one request a second
    assert "at most 60 a minute" in refused.json()["detail"]
    assert api.submit("alice").status_code == 429  # writes count too, and store nothing
    assert api.count() == 0
    # another key, and anonymous readers (by address), have their own
    assert api.submit("bob").status_code == 202
    for _ in range(3):
        assert api.client.get("/api/v1/studies").status_code == 200
    assert api.client.get("/api/v1/studies").status_code == 429
    assert api.client.get("/api/v1/health").status_code == 200  # probes are never limited


def test_a_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=120, burst=2, clock=lambda: now[0])
    assert [limiter.wait_s("key:1") for _ in range(3)] == [0.0, 0.0, 0.5]
    now[0] = 0.5  # one token back after half a second
    assert limiter.wait_s("key:1") == 0.0 and limiter.wait_s("key:1") == 0.5
    assert limiter.wait_s("key:2") == 0.0
    assert RateLimiter(per_minute=0, burst=1).wait_s("key:1") == 0.0  # 0: no limit


def test_the_queued_cap_says_when_to_retry(sqlite_url: str, tmp_path: Path) -> None:
    for api in make_api(sqlite_url, tmp_path, max_queued_per_key=1):
        assert api.submit("alice").status_code == 202
        refused = api.submit("alice")
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
