"""A database outage in the middle of a study, for real: a private PostgreSQL server that the
test starts on its own port, stops (`pg_ctl stop -m immediate`: a crash) and restarts.

While it is down every endpoint answers 503 with `Retry-After`; the scheduler waits for it
instead of failing the study, and the study completes once it is back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from scripts.private_postgres import PrivatePostgres, unavailable_reason
from service.auth import create_key
from service.db import get_engine, migrate, session_scope
from tests.service.helpers import (
    ServiceProcess,
    get,
    tiny_spec,
    wait_for,
    wait_until_finished,
)


def _no_postgres(reason: str) -> None:
    if os.environ.get("RATEBENCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (RATEBENCH_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    reason = unavailable_reason()
    if reason is not None:
        _no_postgres(reason)
    server = PrivatePostgres.create()
    try:
        yield server
    finally:
        server.remove()


ENDPOINTS = ("/studies", "/studies/{id}", "/studies/{id}/trials", "/studies/{id}/leaderboard",
             "/leaderboard?task=mnist1d-mlp", "/health")  # fmt: skip


@pytest.mark.slow
@pytest.mark.postgres
def test_a_study_survives_a_database_outage_and_the_api_answers_503(
    private_postgres: PrivatePostgres, service: ServiceProcess
) -> None:
    url = private_postgres.url
    migrate(url)
    with session_scope(get_engine(url)) as session:
        key = create_key(session, "outage").key
    get_engine(url).dispose()  # the test holds no connection through the outage
    service.env["RATEBENCH_DATABASE_URL"] = url
    service.start()
    auth = {"Authorization": f"Bearer {key}"}
    spec = tiny_spec("outage", trials=6, epochs=2)
    posted = httpx.post(f"{service.url}/api/v1/studies", json=spec, headers=auth, timeout=30)
    assert posted.status_code == 202, posted.text
    study_id = posted.json()["id"]

    trials = f"/studies/{study_id}/trials?limit=200"
    wait_for(lambda: any(t["state"] == "COMPLETE" for t in get(service, trials)["items"]),
             120, "the study's first finished trial", interval=0.2)  # fmt: skip
    private_postgres.crash()

    for path in ENDPOINTS:
        down = httpx.get(f"{service.url}/api/v1{path.format(id=study_id)}", timeout=30)
        assert down.status_code == 503, (path, down.status_code, down.text)
        assert int(down.headers["Retry-After"]) > 0, path
    refused = httpx.post(f"{service.url}/api/v1/studies", json=spec, headers=auth, timeout=30)
    assert refused.status_code == 503, refused.text
    assert "database is unavailable" in refused.json()["detail"]
    log = service.log_path
    # generous: on a busy machine the driver may be between two reports for a while
    wait_for(lambda: "database unavailable during the sweep" in log.read_text(), 180,
             "the scheduler to meet the outage")  # fmt: skip

    private_postgres.start()
    study = wait_until_finished(service, study_id, timeout=240)
    assert study["status"] == "completed", (study["error"], service.log())
    assert study["error"] is None
    board = get(service, f"/studies/{study_id}/leaderboard")
    assert {arm["arm"] for arm in board["arms"]} == {"sgd", "adam"}
