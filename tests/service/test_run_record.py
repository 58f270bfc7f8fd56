"""`ratebench run` records its study like a submitted one: the API, leaderboards, pages and
`ratebench plot` see it; it records the environment; schedulers leave it alone; the study page
shows elapsed time and an estimate of what is left."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient

from service import queue
from service.app import create_app
from service.auth import create_key
from service.cli import main
from service.config import Settings
from service.db import _alembic_config, get_engine, migrate, session_scope
from service.models import StudyRecord, StudyStatus, utcnow
from service.web.timing import study_timing
from tests.service.test_run_command import TINY as RUN_SPEC

TINY: dict[str, Any] = {**RUN_SPEC, "name": "recorded tiny"}
LEASE = timedelta(seconds=30)


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, anonymous_reads=True)
    with TestClient(create_app(settings, start_ray=False)) as client:
        yield client


def _trials(client: TestClient, study_id: str) -> set[tuple[Any, ...]]:
    body = client.get(f"/api/v1/studies/{study_id}/trials").json()
    return {(t["arm"], t["role"], t["number"], t["datetime_start"]) for t in body["items"]}


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_is_a_study_the_api_pages_and_plot_see_and_a_rerun_is_served_from_it(
    ray_runtime: None,
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY))
    sqlite_url = sqlite_url.replace("ratebench.db", "data/ratebench.db")  # a folder not made yet
    assert main(["run", str(spec), "--database-url", sqlite_url, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    key = first["study_key"]
    assert [a["rank"] for a in first["arms"]] == [1, 2]
    assert {a["arm"] for a in first["arms"]} == {"sgd", "adam"}
    assert all(a["n_trials"] == 2 and a["n_seeds"] == 1 for a in first["arms"])

    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, anonymous_reads=True)
    with TestClient(create_app(settings, start_ray=False)) as client:
        listed = client.get("/api/v1/studies").json()["items"]
        assert [(s["id"], s["source"], s["status"]) for s in listed] == [(key, "cli", "completed")]
        assert "hostname" not in listed[0]["environment"]  # where it ran: for admins only
        with session_scope(client.app.state.engine) as session:  # type: ignore[attr-defined]
            admin = {"Authorization": f"Bearer {create_key(session, 'ops', admin=True).key}"}
        study = client.get(f"/api/v1/studies/{key}", headers=admin).json()
        assert study["progress"]["trials_done"] == study["progress"]["trials_total"] == 6
        env = study["environment"]
        assert env["python"] and env["torch"] and env["cpu_count"] > 0
        assert env["nodes"], "the trials' machines"
        assert {n["hostname"] for n in env["nodes"]} == {env["hostname"]}  # one local machine
        board = client.get(f"/api/v1/studies/{key}/leaderboard").json()
        assert {a["arm"] for a in board["arms"]} == {"sgd", "adam"}
        page = client.get(f"/studies/{key}").text
        assert 'id="environment"' in page and "6 of 6 trials done" in page
        assert "ratebench run" in page
        first_trials = _trials(client, key)
        assert len(first_trials) == 6

        plots = tmp_path / "plots"
        assert main(["plot", key, "--database-url", sqlite_url, "--out", str(plots),
                     "--kind", "sensitivity", "--format", "svg"]) == 0  # fmt: skip
        svg = plots / "recorded tiny-sensitivity.svg"
        assert capsys.readouterr().out.strip() == str(svg)
        assert svg.read_bytes().startswith(b"<?xml")

        assert main(["run", str(spec), "--database-url", sqlite_url, "--json"]) == 0
        again_out = json.loads(capsys.readouterr().out)
        assert again_out["study_key"] == key
        assert again_out["arms"] == first["arms"]  # nothing re-ran
        again = client.get(f"/api/v1/studies/{key}").json()
        # A completed study's re-run is served from the database: no new attempt is started.
        assert (again["status"], again["attempts"]) == ("completed", 1)
        assert [s["id"] for s in client.get("/api/v1/studies").json()["items"]] == [key]
        assert _trials(client, key) == first_trials  # the same trials: nothing ran again

    assert main(["run", str(spec), "--database-url", sqlite_url]) == 0  # the table
    table = capsys.readouterr().out
    assert "sgd" in table and "adam" in table and "val_accuracy" in table


def _spec() -> dict[str, Any]:
    from worker.spec import StudySpec

    return StudySpec.model_validate(TINY).model_dump(mode="json")


def test_a_run_study_is_never_claimed_by_a_scheduler_nor_run_twice(database_url: str) -> None:
    migrate(database_url)
    engine = get_engine(database_url)
    spec = _spec()
    study = queue.start_local(engine, "tiny-key", "cli:a", LEASE, spec, name="t", task="digits")
    assert (study.source, study.status, study.attempts) == ("cli", "running", 1)
    assert study.environment is not None and study.environment["python"]
    with pytest.raises(queue.StudyBusyError, match="running in another process"):
        queue.start_local(engine, "tiny-key", "cli:b", LEASE, spec, name="t", task="digits")
    other = {**spec, "name": "other"}
    with pytest.raises(queue.StudyBusyError, match="different spec"):
        queue.start_local(engine, "tiny-key", "cli:b", LEASE, other, name="t", task="digits")

    with engine.begin() as conn:  # the run died: its lease expired
        conn.execute(sa.update(StudyRecord).values(lease_expires_at=utcnow() - LEASE))
    assert queue.claim_next(engine, "scheduler", LEASE) is None  # not a scheduler's to resume
    resumed = queue.start_local(engine, "tiny-key", "cli:b", LEASE, spec, name="t", task="x")
    assert (resumed.id, resumed.claimed_by, resumed.attempts) == ("tiny-key", "cli:b", 2)

    with session_scope(engine) as session:
        submitted, _ = queue.submit(session, spec, name="api", task="digits")
    with pytest.raises(queue.StudyBusyError, match="submitted to the API"):
        queue.start_local(engine, submitted.id, "cli:c", LEASE, spec, name="t", task="digits")
    claimed = queue.claim_next(engine, "scheduler", LEASE)
    assert claimed is not None and claimed.id == submitted.id
    assert claimed.environment is not None and claimed.environment["cpu_count"] > 0
    with session_scope(engine) as session:
        assert queue.finish(session, claimed.id, "scheduler", StudyStatus.COMPLETED)
    with session_scope(engine) as session:
        done = session.get(StudyRecord, claimed.id)
        assert done is not None and done.environment is not None
        assert done.environment["nodes"] == []  # no trial ran
        assert done.environment["python"] == claimed.environment["python"]


def test_migration_0004_keeps_rows_and_allows_long_ids(database_url: str) -> None:
    config = _alembic_config(database_url)
    command.upgrade(config, "0003")
    engine = get_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ratebench_studies (id, name, task, spec, status, cancel_requested,"
                " created_at, attempts) VALUES ('a' || :pad, 'old', 'digits-mlp', '{}',"
                " 'completed', false, CURRENT_TIMESTAMP, 1)"
            ),
            {"pad": "0" * 31},
        )
    command.upgrade(config, "head")
    long_id = "a-spec-name-" + "x" * 80
    with session_scope(engine) as session:
        old = session.get(StudyRecord, "a" + "0" * 31)
        assert old is not None and (old.source, old.environment) == ("api", None)
        session.add(StudyRecord(id=long_id, name="n", task="t", spec={}, source="cli"))
    command.downgrade(config, "0003")  # the cli rows go: their ids may not fit any more
    with engine.connect() as conn:
        ids = conn.execute(sa.text("SELECT id FROM ratebench_studies")).scalars().all()
    assert ids == ["a" + "0" * 31]


def _running(started: Any, done: int, total: int) -> StudyRecord:
    return StudyRecord(
        id="x", name="n", task="t", spec={}, status="running", started_at=started,
        progress={"trials_done": done, "trials_total": total},
    )  # fmt: skip


def test_the_estimate_is_time_per_finished_trial_times_the_trials_left() -> None:
    now = utcnow()
    timing = study_timing(_running(now - timedelta(seconds=100), 2, 6), now)
    assert timing is not None
    assert (timing.elapsed_s, timing.done, timing.total, timing.left_s) == (100, 2, 6, 200)
    none_done = study_timing(_running(now - timedelta(seconds=100), 0, 6), now)
    assert none_done is not None and none_done.left_s is None  # nothing to estimate from
    assert study_timing(StudyRecord(id="q", name="n", task="t", spec={})) is None  # queued


def test_the_study_page_shows_elapsed_time_and_what_is_left(client: TestClient) -> None:
    engine: sa.Engine = client.app.state.engine  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        study = _running(utcnow() - timedelta(seconds=100), 2, 6)
        session.add(study)
    page = client.get("/studies/x").text
    assert "2 of 6 trials done" in page
    assert 'id="elapsed">1 min 4' in page  # 100 s, give or take the request's time
    assert 'id="eta">3 min 2' in page  # 200 s, give or take
