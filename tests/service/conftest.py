"""Fixtures for the service tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.helpers import (
    FinishedStudy,
    ServiceProcess,
    cli_env,
    embedded_service,
    ratebench,
    tiny_spec,
    wait_until_finished,
)


@pytest.fixture
def service(tmp_path: Path, ray_address: str) -> Iterator[ServiceProcess]:
    """A service on a fresh SQLite file (not started yet) whose scheduler joins the session's
    Ray runtime (`tests/service/test_serve.py` tests the embedded one)."""
    yield from embedded_service(tmp_path / "data", ray_address)


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Iterator[FinishedStudy]:
    """One service with one small study submitted through the CLI and run to completion (on
    the session's Ray runtime; `test_serve.py` runs one on a service's embedded runtime)."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    for service in embedded_service(tmp_path / "data", ray_address):
        service.start()
        key = ratebench("keys", "create", "--name", "e2e", env=service.env).strip()
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps(tiny_spec("e2e")))
        env = cli_env(service, key)
        study_id = ratebench("submit", str(spec_file), env=env).strip()
        study = wait_until_finished(service, study_id)
        assert study["status"] == "completed", study["error"] or service.log()
        yield FinishedStudy(service, study_id, env, study)
