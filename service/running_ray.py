"""Finding a Ray runtime that already runs on this machine, so that `ratebench run` joins it
instead of paying Ray's start (about 10 s on a 2-core machine, the larger part of a small sweep).

Two kinds are found, in this order:

- a `ratebench serve` whose local runtime it started itself: the service records that
  runtime's address, with its own process id, in `<data_dir>/ray-runtime.json`
  (`record`, on every start and restart; `forget`, when it stops). A `ratebench run` with the
  same settings (run from the same folder, as README's commands are) reads it;
- a runtime started with `ray start --head` and Ray's default temporary folder: Ray writes
  its address to `ray/ray_current_cluster` in the system's temporary folder (`RAY_TMPDIR`,
  else `TMPDIR`, else /tmp), which is where `ray.init` itself would look.

A record counts only while its process lives (for a service's) and something accepts a
connection at its address: a service killed outright leaves its file behind, and a `ray start`
cluster stopped without `ray stop` leaves Ray's. `--ray-address local` (or
`RATEBENCH_RAY_ADDRESS=local`) starts a private runtime without looking; an address given
in any other way is used as it is, without looking either.

Trials of a joined runtime run in its worker processes, which the runtime's own raylet
started: with its environment (a service's settings) and its installed code. That is the
point of joining one from the same checkout, and a reason not to join one from elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from service.processes import alive
from worker import cluster

__all__ = ["RUNTIME_FILE", "RunningRay", "address_to_join", "find", "forget", "record"]

RUNTIME_FILE = "ray-runtime.json"
_CONNECT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class RunningRay:
    """A runtime to join: its GCS address, who runs it (for the user's first line), and
    whether it admits only holders of its token (`token_path`: where the token is, when not
    where Ray looks by default)."""

    address: str
    owner: str
    token_auth: bool = False
    token_path: str | None = None

    def join_settings(self) -> None:
        """Set this process's Ray authentication as the runtime needs, unless already set.
        Ray sends its token to a cluster joined by address only in token mode: it turns that
        mode on by itself for a cluster it found, never for one given by address, as this
        one is."""
        if self.token_auth:
            os.environ.setdefault(_AUTH_MODE, "token")
            if self.token_path is not None:
                os.environ.setdefault(_TOKEN_PATH, self.token_path)


_AUTH_MODE, _TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"


def record(data_dir: Path, address: str) -> None:
    """Say that this process (a service) runs the local runtime at `address`, with its token
    mode and where its token is (never the token itself); written whole, then renamed, so a
    reader never sees half a file. Call it once connected: a new local runtime turns token
    mode on in this process's environment unless `RAY_AUTH_MODE` said otherwise."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / RUNTIME_FILE
    data = {
        "address": address,
        "pid": os.getpid(),
        "token_auth": os.environ.get(_AUTH_MODE, "").strip().lower() == "token",
        "token_path": os.environ.get(_TOKEN_PATH) or None,
    }
    partial = path.with_name(f".{RUNTIME_FILE}.{os.getpid()}")
    partial.write_text(json.dumps(data) + "\n")
    partial.replace(path)


def forget(data_dir: Path) -> None:
    """Remove the record, when it is this process's own (a newer service's is left alone)."""
    path = data_dir / RUNTIME_FILE
    if _read(path).get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def find(data_dir: Path) -> RunningRay | None:
    """The runtime a `ratebench run` here should join, or None: start a private one."""
    service = _read(data_dir / RUNTIME_FILE)
    address, pid = service.get("address"), service.get("pid")
    if isinstance(address, str) and isinstance(pid, int) and alive(pid) and _answers(address):
        token_path = service.get("token_path")
        return RunningRay(
            address,
            f"ratebench serve (pid {pid})",
            token_auth=service.get("token_auth") is True,
            token_path=token_path if isinstance(token_path, str) else None,
        )
    started = _ray_start_address()
    if started is not None and _answers(started):  # Ray's own rule for a cluster it found:
        return RunningRay(started, "ray start", token_auth=cluster.has_token())
    return None


def address_to_join(data_dir: Path) -> str | None:
    """`find`'s address, else None (a new local runtime): for a run whose runtime died, since
    a service that restarted Ray records its new runtime's address."""
    running = find(data_dir)
    if running is None:
        return None
    running.join_settings()
    return running.address


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ray_start_address() -> str | None:
    """The address `ray start` wrote in Ray's default temporary folder, if any."""
    base = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    )
    path = Path(base or "/tmp") / "ray" / "ray_current_cluster"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _answers(address: str) -> bool:
    """Whether something accepts a connection at `host:port`."""
    if not address.rpartition(":")[2].isdigit():
        return False
    try:
        cluster.check_reachable(address, _CONNECT_TIMEOUT_S)
    except cluster.ClusterUnreachableError:
        return False
    return True
