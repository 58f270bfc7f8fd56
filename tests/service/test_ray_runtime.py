"""Who joins Ray: an API without the scheduler never does, and a command that would join a
token-protected cluster without a token stops with one line before contacting anything."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main
from service.config import Settings, get_settings
from tests.service.helpers import tiny_spec
from worker import cluster

# A routable address that answers nothing: a connection attempt would hang, not fail.
UNREACHABLE = "10.255.255.1:6379"


def test_an_api_without_the_scheduler_never_joins_ray(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str | None] = []
    monkeypatch.setattr(cluster, "connect", lambda address, **_: calls.append(address))
    was_initialized = ray.is_initialized()  # the session's runtime may be up already
    settings = Settings(database_url=sqlite_url, run_scheduler=False, ray_address=UNREACHABLE)
    started = time.monotonic()
    with TestClient(create_app(settings)) as client:
        response = client.get("/api/v1/health")
    assert time.monotonic() - started < 30  # a connection attempt would wait far longer
    assert calls == []
    assert ray.is_initialized() == was_initialized
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert body["ray"]["state"] == "disabled"  # not used by this process


@pytest.fixture
def token_mode_without_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """RAY_AUTH_MODE=token, no token anywhere Ray looks, a cluster address and a database."""
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RATEBENCH_RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_ADDRESS", UNREACHABLE)
    monkeypatch.setenv("RATEBENCH_DATABASE_URL", f"sqlite:///{tmp_path / 'ratebench.db'}")
    monkeypatch.setenv("RATEBENCH_RUN_SCHEDULER", "true")
    monkeypatch.setattr("service.logs.configure_logging", lambda *_, **__: None)
    get_settings.cache_clear()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec("no-token", trials=1)))
    yield {"spec": str(spec)}
    get_settings.cache_clear()


@pytest.mark.parametrize("command", ["scheduler", "serve", "run"])
def test_a_missing_ray_token_is_one_line_from_each_command(
    command: str, token_mode_without_token: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, token_mode_without_token["spec"]] if command == "run" else [command]
    started = time.monotonic()
    code = main(argv)
    err = capsys.readouterr().err
    assert time.monotonic() - started < 30  # refused before any connection attempt
    assert code == 2, err
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line.startswith(f"ratebench {command}: error: RAY_AUTH_MODE=token but no Ray token")
    assert "RAY_AUTH_TOKEN" in line
    assert "Traceback" not in err
