"""What the benchmarks that talk to a running service share: a free loopback port, a server
process started and stopped around a measurement, a throw-away PostgreSQL database, and
percentiles in milliseconds.

Scripts in bench/ run as `python bench/NAME.py`, so this module is imported as `_service`.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import sqlalchemy as sa

__all__ = ["HOST", "free_port", "ms", "postgres_database", "server"]

HOST = "127.0.0.1"  # benchmarks send traffic to loopback only


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def server(
    command: Callable[[int], list[str]],
    log_path: Path,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 120,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `command(port)` on a free port until its health endpoint answers 200; yield its base
    URL and process, and stop it (SIGTERM, then SIGKILL after a minute) afterwards."""
    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen(command(port), env=env, stdout=log, stderr=log)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit(f"the service did not start; see {log_path}")
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def ms(values: list[float], q: float) -> float:
    """The `q` quantile (0..1, nearest rank) of `values` (seconds), in milliseconds."""
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


@contextmanager
def postgres_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A fresh database, named `prefix` and a random suffix, on the PostgreSQL server of
    `admin_url`; yields its URL and drops it afterwards."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
