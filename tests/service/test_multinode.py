"""Two Ray nodes on one machine: a head and a second node started with `ray start`, each with
its own temp dir and ports, everything on 127.0.0.1, and a service whose scheduler drives them.

A study's trials run on both nodes and each records its node (`ray_node_id` tells apart the
two nodes that share this host and address), shown by the trials API and its CSV; SIGKILL of
the second node's raylet mid-study fails its running trial, which is retried on the head, and
the study completes with every planned trial finished. A trial that fits the cluster's total
CPUs (2) but no single node (1 each) is refused at submit with a 422.

Ray keeps a node on loopback only with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (see
`worker.cluster`), but with that setting `ray start --address` refuses to join a cluster at
all. The second node is therefore started with the setting on, through `ray`'s own command
line with `resolve_ip_for_localhost` made the identity: its `--node-ip-address=127.0.0.1` and
the head's 127.0.0.1 address are then kept, not traded for the machine's routable address.
Teardown kills only the processes these `ray start` commands spawned (never `ray stop`, which
stops every Ray of this user on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.helpers import (
    ServiceProcess,
    embedded_service,
    get,
    ratebench,
    tiny_spec,
    wait_for,
    wait_until_finished,
)

pytestmark = [pytest.mark.slow]

_RAY_CLI = (
    "import sys; from ray._private import services; "
    "services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)
# Ray's fixed default ports (the dashboard agent's 52365 among them) would collide between
# two nodes on one machine: every port gets a free one.
_PORTS = (
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
    "metrics-export-port", "node-manager-port", "object-manager-port",
)  # fmt: skip
_START_S = 240.0  # a loaded 2-core machine starts a service in tens of seconds, not minutes
_ATTEMPTS, _ATTEMPT_S = 3, 120.0  # starts of one Ray node, and the time each may take


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass
class RayNode:
    """One `ray start --block` process and the Ray processes it started."""

    name: str
    temp_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def up(self) -> bool:
        """`ray start` printed that the runtime started: the node registered with the GCS."""
        return "Ray runtime started." in self.log.read_text(errors="replace")

    def diagnosis(self) -> str:
        """Why the node is not up: `ray start`'s last line and the raylet's last log lines."""
        out = self.log.read_text(errors="replace").strip().splitlines()
        raylet = sorted(self.temp_dir.glob("session_*/logs/raylet.out"))
        tail = raylet[-1].read_text(errors="replace").splitlines()[-3:] if raylet else []
        exited = "running" if self.proc.poll() is None else f"exit {self.proc.returncode}"
        return f"{exited}; {out[-1] if out else ''}; raylet: {' | '.join(tail)[-600:]}"

    def processes(self) -> list[int]:
        """The node's processes: descendants of `ray start`, and any process whose command line
        names this node's temp dir (a Ray process whose `ray start` already exited)."""
        found = set(_descendants(self.proc.pid))
        marker = str(self.temp_dir)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and any(marker in arg for arg in _cmdline(int(entry.name))):
                found.add(int(entry.name))
        found.discard(os.getpid())
        return sorted(found)

    def raylet(self) -> tuple[int, str] | None:
        """The raylet's process id and its node id (hex) once it runs."""
        for pid in _descendants(self.proc.pid):
            args = _cmdline(pid)
            if args and args[0].endswith("raylet/raylet"):
                for arg in args:
                    if arg.startswith("--node_id="):
                        return pid, arg.partition("=")[2]
        return None

    def kill(self) -> None:
        """SIGKILL the node's processes: the `ray start` process, its group, and every other
        process of the node (Ray's worker processes sit in groups of their own)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@dataclass
class TwoNodes:
    root: Path
    env: dict[str, str]  # the token every process of this cluster needs
    address: str = ""  # the head's GCS, once it runs
    nodes: dict[str, RayNode] = field(default_factory=dict)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}:\n{n.log.read_text()[-1500:]}" for n in self.nodes.values())


def _launch(cluster: TwoNodes, name: str, *args: str, loopback_only: bool) -> RayNode:
    """One `ray start` with free ports and a temp dir of its own."""
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cluster.root))
    ports = _free_ports(len(_PORTS))
    log = temp_dir.with_suffix(".log")
    env = {**cluster.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if loopback_only else "1"}
    # Ahead of other work where allowed (as root; otherwise `nice` says so and runs it as it
    # is): each node's raylet must register within Ray's fixed 30 s, after its Python agents
    # have started, and next to two busy loops on a 2-core machine they did not, start after
    # start. A real node has its machine to itself; here the load is the other tests'.
    command = [
        "nice", "-n", "-5", sys.executable, "-c", _RAY_CLI, "start", "--block",
        "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"--{option}={port}" for option, port in zip(_PORTS, ports, strict=True)), *args,
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=out, start_new_session=True, cwd=cluster.root
        )
    node = RayNode(name, temp_dir, proc, log)
    cluster.nodes[name] = node
    return node


def _start(cluster: TwoNodes, name: str, *, head: bool) -> None:
    """Start a node and wait until `ray start` reports it up.

    `ray start` gives its node Ray's fixed 30 s to register with the GCS (not a setting in Ray
    2.60) and exits when a loaded machine takes longer; one such attempt took 209 s to give up
    next to two busy loops. A start that has not come up within `_ATTEMPT_S` is therefore
    stopped, and any failed start is made again on fresh ports, `_ATTEMPTS` times in all."""
    for attempt in range(1, _ATTEMPTS + 1):
        if head:
            gcs, dashboard, client = _free_ports(3)
            cluster.address = f"127.0.0.1:{gcs}"
            args = [
                "--head", f"--port={gcs}", "--include-dashboard=false",
                f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
            ]  # fmt: skip
        else:
            args = [f"--address={cluster.address}"]
        node = _launch(cluster, name, *args, loopback_only=head)
        deadline = time.monotonic() + _ATTEMPT_S
        while time.monotonic() < deadline and not node.up() and node.proc.poll() is None:
            time.sleep(0.5)
        if node.up() and node.proc.poll() is None:
            return
        why = f"{name}, attempt {attempt}: " + node.diagnosis()
        node.kill()
        print(why)
    raise AssertionError(
        f"Ray node {name} did not start in {_ATTEMPTS} attempts:\n{cluster.logs()}"
    )


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports: held open together, so that none is handed out twice (one at a
    time, a port closed may be the next one given)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def two_nodes() -> Iterator[TwoNodes]:
    # A short root: Ray's socket paths under it must stay within the 107 bytes of a Unix
    # socket name.
    root = Path(tempfile.mkdtemp(prefix="rb-ray-", dir="/tmp"))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # a dead node is declared dead in about 1.5 s instead of Ray's 15 s
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    for name in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS"):
        env.pop(name, None)
    cluster = TwoNodes(root, env)
    try:
        _start(cluster, "head", head=True)
        _start(cluster, "node2", head=False)
        yield cluster
    finally:
        for node in reversed(cluster.nodes.values()):
            node.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def service(two_nodes: TwoNodes, tmp_path: Path) -> Iterator[ServiceProcess]:
    """The API with its scheduler, a Ray driver connected to the head."""
    for process in embedded_service(tmp_path / "data", two_nodes.address):
        process.env["RAY_AUTH_MODE"] = "token"
        process.env["RAY_AUTH_TOKEN"] = two_nodes.env["RAY_AUTH_TOKEN"]
        yield process


def _trials(service: ServiceProcess, study_id: str) -> list[dict[str, Any]]:
    page = get(service, f"/studies/{study_id}/trials?limit=200")
    assert page["total"] == len(page["items"])
    items: list[dict[str, Any]] = page["items"]
    return items


def _node_id(trial: dict[str, Any]) -> str | None:
    node = trial["node"] or {}
    return node.get("ray_node_id")


@pytest.mark.timeout(2000)  # two `ray start`s and a service, each retried on a loaded machine
def test_trials_spread_over_two_nodes_and_survive_losing_one(
    two_nodes: TwoNodes, service: ServiceProcess
) -> None:
    started = time.monotonic()
    health = service.start()
    assert health["ray"]["state"] == "connected"
    wait_for(
        lambda: get(service, "/health")["ray"]["resources"].get("CPU") == 2.0,
        _START_S,
        "both Ray nodes to join",
    )
    head_raylet = wait_for(two_nodes.nodes["head"].raylet, 30, "the head's raylet")
    node2_raylet = wait_for(two_nodes.nodes["node2"].raylet, 30, "the second node's raylet")
    head_id, (node2_pid, node2_id) = head_raylet[1], node2_raylet
    assert head_id != node2_id
    key = ratebench("keys", "create", "--name", "multinode", env=service.env).strip()
    headers = {"Authorization": f"Bearer {key}"}

    # 2 CPUs in the cluster, 1 per node: a 2-CPU trial could never be placed
    too_big = tiny_spec("too-big")
    too_big["resources"] = {"cpus_per_trial": 2, "max_concurrent_trials": 1}
    refused = httpx.post(f"{service.url}/api/v1/studies", json=too_big, headers=headers, timeout=30)
    assert refused.status_code == 422, refused.text
    (error,) = refused.json()["detail"]
    assert error["loc"] == ["body", "resources", "cpus_per_trial"]
    assert "resources.cpus_per_trial: 2 but the largest Ray node has 1 CPUs" in error["msg"]

    # trials of a few seconds each, one per task, so that one is seen running on the second node
    spec = tiny_spec("two-nodes", trials=4, epochs=20)
    spec["data"] = {"batch_size": 20, "n_train": 4000}
    spec["resources"] = {
        "cpus_per_trial": 1,
        "max_concurrent_trials": 2,
        "max_retries": 2,
        "cohort_size": 1,
    }
    answer = httpx.post(f"{service.url}/api/v1/studies", json=spec, headers=headers, timeout=30)
    assert answer.status_code == 202, answer.text
    study_id = answer.json()["id"]

    def node2_busy_after_a_finished_trial() -> bool:
        trials = _trials(service, study_id)
        on_node2 = [t for t in trials if _node_id(t) == node2_id]
        return any(t["state"] == "COMPLETE" for t in on_node2) and any(
            t["state"] == "RUNNING" for t in on_node2
        )

    try:
        wait_for(node2_busy_after_a_finished_trial, 120, "a trial on node2", interval=0.2)
    except AssertionError as exc:
        seen = [(t["arm"], t["role"], t["number"], t["state"], _node_id(t), t["datetime_start"],
                 t["datetime_complete"]) for t in _trials(service, study_id)]  # fmt: skip
        study = get(service, f"/studies/{study_id}")
        raise AssertionError(
            f"{exc}: {study['status']} {study['error']}, head {head_id}, node2 {node2_id}\n{seen}"
        ) from None
    os.kill(node2_pid, signal.SIGKILL)  # the second node's raylet: the node is lost
    study = wait_until_finished(service, study_id, timeout=180)
    assert study["status"] == "completed", study["error"] or service.log()

    trials = _trials(service, study_id)
    # a trial sent to the second node that had not started when it died records no node
    started_on = [t for t in trials if t["node"] is not None]
    assert {_node_id(t) for t in started_on} == {head_id, node2_id}, trials
    for t in started_on:
        assert t["node"]["ip"] == "127.0.0.1" and t["node"]["hostname"] == socket.gethostname()
    lost = [t for t in trials if t["state"] == "FAIL"]
    assert lost and all(_node_id(t) in {node2_id, None} for t in lost), lost
    assert any(_node_id(t) == node2_id for t in lost), lost
    for t in lost:
        (retry,) = [
            r
            for r in trials
            if (r["arm"], r["role"]) == (t["arm"], t["role"])
            and r["user_attrs"].get("retry_of") == t["number"]
        ]
        assert retry["state"] == "COMPLETE" and _node_id(retry) == head_id, retry
        assert retry["params"] == t["params"]
    # nothing lost: every planned trial has a finished result
    for arm in ("sgd", "adam"):
        for role, planned in (("sweep", 4), ("final", 2)):
            done = [
                t for t in trials if (t["arm"], t["role"], t["state"]) == (arm, role, "COMPLETE")
            ]
            assert len(done) == planned, (arm, role, trials)
    csv_text = httpx.get(f"{service.url}/api/v1/studies/{study_id}/trials.csv", timeout=30).text
    header, *rows = csv_text.splitlines()
    assert "node" in header.split(",")
    assert any(node2_id in row for row in rows) and any(head_id in row for row in rows)
    print(f"two-node study: {time.monotonic() - started:.0f} s from the service's start")
