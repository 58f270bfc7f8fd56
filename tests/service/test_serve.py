"""The README's run command, for real: `ratebench serve` as a process, answering `/health`."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.helpers import (
    ServiceProcess,
    cli_env,
    embedded_service,
    ratebench,
    tiny_spec,
    wait_until_finished,
)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[ServiceProcess]:
    """`ratebench serve` with nothing set: its own local Ray runtime, a SQLite file."""
    yield from embedded_service(tmp_path / "data")


def test_cli_help_lists_the_commands() -> None:
    out = ratebench("--help")
    for command in ("serve", "scheduler", "run", "submit", "status", "leaderboard", "keys"):
        assert command in out


@pytest.mark.slow
@pytest.mark.timeout(900)  # a runtime of its own: Ray's start may be retried on a loaded machine
def test_serve_starts_with_embedded_defaults_and_stops_on_sigterm(
    embedded: ServiceProcess,
) -> None:
    service = embedded
    health = service.start()
    assert health["ray"]["state"] == "connected"
    assert health["ray"]["resources"]["CPU"] > 0
    assert health["ray"]["address"] is None  # a runtime of its own, not a cluster's
    assert health["database"]["backend"] == "sqlite"
    assert (service.data_dir / "ratebench.db").exists()
    # The README's flow on that runtime: a key, a study submitted with the CLI, run to the end.
    key = ratebench("keys", "create", "--name", "readme", env=service.env).strip()
    spec_file = service.data_dir / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec("embedded", trials=2)))
    study_id = ratebench("submit", str(spec_file), env=cli_env(service, key)).strip()
    study = wait_until_finished(service, study_id)
    assert study["status"] == "completed", study["error"] or service.log()
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit by SIGTERM.
    code = service.stop()
    assert code in (0, -signal.SIGTERM), service.log()
    assert "Application shutdown complete" in service.log()
