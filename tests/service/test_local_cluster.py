"""README's local cluster, command by command: `ratebench cluster up --nodes 2`, the API without
its scheduler, `ratebench scheduler` on the cluster, `ratebench submit --wait`, `ratebench
cluster down`. The commands are README's own (the test fails when README's section no longer
holds them); only the spec is a smaller one than examples/quick.json, and the port and the data
folder are the test's.

It checks that the study's trials ran on both nodes; that every socket the cluster, the API
and the scheduler listen on is bound to loopback; that a study whose trials fit no node waits
for one (`RATEBENCH_NODE_WAIT_S`) and runs once `ratebench cluster add` brings it, as a
restarting cluster's late node would; and that `down` stops exactly the cluster's processes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.local_cluster import LocalCluster, node_processes
from tests.service.helpers import free_port, tiny_spec, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).parents[2]
README_COMMANDS = (
    "ratebench cluster up --nodes 2",
    'eval "$(ratebench cluster env)"',
    "export RATEBENCH_API_KEY=$(ratebench keys create --name me)",
    "RATEBENCH_RUN_SCHEDULER=false ratebench serve &",
    "ratebench scheduler &",
    "ratebench submit examples/quick.json --wait",
    "ratebench cluster down",
)


def test_readme_has_these_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in README_COMMANDS:
        assert command in readme, command


def _listening_inodes() -> dict[int, str]:
    """Every listening TCP socket's inode and local address, from /proc/net/tcp{,6}."""
    found: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[int(fields[9])] = _address(fields[1])
    return found


def _address(hex_address: str) -> str:
    """`ip:port` of /proc/net's hex form (each 32-bit word little-endian)."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"{ip}:{int(port, 16)}"


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback


def listening(pids: list[int]) -> dict[int, list[str]]:
    """The addresses each process listens on."""
    inodes = _listening_inodes()
    found: dict[int, list[str]] = {}
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            match = re.fullmatch(r"socket:\[(\d+)\]", link)
            if match and int(match[1]) in inodes:
                found.setdefault(pid, []).append(inodes[int(match[1])])
    return found


class Shell:
    """README's commands, run as a user's shell would run them (bash), in the repository."""

    def __init__(self, tmp_path: Path) -> None:
        port = free_port()
        self.env = {
            k: v for k, v in os.environ.items()
            if k not in {"RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS", "RATEBENCH_DATABASE_URL"}
        }  # fmt: skip
        self.env.update(
            PATH=f"{Path(sys.executable).parent}:{self.env['PATH']}",
            RATEBENCH_DATA_DIR=str(tmp_path / "data"),
            RATEBENCH_PORT=str(port),
            RATEBENCH_URL=f"http://127.0.0.1:{port}",
            RATEBENCH_NODE_WAIT_S="900",  # the late node of the second study takes this long
        )
        self.background: list[subprocess.Popen[bytes]] = []
        self.logs = tmp_path

    def run(self, command: str, timeout: float = 900) -> str:
        result = subprocess.run(
            ["bash", "-c", command], env=self.env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert result.returncode == 0, (
            f"{command}:\n{result.stdout}\n{result.stderr}\n{self.background_logs()}"
        )
        return result.stdout

    def background_logs(self) -> str:
        return "\n".join(
            f"--- {path.name}:\n{path.read_text()[-2000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def export(self, command: str) -> None:
        """`eval "$(…)"` / `export NAME=$(…)`: the variables it sets, kept for what follows."""
        out = self.run(f"{command}\nenv -0")
        for item in out.split("\0"):
            name, _, value = item.partition("=")
            if name.startswith(("RAY_", "RATEBENCH_")):
                self.env[name] = value

    def start(self, command: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{len(self.background)}.log").open("w")
        # bash -c runs a lone simple command in its own process (no fork): `proc` is it
        proc = subprocess.Popen(["bash", "-c", command.rstrip(" &")], env=self.env, cwd=ROOT,
                                stdout=log, stderr=log)  # fmt: skip
        self.background.append(proc)
        return proc

    def api(self, path: str) -> Any:
        """What the API says, to the owner of the studies (the key README's commands made):
        anonymous readers are not shown where trials ran."""
        key = self.env.get("RATEBENCH_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = f"{self.env['RATEBENCH_URL']}/api/v1{path}"
        return httpx.get(url, headers=headers, timeout=30).json()

    def stop_background(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.background:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(tmp_path)
    yield shell
    shell.stop_background()
    folder = Path(shell.env["RATEBENCH_DATA_DIR"]) / "cluster"
    if (folder / "cluster.json").exists():  # the test failed before its own `down`
        LocalCluster.load(folder).down()


def _ray_processes_of_others() -> set[int]:
    return {
        int(p.name) for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"ray" in _cmdline(int(p.name))
    }  # fmt: skip


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _node_ids(shell: Shell, study_id: str) -> set[str]:
    trials = shell.api(f"/studies/{study_id}/trials?limit=200")["items"]
    return {t["node"]["ray_node_id"] for t in trials if t["node"]}


@pytest.mark.timeout(2400)  # three Ray nodes, a service and two studies on a loaded machine
def test_a_local_cluster_runs_a_study_on_both_nodes_on_loopback_and_stops_only_itself(
    shell: Shell, tmp_path: Path
) -> None:
    others = _ray_processes_of_others()
    spec = tiny_spec("cluster", trials=4, epochs=10)
    # Trials of a few seconds (2000 steps): Ray's warm-up tasks hold each node's one CPU while
    # they import PyTorch, and trials of a fraction of a second could all end on the node that
    # finished its warm-up first before the other one took any.
    spec["budget"]["steps_per_epoch"] = 200
    spec["resources"] = {"cpus_per_trial": 1, "max_concurrent_trials": 2, "cohort_size": 1}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    up, env, key, serve, scheduler, submit, down = README_COMMANDS

    assert "2 nodes" in shell.run(f"{up} --cpus 1")
    shell.export(env)
    shell.export(key)
    shell.start(serve)
    shell.start(scheduler)
    out = shell.run(submit.replace("examples/quick.json", shlex.quote(str(tmp_path / "spec.json"))))
    assert "status=completed" in out, out
    study_id = out.splitlines()[0].strip()
    assert len(_node_ids(shell, study_id)) == 2  # the study spread over both nodes

    # A study whose trials fit no node (2 CPUs; each node has 1) waits for one to join.
    short = {k: v for k, v in spec["budget"].items() if k != "steps_per_epoch"}  # one node runs it
    big = {**spec, "name": "late-node", "budget": short,
           "resources": {**spec["resources"], "cpus_per_trial": 2}}  # fmt: skip
    (tmp_path / "big.json").write_text(json.dumps(big))
    late = shell.run(f"ratebench submit {shlex.quote(str(tmp_path / 'big.json'))}").split()[0]
    wait_for(lambda: shell.api(f"/studies/{late}")["status"] == "running", 120, "the claim")
    assert "joined" in shell.run("ratebench cluster add --cpus 2")
    study = wait_for(
        lambda: (s := shell.api(f"/studies/{late}"))["status"] not in {"queued", "running"} and s,
        900, "the study on the late node",
    )  # fmt: skip
    assert study["status"] == "completed", study["error"]
    assert len(_node_ids(shell, late)) == 1  # only the new node holds 2 CPUs

    folder = Path(shell.env["RATEBENCH_DATA_DIR"]) / "cluster"
    cluster = LocalCluster.load(folder)
    ours = [pid for node in cluster.nodes for pid in node_processes(node)]
    ours += [proc.pid for proc in shell.background]
    bound = listening(ours)
    assert bound, "no listening socket found: the check would prove nothing"
    outside = {pid: addrs for pid, addrs in bound.items() if not all(map(_loopback, addrs))}
    assert not outside, {pid: (_cmdline(pid)[:80], addrs) for pid, addrs in outside.items()}

    assert not set(ours) & others  # the cluster's processes are its own, none pre-existing

    shell.stop_background()
    assert "stopped" in shell.run(down)
    assert not any(node_processes(node) for node in cluster.nodes)
    assert not (folder / "cluster.json").exists()
