"""Helpers for end-to-end tests: the real `ratebench` CLI and a real `ratebench serve` process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from worker import cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def ratebench(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run the `ratebench` CLI as a user would; returns its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"ratebench {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


@dataclass
class ServiceProcess:
    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"serve-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def start(self, timeout: float | None = None) -> dict[str, Any]:
        """Start and wait until /health answers ok (Ray connected); returns the health body.

        The default deadline covers a Ray runtime of the service's own (`ray_start_deadline_s`):
        on a loaded machine a start is slow, not failed; an idle one answers in seconds."""
        timeout = ray_start_deadline_s() if timeout is None else timeout
        self.starts += 1
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                body: dict[str, Any] = httpx.get(f"{self.url}/api/v1/health", timeout=2).json()
                if body.get("status") == "ok":
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"service did not become healthy:\n{self.log()}")

    def fail_if_exited(self, error: Exception, wait_s: float = 5.0) -> None:
        """After `error` reaching the service: fail with its exit status and its log's end when
        the process ended (it may take a moment after it reset a connection), so that a service
        that died under a test says how."""
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=wait_s)
        if self.proc.returncode is not None:
            raise AssertionError(f"the service exited with {self.proc.returncode} ({error}); "
                                 f"the end of its log:\n{self.log()}") from error  # fmt: skip

    def stop(self) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing runs on the way out."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def ray_start_deadline_s() -> float:
    """How long to wait for a process that starts a Ray runtime of its own: `cluster.connect`
    starts Ray again after Ray's fixed node waits run out, for at least three attempts and while
    the start-up timeout the tests set (tests/conftest.py) lasts."""
    return 3.0 * (cluster.start_timeout_s() or 60) + 60


def embedded_service(data_dir: Path, ray_address: str | None = None) -> Iterator[ServiceProcess]:
    """A not-yet-started service on a fresh SQLite file in `data_dir`, killed afterwards.

    With `ray_address` (the session's runtime, `tests/conftest.py`) its scheduler joins that
    runtime on loopback; without, it starts a local runtime of its own, as `ratebench serve`
    does for a user."""
    env = {
        **os.environ,
        "RATEBENCH_DATA_DIR": str(data_dir),
        "RATEBENCH_LEASE_SECONDS": "4",
        "RATEBENCH_ANONYMOUS_READS": "true",
    }
    for name in ("RATEBENCH_DATABASE_URL", "RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS"):
        env.pop(name, None)
    if ray_address is not None:
        env.update(RATEBENCH_RAY_ADDRESS=ray_address, RATEBENCH_NODE_IP="127.0.0.1")
    data_dir.mkdir(parents=True)
    process = ServiceProcess(data_dir, env)
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.kill()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll `predicate()` until it returns a truthy value (no sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def tiny_spec(name: str, trials: int = 3, epochs: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "task": "mnist1d-mlp",
        "data": {"batch_size": 100, "n_train": 1000},
        "model": {"width": 32, "depth": 1},
        "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "adam"}],
        "search_space": {"lr": {"low": 1e-3, "high": 1.0, "log": True}},
        "budget": {"trials_per_arm": trials, "epochs": epochs, "final_seeds": 2},
        "sampler": "random",
        "pruner": "none",
        "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 2},
    }


def cli_env(service: ServiceProcess, key: str | None = None) -> dict[str, str]:
    env = {**service.env, "RATEBENCH_URL": service.url}
    if key:
        env["RATEBENCH_API_KEY"] = key
    return env


def get(service: ServiceProcess, path: str) -> Any:
    try:
        response = httpx.get(f"{service.url}/api/v1{path}", timeout=30)
    except httpx.TransportError as exc:
        service.fail_if_exited(exc)
        raise
    response.raise_for_status()
    return response.json()


def wait_until_finished(service: ServiceProcess, study_id: str, timeout: float = 300) -> Any:
    """The study's JSON once it is completed, failed or cancelled."""

    def finished() -> Any:
        study = get(service, f"/studies/{study_id}")
        return study if study["status"] in {"completed", "failed", "cancelled"} else None

    return wait_for(finished, timeout, f"study {study_id} to finish")


@dataclass
class FinishedStudy:
    service: ServiceProcess
    study_id: str
    env: dict[str, str]
    study: dict[str, Any]
