"""Joining Ray: the one place where this project calls `ray.init`.

A local runtime (no address) binds to the loopback interface, 127.0.0.1, so that an embedded
service or `ratebench run` never opens Ray's ports on the machine's network interfaces. A cluster
(an address) is joined from the interface Ray finds for that address, unless
`RATEBENCH_NODE_IP` names the address this node should advertise (a machine with several
interfaces).

Start-up timeout: on a loaded machine a local runtime can take longer than Ray's default 30 s to
register its raylet ("The current node timed out during startup"), and its worker processes
longer than 60 s to register. `RATEBENCH_RAY_START_TIMEOUT_S` raises both limits. Ray reads them
from its own settings `RAY_raylet_start_wait_time_s` and `RAY_worker_register_timeout_seconds`,
environment variables read by each Ray process when its core library loads: the raylet, the GCS
and the workers started later inherit them from this process, and this process's own wait (the
driver's) sees them when they are exported before `ray` is first imported, which importing this
module does (`export_start_timeout`). A value already set in those variables is kept.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["LOOPBACK", "START_TIMEOUT_ENV", "connect", "export_start_timeout", "start_timeout_s"]

LOOPBACK = "127.0.0.1"
START_TIMEOUT_ENV = "RATEBENCH_RAY_START_TIMEOUT_S"
# Ray's own settings that bound its start-up: the raylet's registration with the GCS (the
# driver's wait) and a worker process's registration with its raylet.
_RAY_START_SETTINGS = ("RAY_raylet_start_wait_time_s", "RAY_worker_register_timeout_seconds")


def start_timeout_s() -> int | None:
    """Seconds allowed for Ray's start-up from `RATEBENCH_RAY_START_TIMEOUT_S`; None: Ray's own."""
    raw = os.environ.get(START_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = int(raw)
    except ValueError:
        raise ValueError(f"{START_TIMEOUT_ENV}: expected whole seconds, got {raw!r}") from None
    if seconds < 1:
        raise ValueError(f"{START_TIMEOUT_ENV}: must be at least 1 second, got {seconds}")
    return seconds


def export_start_timeout() -> None:
    """Export `RATEBENCH_RAY_START_TIMEOUT_S` as Ray's start-up settings (see the module doc)."""
    seconds = start_timeout_s()
    if seconds is None:
        return
    for name in _RAY_START_SETTINGS:
        os.environ.setdefault(name, str(seconds))


def connect(address: str | None, **options: Any) -> None:
    """`ray.init` for a local runtime (`address` None) or a cluster; a no-op when connected."""
    export_start_timeout()
    import ray

    if ray.is_initialized():
        return
    node_ip = LOOPBACK if address is None else os.environ.get("RATEBENCH_NODE_IP")
    if node_ip:
        options["_node_ip_address"] = node_ip
    ray.init(address=address, include_dashboard=False, configure_logging=False, **options)


export_start_timeout()
