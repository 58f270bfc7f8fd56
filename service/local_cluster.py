"""A Ray cluster of several nodes on this one machine, every node on 127.0.0.1: what
`ratebench cluster up|add|env|status|down` starts, describes and stops.

Each node is one `ray start --block` process in a session of its own, with its own temp dir and
free ports (two nodes on one machine would otherwise collide on Ray's fixed default ports, the
dashboard agent's 52365 among them), token authentication (a token written to the cluster's
folder, mode 0600) and no dashboard (its job API runs code). The first node is the head; the
others join it. `down` stops exactly the processes `up` started: each node's session and every
process whose command line names the node's temp dir (Ray's worker processes sit in sessions of
their own), never every Ray process of the user as `ray stop` does.

Loopback. Ray 2.60 trades a loopback node address for the machine's routable one
(`ray._private.services.resolve_ip_for_localhost`), so `ray start --node-ip-address=127.0.0.1`
registers the node under that other address and its servers listen there. It keeps loopback
only where it believes multi-node clusters are unsupported (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`),
and there `ray start --address` refuses to join a head at all. So each node runs Ray's own
command line with that one function made the identity (`_RAY_CLI`), and the head additionally
with the setting off: every node registers as 127.0.0.1, and the servers that bind the node
address bind loopback. `tests/service/test_local_cluster.py` checks every listening socket of
the cluster's processes.

State: `<folder>/cluster.json` (the head's address, the token file, each node's `ray start`
process and temp dir). The nodes' temp dirs live under a short folder in /tmp, since Ray's Unix
socket paths under them must stay within 107 bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.processes import alive, command_line, in_session, naming

__all__ = ["ClusterError", "LocalCluster", "NodeRecord"]

LOOPBACK = "127.0.0.1"
# Ray's command line, with a loopback node address kept as it is (see the module doc).
_RAY_CLI = (
    "import sys; from ray._private import services; "
    "services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)
# Every port a node opens besides the head's GCS, dashboard and client server ports.
_NODE_PORTS = (
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
    "metrics-export-port", "node-manager-port", "object-manager-port",
)  # fmt: skip
_STARTED = "Ray runtime started."
_RAY_WORKER_NICENESS = "RAY_worker_niceness"
_ATTEMPTS = 3  # starts of one node: a loaded machine misses Ray's fixed 30 s registration wait


class ClusterError(RuntimeError):
    """The cluster cannot be started, found or stopped; the message is one line."""


@dataclass
class NodeRecord:
    name: str
    pid: int  # the `ray start --block` process, leader of its session
    temp_dir: str
    log: str
    cpus: int


@dataclass
class LocalCluster:
    folder: Path  # cluster.json and the token
    address: str = ""
    token_file: str = ""
    root: str = ""  # the nodes' temp dirs are under it
    nodes: list[NodeRecord] = field(default_factory=list)

    # -- state -------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.folder / "cluster.json"

    @classmethod
    def load(cls, folder: Path) -> LocalCluster:
        """The cluster recorded in `folder`; ClusterError when none is."""
        try:
            data = json.loads((folder / "cluster.json").read_text())
        except FileNotFoundError:
            raise ClusterError(
                f"no cluster is up here ({folder}): `ratebench cluster up` first"
            ) from None
        nodes = [NodeRecord(**node) for node in data.pop("nodes")]
        return cls(folder=folder, nodes=nodes, **data)

    def save(self) -> None:
        data = asdict(self)
        data.pop("folder")
        self.state_file.write_text(json.dumps(data, indent=2) + "\n")

    def env(self) -> dict[str, str]:
        """What a driver (`ratebench scheduler`, `ratebench run`) needs to join the cluster."""
        return {
            "RAY_ADDRESS": self.address,
            "RATEBENCH_NODE_IP": LOOPBACK,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_file,
        }

    # -- up and down -------------------------------------------------------------------------

    @classmethod
    def up(cls, folder: Path, nodes: int, cpus: int, timeout_s: float) -> LocalCluster:
        """Start a head and `nodes - 1` more nodes of `cpus` CPUs each; ClusterError (after
        stopping whatever started) when one does not come up in `_ATTEMPTS` tries."""
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "cluster.json").exists():
            raise ClusterError(f"a cluster is already recorded in {folder}: "
                               "`ratebench cluster down` first")  # fmt: skip
        token = folder / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        root = tempfile.mkdtemp(prefix="rb-cluster-", dir="/tmp")
        cluster = cls(folder, token_file=str(token.resolve()), root=root)
        cluster.save()  # `down` can clean up even if `up` is interrupted halfway
        try:
            for index in range(nodes):
                cluster._start_node(f"node-{index + 1}", cpus, head=index == 0, timeout_s=timeout_s)
                cluster.save()
        except BaseException:
            cluster.down()
            raise
        return cluster

    def _start_node(self, name: str, cpus: int, *, head: bool, timeout_s: float) -> None:
        why = ""
        for attempt in range(1, _ATTEMPTS + 1):
            node = self._launch(name, cpus, head=head)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not _up(node) and alive(node.pid):
                time.sleep(0.5)
            if _up(node) and alive(node.pid):
                self.nodes.append(node)
                return
            why = f"{name}, attempt {attempt}: {_last_line(node.log)}"
            _kill_node(node)
        raise ClusterError(f"Ray node {name} did not start ({why}); see {self.root}")

    def _launch(self, name: str, cpus: int, *, head: bool) -> NodeRecord:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        log = temp_dir.with_suffix(".log")
        ports = _free_ports(len(_NODE_PORTS) + 3)
        args = [f"--{option}={port}" for option, port in zip(_NODE_PORTS, ports, strict=False)]
        if head:
            gcs, dashboard, client = ports[-3:]
            self.address = f"{LOOPBACK}:{gcs}"
            args += [
                "--head", f"--port={gcs}", "--include-dashboard=false",
                f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
            ]  # fmt: skip
        else:
            args.append(f"--address={self.address}")
        env = {
            **os.environ,
            **self.env(),
            # the head keeps loopback through this setting too; a joining node cannot have it
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if head else "1",
        }
        env.setdefault(_RAY_WORKER_NICENESS, "0")  # trials at normal priority (worker.cluster)
        env.pop("RAY_ADDRESS")  # `ray start` takes the address from its arguments
        command = [
            sys.executable, "-c", _RAY_CLI, "start", "--block", f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args,
        ]  # fmt: skip
        with log.open("w") as out:
            proc = subprocess.Popen(
                command, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        return NodeRecord(name, proc.pid, str(temp_dir), str(log), cpus)

    def add(self, cpus: int, timeout_s: float) -> NodeRecord:
        """Start one more node of `cpus` CPUs and join it to the head."""
        if not self.nodes:
            raise ClusterError("the cluster has no head: `ratebench cluster up` first")
        self._start_node(f"node-{len(self.nodes) + 1}", cpus, head=False, timeout_s=timeout_s)
        self.save()
        return self.nodes[-1]

    def down(self) -> list[int]:
        """Stop every process of every node (SIGTERM, then SIGKILL what is left after a few
        seconds), delete the nodes' temp dirs and the state; returns the processes stopped."""
        pids = sorted({pid for node in self.nodes for pid in node_processes(node)})
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(alive(pid) for pid in pids):
                time.sleep(0.2)
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
        for leftover in (self.state_file, Path(self.token_file) if self.token_file else None):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
        return pids

    def status(self) -> list[dict[str, Any]]:
        """Each node: its name, CPUs, whether `ray start` runs, and its processes' count."""
        return [
            {
                "node": node.name,
                "cpus": node.cpus,
                "running": alive(node.pid) and _up(node),
                "processes": len(node_processes(node)),
                "temp_dir": node.temp_dir,
            }
            for node in self.nodes
        ]


def node_processes(node: NodeRecord) -> list[int]:
    """The node's processes: its `ray start` session (while that process is still the node's:
    a process id can be reused), and any process whose command line names the node's temp
    dir."""
    session = in_session(node.pid) if node.temp_dir in command_line(node.pid) else []
    return sorted((set(session) | set(naming(node.temp_dir))) - {os.getpid()})


def _up(node: NodeRecord) -> bool:
    try:
        return _STARTED in Path(node.log).read_text(errors="replace")
    except OSError:
        return False


def _last_line(log: str) -> str:
    try:
        lines = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no output"
    return lines[-1][:300] if lines else "no output"


def _kill_node(node: NodeRecord) -> None:
    for pid in node_processes(node):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports, held open together so that none is handed out twice."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
