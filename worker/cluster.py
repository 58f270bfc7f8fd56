"""Joining Ray: the one place where this project calls `ray.init`.

A local runtime (no address) binds to the loopback interface, 127.0.0.1, so that an embedded
service or `ratebench run` never opens Ray's ports on the machine's network interfaces. A cluster
(an address) is joined from the interface Ray finds for that address, unless
`RATEBENCH_NODE_IP` names the address this node should advertise (a machine with several
interfaces).

Loopback needs more than `_node_ip_address="127.0.0.1"`: Ray replaces a loopback node address by
the machine's routable one (`resolve_ip_for_localhost`), and its GCS and raylet then listen on
every interface. Ray keeps a node on loopback only where it thinks clusters are unsupported,
which its setting `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` declares; `connect` sets it (in the
environment, for the Ray processes it starts, and in Ray's already-loaded constants, for this
one) whenever the node address is loopback: then the GCS and raylet bind 127.0.0.1 alone.

Start-up timeout: on a loaded machine a local runtime can take longer than Ray's default 30 s to
register its raylet ("The current node timed out during startup"), and its worker processes
longer than 60 s to register, and the raylet gives up on its agents after 30 s.
`RATEBENCH_RAY_START_TIMEOUT_S` raises all three limits. Ray reads them from its own settings
`RAY_raylet_start_wait_time_s`, `RAY_worker_register_timeout_seconds` and
`RAY_agent_register_timeout_ms`,
environment variables read by each Ray process when its core library loads: the raylet, the GCS
and the workers started later inherit them from this process, and this process's own wait (the
driver's) sees them when they are exported before `ray` is first imported, which importing this
module does (`export_start_timeout`). A value already set in those variables is kept. One wait
escapes them: `ray.init` itself gives a local node a fixed 30 s to register (Ray 2.60's
`Node.__init__`), and fails with "The current node timed out during startup"; so does a node
whose raylet gave up on its agents (the raylet waits a fixed 15 s for the dashboard agent's
ports, and a starved agent can take longer to import). When that happens and
`RATEBENCH_RAY_START_TIMEOUT_S` is set, `connect` shuts the half-started node down and starts it
again: while that timeout has not passed since `connect` began, and in any case up to
`_START_ATTEMPTS` attempts in all (on a starved machine one failed attempt can outlast the
timeout).

Worker priority: Ray lowers its worker processes' priority (`nice` 15, its setting
`RAY_worker_niceness`) so that its own daemons stay responsive. On a machine that also runs other
work, that makes every trial yield to everything else: with two busy processes on a 2-core
machine, each trial got about 5% of a core. A trial is the work ratebench was asked to do, so a
local runtime started here keeps its workers at the normal priority (`nice` 0) unless
`RAY_worker_niceness` is already set. The nodes of a cluster started with `ray start` take the
setting from their own environment (docker-compose.yml sets it).

Token authentication: a cluster started with `RAY_AUTH_MODE=token` admits only processes that
hold its token. Joining one with that mode set but no token anywhere Ray looks
(`RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` names, `~/.ray/auth_token`) fails with Ray's
multi-line advice; `connect` refuses it first with `ClusterConfigError`, one line that the
commands print as it is. A local runtime needs no check: Ray writes a token for it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = [
    "LOCAL",
    "LOOPBACK",
    "START_TIMEOUT_ENV",
    "ClusterConfigError",
    "ClusterUnreachableError",
    "check_auth",
    "check_reachable",
    "cluster_to_join",
    "connect",
    "export_start_timeout",
    "has_token",
    "is_local",
    "local_node_alive",
    "node_alive",
    "reconnect",
    "start_timeout_s",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOCAL = "local"  # an address that asks for a local runtime of this process, as in `ray.init`
_START_ATTEMPTS = 3  # starts of a local node always allowed when a start-up timeout is set
START_TIMEOUT_ENV = "RATEBENCH_RAY_START_TIMEOUT_S"
# Ray's own settings that bound its start-up, with their units: the raylet's registration with
# the GCS (the driver's wait), a worker process's registration with its raylet, and the raylet's
# wait for its agents (dashboard and runtime-env agents start even without the dashboard UI).
_RAY_START_SETTINGS = {
    "RAY_raylet_start_wait_time_s": 1,
    "RAY_worker_register_timeout_seconds": 1,
    "RAY_agent_register_timeout_ms": 1000,
}


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
    for name, per_second in _RAY_START_SETTINGS.items():
        os.environ.setdefault(name, str(seconds * per_second))


class ClusterConfigError(ValueError):
    """A Ray setting that makes joining the cluster impossible; the message is one line."""


def has_token() -> bool:
    """Whether a token is where Ray looks for one, in Ray's order."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def is_local(address: str | None) -> bool:
    """Whether `connect(address)` starts a local runtime of this process (joins no cluster)."""
    return cluster_to_join(address) is None


def cluster_to_join(address: str | None) -> str | None:
    """The cluster that `connect(address)` joins: `address`, else `RAY_ADDRESS`; None for a
    local runtime of this process (no address anywhere, or `LOCAL`)."""
    if address == LOCAL:
        return None
    return address or os.environ.get("RAY_ADDRESS") or None


def check_auth(address: str | None) -> None:
    """Raise ClusterConfigError when joining the cluster at `address` (None: `RAY_ADDRESS`, or
    a local runtime when that is unset too) needs a token that this process lacks."""
    if cluster_to_join(address) is None:
        return
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token" and not has_token():
        raise ClusterConfigError(
            "RAY_AUTH_MODE=token but no Ray token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
            "to the token the cluster was started with"
        )


_LOOPBACK_NAMES = {LOOPBACK, "localhost", "::1"}
_RAY_WORKER_NICENESS = "RAY_worker_niceness"
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _keep_ray_on_loopback() -> None:
    """Stop Ray from trading a loopback node address for a routable one (see the module doc)."""
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


class ClusterUnreachableError(ConnectionError):
    """Nothing answers at the cluster's address; the message is one line."""


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise ClusterUnreachableError when nothing accepts a connection at `address`
    (`host:port` of a head's GCS): Ray's own client would retry that for many minutes before
    it gives up. Other forms (a `ray://` client address, `auto`) are left to Ray."""
    if not address or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return  # Ray refuses it at once, with its own words
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnreachableError(
            f"nothing answers at {address} ({exc.strerror or exc}): is the Ray cluster up "
            "(`ray status`, `ratebench cluster status`) and is this its head's address?"
        ) from None


def connect(address: str | None, **options: Any) -> None:
    """`ray.init` for a local runtime (`address` None without `RAY_ADDRESS`, or `LOCAL`) or a
    cluster (`address`, else `RAY_ADDRESS`); a no-op when connected. A local runtime is always
    a new one: `ray.init()` alone would join a cluster that `ray start` runs on this machine.
    Raises ClusterConfigError, before contacting anything, for a missing token, and
    ClusterUnreachableError when nothing listens at the address."""
    check_auth(address)
    export_start_timeout()
    import ray

    if ray.is_initialized():
        return
    joins = cluster_to_join(address)
    check_reachable(joins)
    if joins is None:
        os.environ.setdefault(_RAY_WORKER_NICENESS, "0")  # inherited by the raylet's workers
        address = LOCAL  # never the cluster `ray start` left a file of: `ray.init()` joins it
        node_ip: str | None = LOOPBACK
    elif joins.rpartition(":")[0].strip("[]") in _LOOPBACK_NAMES:
        node_ip = LOOPBACK  # a cluster on loopback (a service's runtime) answers only there
    else:
        node_ip = os.environ.get("RATEBENCH_NODE_IP")
    if node_ip:
        options["_node_ip_address"] = node_ip
    if node_ip in _LOOPBACK_NAMES:
        _keep_ray_on_loopback()
    limit = start_timeout_s()
    deadline = time.monotonic() + (limit or 0)
    for attempt in itertools.count(1):
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False, **options)
            return
        except Exception as exc:  # Ray raises a bare Exception for a node that is slow to start
            slow = "timed out during startup" in str(exc)
            again = limit is not None and (attempt < _START_ATTEMPTS or time.monotonic() < deadline)
            if not slow or joins is not None or not again:
                raise
            log.warning("Ray's local node did not register in time (a busy machine); starting "
                        "it again (attempt %d)", attempt + 1)  # fmt: skip
            ray.shutdown()


def reconnect(address: str | None, **options: Any) -> None:
    """Leave a runtime that died (its raylet or agent killed, an out-of-memory kill) and join
    again: a new local runtime (`address` None), or the cluster at `address` once this
    machine's node is back. Like `ray.init`, call it on the main thread; every ObjectRef and
    actor handle of the old runtime is void afterwards."""
    import ray

    with contextlib.suppress(Exception):  # a dead runtime's shutdown may complain; it is gone
        ray.shutdown()
    connect(address, **options)


def node_alive(node_id: str) -> bool:
    """Whether the Ray node `node_id` is alive, by the GCS's account; False when the GCS
    cannot be asked (a runtime that is gone)."""
    import ray

    try:
        nodes = ray.nodes()
    except Exception:  # the GCS is unreachable: nothing of that runtime can be trusted
        return False
    return any(node.get("NodeID") == node_id and node.get("Alive", False) for node in nodes)


def local_node_alive() -> bool:
    """Whether this process is connected to Ray and the node it runs on (its raylet) is alive.
    A raylet killed outright (or with its dashboard agent, which it shares its fate with) is
    marked dead by the GCS after its missed health checks, about 15 s on Ray 2.60."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        return False
    return node_alive(node_id)


export_start_timeout()
