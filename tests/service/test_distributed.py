"""The distributed shape on the real PostgreSQL: an API that only serves
(RATEBENCH_RUN_SCHEDULER=false) and two separate `ratebench scheduler` processes sharing the
database, both joined to one Ray runtime (the test session's, through RATEBENCH_RAY_ADDRESS, as a
deployment points them at its cluster). Every study runs exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import (
    ServiceProcess,
    embedded_service,
    get,
    ratebench,
    tiny_spec,
    wait_until_finished,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def api_on_postgres(
    postgres_url: str, tmp_path: Path, ray_address: str
) -> Iterator[ServiceProcess]:
    """The API alone; the schedulers it spawns join the session's Ray runtime, as schedulers of
    a real deployment share one cluster."""
    for service in embedded_service(tmp_path / "data", ray_address):
        service.env["RATEBENCH_DATABASE_URL"] = postgres_url
        service.env["RATEBENCH_RUN_SCHEDULER"] = "false"
        # The default lease: a lease of seconds (the helpers' 4 s, for the tests that kill a
        # scheduler) runs out on a busy machine, and a second claim would be no fault.
        service.env["RATEBENCH_LEASE_SECONDS"] = "30"
        yield service


def test_two_scheduler_processes_share_the_queue(
    api_on_postgres: ServiceProcess, tmp_path: Path
) -> None:
    service = api_on_postgres
    health = service.start()
    assert health["database"]["backend"] == "postgresql"
    assert health["ray"]["state"] == "disabled"  # this API only serves
    key = ratebench("keys", "create", "--name", "dist", env=service.env).strip()
    ids = [
        httpx.post(
            f"{service.url}/api/v1/studies",
            json=tiny_spec(f"dist-{i}", trials=2),
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ).json()["id"]
        for i in range(3)
    ]
    schedulers = []
    for i in range(2):
        log = (tmp_path / f"scheduler-{i}.log").open("w")
        schedulers.append(
            subprocess.Popen(
                [sys.executable, "-m", "service.cli", "scheduler"],
                env=service.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
    try:
        studies = [wait_until_finished(service, study_id, timeout=400) for study_id in ids]
    finally:
        for proc in schedulers:
            proc.send_signal(signal.SIGTERM)
        for proc in schedulers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("scheduler-*.log"))
    assert [s["status"] for s in studies] == ["completed"] * 3, logs
    assert [s["attempts"] for s in studies] == [1, 1, 1]  # each study claimed once
    for study_id in ids:
        board = get(service, f"/studies/{study_id}/leaderboard")
        assert {row["arm"] for row in board["arms"]} == {"sgd", "adam"}
