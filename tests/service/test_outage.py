"""A database outage in the middle of a study, for real: a private PostgreSQL server that the
test starts on its own port, stops (`pg_ctl stop -m immediate`: a crash) and restarts.

While it is down every endpoint answers 503 with `Retry-After`; the scheduler waits for it
instead of failing the study, and the study completes once it is back.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.auth import create_key
from service.db import get_engine, migrate, session_scope
from tests.service.helpers import (
    ServiceProcess,
    free_port,
    get,
    tiny_spec,
    wait_for,
    wait_until_finished,
)


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster in a temporary folder, run as the `postgres` user when we are root
    (initdb refuses root)."""

    data: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, _tool("pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=60)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        self._pg_ctl("-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def crash(self) -> None:
        self._pg_ctl("-m", "immediate", "-w", "stop")


def _tool(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name) or ""


def _no_postgres(reason: str) -> None:
    if os.environ.get("RATEBENCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (RATEBENCH_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not _tool("initdb") or not _tool("pg_ctl"):
        _no_postgres("initdb/pg_ctl not found (Debian: apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="ratebench-pg-"))  # not under root's 0700 tmp dirs
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            _no_postgres("running as root and runuser is missing: initdb refuses root")
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PrivatePostgres(folder, free_port(), as_user)
    try:
        subprocess.run([*as_user, _tool("initdb"), "-D", str(folder), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True,
                       timeout=120)  # fmt: skip
        server.start()
        yield server
    finally:
        subprocess.run([*as_user, _tool("pg_ctl"), "-D", str(folder), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


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
