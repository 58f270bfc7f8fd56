"""The README's run command, for real: `ratebench serve` as a process, answering `/health`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.running_ray import RUNTIME_FILE
from tests.service.helpers import (
    ServiceProcess,
    cli_env,
    embedded_service,
    ratebench,
    tiny_spec,
    wait_until_finished,
)
from worker.results import load_trials
from worker.spec import StudySpec


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
    # `ratebench run` from the same folder joins the service's runtime instead of starting Ray.
    assert service.proc is not None
    run_file = service.data_dir / "run.json"
    run_file.write_text(json.dumps(tiny_spec("joined", trials=1)))
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "run", str(run_file), "--study-key", "joined"],
        capture_output=True, text=True, env=service.env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    first = run.stderr.splitlines()[0]
    assert first.startswith(f"joining the Ray runtime of ratebench serve (pid {service.proc.pid})")
    assert _nodes(service, "joined") == _nodes(service, study_id)  # the service's one node
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit by SIGTERM.
    code = service.stop()
    assert code in (0, -signal.SIGTERM), service.log()
    assert "Application shutdown complete" in service.log()
    assert not (service.data_dir / RUNTIME_FILE).exists()  # no runtime to join any more


def _nodes(service: ServiceProcess, study_key: str) -> set[str]:
    """The Ray nodes the study's trials ran on."""
    url = f"sqlite:///{service.data_dir / 'ratebench.db'}"
    spec = StudySpec.model_validate(tiny_spec("any"))
    trials = load_trials(url, study_key, spec)
    assert trials
    return {t.user_attrs["node"]["ray_node_id"] for t in trials}
