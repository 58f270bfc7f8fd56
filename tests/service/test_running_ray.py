"""Finding a Ray runtime already running on this machine (`service.running_ray`): a service's
record counts while its process lives and its address answers, `ray start`'s file likewise,
and anything else means a new local runtime. A listening socket on loopback stands in for a
runtime's GCS: only whether something answers is looked at."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import running_ray
from worker import cluster


@pytest.fixture
def listening() -> Iterator[str]:
    """`127.0.0.1:port` of a socket that accepts connections."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def closed_port() -> str:
    """`127.0.0.1:port` where nothing listens (a runtime that is gone)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(autouse=True)
def no_ray_start_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Ray's temporary folder, empty: a `ray start` on the test machine is not seen."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    return tmp_path / "tmp" / "ray"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_service_record_is_found_while_its_process_lives_and_its_address_answers(
    tmp_path: Path, listening: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # as Ray sets it for a new local runtime
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    running_ray.record(tmp_path, listening)
    stored = json.loads((tmp_path / running_ray.RUNTIME_FILE).read_text())
    assert set(stored) == {"address", "pid", "token_auth", "token_path"}  # never the token
    found = running_ray.find(tmp_path)
    owner = f"ratebench serve (pid {os.getpid()})"
    assert found == running_ray.RunningRay(listening, owner, True, str(tmp_path / "token"))
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert running_ray.address_to_join(tmp_path) == listening
    assert os.environ["RAY_AUTH_MODE"] == "token"  # a joining process sends its token
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token")


def test_a_record_of_a_dead_service_or_a_silent_address_is_ignored(
    tmp_path: Path, listening: str, closed_port: str
) -> None:
    record = tmp_path / running_ray.RUNTIME_FILE
    record.write_text(json.dumps({"address": listening, "pid": _dead_pid()}))
    assert running_ray.find(tmp_path) is None  # killed outright: its file stayed behind
    running_ray.record(tmp_path, closed_port)
    assert running_ray.find(tmp_path) is None  # alive, but its runtime is gone
    assert running_ray.address_to_join(tmp_path) is None  # a new local runtime


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"address": 5, "pid": "x"}'])
def test_a_damaged_record_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / running_ray.RUNTIME_FILE).write_text(content)
    assert running_ray.find(tmp_path) is None


def test_a_ray_start_cluster_is_found_from_rays_own_file(
    tmp_path: Path, listening: str, closed_port: str, no_ray_start_file: Path
) -> None:
    no_ray_start_file.mkdir(parents=True)
    (no_ray_start_file / "ray_current_cluster").write_text(closed_port + "\n")
    assert running_ray.find(tmp_path) is None  # stopped without `ray stop`
    (no_ray_start_file / "ray_current_cluster").write_text(listening + "\n")
    found = running_ray.find(tmp_path)
    assert found is not None and (found.address, found.owner) == (listening, "ray start")
    assert found.token_auth == cluster.has_token()  # Ray's rule for a cluster it found


def test_a_service_forgets_only_its_own_record(tmp_path: Path, listening: str) -> None:
    record = tmp_path / running_ray.RUNTIME_FILE
    other = {"address": listening, "pid": os.getppid()}  # a newer service's
    record.write_text(json.dumps(other))
    running_ray.forget(tmp_path)
    assert json.loads(record.read_text()) == other
    running_ray.record(tmp_path, listening)
    running_ray.forget(tmp_path)
    assert not record.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial file left either


def test_local_means_a_new_runtime_whatever_ray_address_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.is_local(None)
    assert cluster.is_local(cluster.LOCAL)
    assert not cluster.is_local("127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not cluster.is_local(None)  # joins RAY_ADDRESS's cluster
    assert cluster.is_local(cluster.LOCAL)
