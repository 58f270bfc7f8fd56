"""Who joins Ray: an API without the scheduler never does, and a command that would join a
token-protected cluster without a token stops with one line before contacting anything; and
no other thread calls into Ray while the runtime restarts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main
from service.config import Settings, get_settings
from service.ray_runtime import RayRuntime
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


def test_a_restart_waits_for_the_calls_into_ray_under_way_and_lets_none_start(
    ray_runtime: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray aborts the whole process when a call meets a runtime another thread shuts down, so a
    restart first stops new calls (`ask` answers None), then waits for the one under way. The
    node's death and Ray's shutdown and start are stood in for: the session's runtime, which
    the other tests use, must live on."""
    runtime = RayRuntime(None)
    runtime.start()  # joins the session's runtime, already up in this process
    assert runtime.connected
    inside, release = threading.Event(), threading.Event()

    def slow_question() -> str:
        inside.set()
        release.wait(60)
        return "answered"

    answers: list[str | None] = []
    asking = threading.Thread(target=lambda: answers.append(runtime.ask(slow_question)))
    asking.start()
    assert inside.wait(30)
    seen: dict[str, object] = {}

    def restart_in_place(address: str | None, **options: object) -> None:
        seen["calls under way"] = runtime._users

    monkeypatch.setattr(cluster, "local_node_alive", lambda: False)
    monkeypatch.setattr(cluster, "reconnect", restart_in_place)
    generation = runtime.generation
    restarting = threading.Thread(target=runtime.recover, args=(generation,))
    restarting.start()
    deadline = time.monotonic() + 30
    while runtime.status().state != "restarting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runtime.status().state == "restarting"
    called: list[bool] = []
    assert runtime.ask(lambda: called.append(True)) is None and not called
    restarting.join(timeout=0.5)
    assert restarting.is_alive(), "the restart did not wait for the call under way"
    release.set()
    restarting.join(timeout=60)
    asking.join(timeout=60)
    assert answers == ["answered"]
    assert seen == {"calls under way": 0}
    monkeypatch.undo()  # Ray's own answers again
    assert runtime.generation == generation + 1 and runtime.connected
    assert runtime.status().restarts == 1
    assert runtime.ask(lambda: "asked") == "asked"
