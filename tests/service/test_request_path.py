"""The request path under load, on a real `ratebench serve` and on both databases.

Every request's database work (the API-key lookup included) runs in one thread with its own
session and is committed before the answer: 200 clients at once get no 5xx and no timeout, a
study read right after its 202 is always found, and timestamps carry an offset everywhere.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.config import Settings
from service.db import get_engine, migrate, session_scope
from tests.service.helpers import ServiceProcess, embedded_service, tiny_spec

CLIENTS = 200
REQUEST_TIMEOUT_S = 15.0  # the old request path deadlocked for its 30 s pool timeout


def _api_only(service: ServiceProcess, database_url: str) -> ServiceProcess:
    """`service` on `database_url`, without the scheduler and Ray: submitted studies queue."""
    service.env["RATEBENCH_DATABASE_URL"] = database_url
    service.env["RATEBENCH_RUN_SCHEDULER"] = "false"
    service.env["RATEBENCH_MAX_QUEUED_PER_KEY"] = "100000"  # load, not per-key limits
    service.env["RATEBENCH_RATE_LIMIT_PER_MINUTE"] = "0"  # one key for all 200 clients
    return service


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[tuple[ServiceProcess, str]]:
    """A running API-only service on `database_url`, and a key for it."""
    migrate(database_url)
    with session_scope(get_engine(database_url)) as session:
        key = create_key(session, "load").key
    for service in embedded_service(tmp_path / "data"):
        _api_only(service, database_url).start()
        yield service, key


def _client_session(url: str, key: str, index: int, start: threading.Barrier) -> list[str]:
    """One client: waits for all the others, then submits and reads. Returns its problems."""
    problems: list[str] = []
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"{url}/api/v1", timeout=REQUEST_TIMEOUT_S) as client:
        start.wait()
        try:
            if index % 2 == 0:  # a writer: submit, then read its study at once
                posted = client.post("/studies", json=tiny_spec(f"c{index}"), headers=auth)
                if posted.status_code != 202:
                    return [f"submit {posted.status_code}: {posted.text[:200]}"]
                got = client.get(url + posted.headers["Location"])
                if got.status_code != 200:
                    problems.append(f"read after write {got.status_code}: {got.text[:200]}")
                cancelled = client.post(f"/studies/{posted.json()['id']}/cancel", headers=auth)
                if cancelled.status_code != 200:
                    problems.append(f"cancel {cancelled.status_code}: {cancelled.text[:200]}")
            else:  # a reader
                for path in ("/studies?limit=20", "/leaderboard/profile", "/health", "/schemes"):
                    got = client.get(path)
                    if got.status_code >= 500:
                        problems.append(f"GET {path} {got.status_code}: {got.text[:200]}")
        except httpx.HTTPError as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
    return problems


@pytest.mark.slow
def test_200_concurrent_clients_get_no_5xx_and_read_their_writes(
    api: tuple[ServiceProcess, str],
) -> None:
    service, key = api
    start = threading.Barrier(CLIENTS)
    results: list[list[str]] = [[] for _ in range(CLIENTS)]

    def run(index: int) -> None:
        results[index] = _client_session(service.url, key, index, start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * REQUEST_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "clients still waiting"
    problems = Counter(p.split(":")[0] for r in results for p in r)
    assert not problems, (
        f"{problems}\nfirst: {next(p for r in results for p in r)}\n{service.log()}"
    )
    studies = httpx.get(f"{service.url}/api/v1/studies?limit=1", timeout=10).json()
    assert studies["total"] == CLIENTS // 2


def _aware(value: str) -> bool:
    return datetime.fromisoformat(value).tzinfo is not None


def test_timestamps_carry_an_offset_on_both_databases(database_url: str, tmp_path: Any) -> None:
    """SQLite has no timezone type; the API must still say which time it means."""
    app = create_app(Settings(database_url=database_url, data_dir=tmp_path), start_ray=False)
    with TestClient(app) as client:
        with session_scope(app.state.engine) as session:
            key = create_key(session, "tz").key
        auth = {"Authorization": f"Bearer {key}"}
        study_id = client.post("/api/v1/studies", json=tiny_spec("tz"), headers=auth).json()["id"]
        cancelled = client.post(f"/api/v1/studies/{study_id}/cancel", headers=auth).json()
        assert _aware(cancelled["created_at"]) and _aware(cancelled["finished_at"]), cancelled
        listed = client.get("/api/v1/studies").json()["items"][0]
        assert _aware(listed["created_at"]), listed
        # Optuna's own tables store naive local times; the API gives them an offset too.
        optuna.create_study(storage=database_url, study_name=f"{study_id}/sgd").optimize(
            lambda trial: trial.suggest_float("lr", 1e-3, 1.0), n_trials=1
        )
        trial = client.get(f"/api/v1/studies/{study_id}/trials").json()["items"][0]
        assert _aware(trial["datetime_start"]) and _aware(trial["datetime_complete"]), trial


_STARTUP_PROBE = """
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.config import Settings
warm = ("torch._dynamo", "worker.spec_checks")
app = create_app(Settings(database_url=sys.argv[1], data_dir=sys.argv[2]), start_ray=False)
before = [name for name in warm if name in sys.modules]
with TestClient(app):
    after = [name for name in warm if name in sys.modules]
print(before, after)
"""


@pytest.mark.slow
def test_the_submit_checks_are_imported_before_the_service_serves(tmp_path: Path) -> None:
    """A service's first submit used to import the spec checks and PyTorch's optimizer machinery
    (1.6 s idle), with every concurrent submit waiting on those imports; on a loaded machine
    200 clients then timed out. The lifespan does it before serving (`warm_up_checks`)."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'probe.db'}"
    out = subprocess.run(
        [sys.executable, "-c", _STARTUP_PROBE, url, str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "[] ['torch._dynamo', 'worker.spec_checks']", out
