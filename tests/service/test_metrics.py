"""`GET /metrics` on real databases: request counts by route template, the queue and the trials
as the database holds them, the scheduler's lease counters, a scrape while the database is
gone, and counts that stay exact under concurrent requests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service import queue
from service.app import create_app
from service.config import Settings
from service.db import session_scope
from service.models import StudyRecord
from service.scheduler import Scheduler, SchedulerConfig, StudyDriver
from tests.service.helpers import wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient) -> Samples:
    """Every sample of a /metrics scrape, by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def routes(samples: Samples) -> set[str]:
    return {dict(labels)["route"] for name, labels in samples if name.startswith("ratebench_http")}


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """An API whose reads need a key, without Ray and without a scheduler."""
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, anonymous_reads=False)
    with TestClient(create_app(settings, start_ray=False)) as client:
        yield client


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    for study_id in ("aaaa", "bbbb", "cccc"):  # 401: reads need a key here
        client.get(f"/api/v1/studies/{study_id}")
    client.get("/api/v1/health")
    client.get("/no/such/page")
    client.get("/metrics")  # open without a key, and not counted itself
    samples = scrape(client)
    requests = "ratebench_http_requests_total"
    template = "/api/v1/studies/{study_id}"
    assert value(samples, requests, method="GET", route=template, status="401") == 3
    assert value(samples, requests, method="GET", route="/api/v1/health", status="200") == 1
    assert value(samples, requests, method="GET", route="unmatched", status="404") == 1
    assert value(
        samples, "ratebench_http_request_duration_seconds_count", method="GET", route=template
    ) == 3  # fmt: skip
    assert routes(samples) == {template, "/api/v1/health", "unmatched"}  # no ids, no /metrics


def test_queue_depth_running_trials_and_outcomes_come_from_the_database(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=database_url, data_dir=tmp_path)
    app = create_app(settings, start_ray=False)
    with TestClient(app) as client:
        engine: sa.Engine = app.state.engine
        with session_scope(engine) as session:
            ids = [
                queue.submit(session, {"name": "s"}, name=f"s{i}", task="t")[0].id for i in range(4)
            ]

        def arm(complete: int, pruned: int, diverged: int, failed: int, running: int) -> Any:
            return dict(complete=complete, pruned=pruned, diverged=diverged, failed=failed,
                        running=running)  # fmt: skip

        rows = {  # two running studies, one finished (its trials still count), one queued
            ids[0]: ("running", {"arms": {"a": arm(3, 1, 0, 0, 2), "b": arm(1, 0, 2, 1, 1)}}),
            ids[1]: ("running", {"arms": {"a": arm(0, 0, 0, 0, 4)}}),
            ids[2]: ("completed", {"arms": {"a": arm(5, 2, 1, 0, 0)}}),
        }
        with session_scope(engine) as session:
            for study_id, (status, progress) in rows.items():
                session.execute(
                    sa.update(StudyRecord)
                    .where(StudyRecord.id == study_id)
                    .values(status=status, progress=progress)
                )
        samples = scrape(client)
    assert value(samples, "ratebench_database_up") == 1
    assert value(samples, "ratebench_studies", status="queued") == 1
    assert value(samples, "ratebench_studies", status="running") == 2
    assert value(samples, "ratebench_studies", status="completed") == 1
    assert value(samples, "ratebench_studies", status="failed") == 0
    assert value(samples, "ratebench_running_trials") == 2 + 1 + 4
    outcomes = {"complete": 9, "pruned": 3, "diverged": 3, "failed": 1}
    for outcome, n in outcomes.items():
        assert value(samples, "ratebench_trials_total", outcome=outcome) == n, outcome
    # No scheduler runs in this process: its lease counters are absent, not zero.
    assert not any(name.startswith("ratebench_scheduler") for name, _ in samples)


def test_the_scheduler_counts_lease_renewals_and_losses(sqlite_url: str, tmp_path: Path) -> None:
    app = create_app(Settings(database_url=sqlite_url, data_dir=tmp_path), start_ray=False)
    with TestClient(app) as client:
        engine: sa.Engine = app.state.engine
        config = SchedulerConfig(storage_url=sqlite_url, lease_seconds=1.0, scheduler_id="a")
        scheduler = Scheduler(engine, config)
        app.state.scheduler = scheduler  # as the lifespan does when it starts one
        with session_scope(engine) as session:
            queue.submit(session, {"name": "s"}, name="s", task="t")
        study = queue.claim_next(engine, "a", config.lease)
        assert study is not None
        with StudyDriver(engine, study.id, config, scheduler.leases) as driver:
            wait_for(lambda: scheduler.leases.renewals >= 2, 60, "two renewals", 0.05)
            with session_scope(engine) as session:  # another scheduler took the study over
                session.execute(sa.update(StudyRecord).values(claimed_by="b"))
            wait_for(lambda: driver.lost, 60, "the heartbeat to see the lease lost", 0.05)
        samples = scrape(client)
    assert (value(samples, "ratebench_scheduler_lease_renewals_total") or 0) >= 2
    assert value(samples, "ratebench_scheduler_leases_lost_total") == 1


def test_a_scrape_answers_while_the_database_cannot_be_opened(tmp_path: Path) -> None:
    path = tmp_path / "ratebench.db"
    app = create_app(Settings(database_url=f"sqlite:///{path}", data_dir=tmp_path), start_ray=False)
    with TestClient(app) as client:
        assert value(scrape(client), "ratebench_database_up") == 1
        app.state.engine.dispose()  # close the pooled connections, then take the file away
        shutil.move(path, tmp_path / "moved.db")
        path.mkdir()  # a directory where the database was: SQLite cannot open it
        samples = scrape(client)
        assert client.get("/api/v1/health").status_code == 503  # /health agrees
    assert value(samples, "ratebench_database_up") == 0
    assert value(samples, "ratebench_studies", status="queued") is None


def test_counts_stay_exact_under_concurrent_requests_and_scrapes(client: TestClient) -> None:
    n = 60

    def call(i: int) -> int:
        path = "/metrics" if i % 5 == 0 else f"/api/v1/studies/s{i}"
        return client.get(path).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(call, range(n)))
    scrapes = sum(1 for i in range(n) if i % 5 == 0)
    assert statuses.count(200) == scrapes and statuses.count(401) == n - scrapes
    samples = scrape(client)
    assert value(samples, "ratebench_http_requests_total", method="GET",
                 route="/api/v1/studies/{study_id}", status="401") == n - scrapes  # fmt: skip
