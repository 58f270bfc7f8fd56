"""Ray's start-up timeout as a setting: `RATEBENCH_RAY_START_TIMEOUT_S` reaches Ray's own limits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker import cluster

_PROBE = """
import worker.cluster
import ray  # after worker.cluster, as in the service and the CLI
from ray._raylet import Config
print(Config.worker_register_timeout_seconds())
"""


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RATEBENCH_RAY_"))}
    return {**env, **values}


@pytest.mark.slow
def test_the_setting_reaches_rays_own_start_up_limits() -> None:
    """Ray's core, loading in a fresh process, reads the limit the setting exported."""
    probe = [sys.executable, "-c", _PROBE]
    default = subprocess.run(probe, env=_env(), capture_output=True, text=True, check=True)
    env = _env(RATEBENCH_RAY_START_TIMEOUT_S="97")
    raised = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    assert default.stdout.strip() != "97"
    assert raised.stdout.strip() == "97"


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "1.5"])
def test_a_bad_value_is_refused_naming_the_variable(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cluster.START_TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match=cluster.START_TIMEOUT_ENV):
        cluster.start_timeout_s()


def test_an_explicit_ray_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    raylet, worker = "RAY_raylet_start_wait_time_s", "RAY_worker_register_timeout_seconds"
    monkeypatch.setenv(cluster.START_TIMEOUT_ENV, "200")
    monkeypatch.setenv(raylet, "45")
    monkeypatch.setenv(worker, "restored afterwards")
    monkeypatch.delenv(worker)
    agent = "RAY_agent_register_timeout_ms"
    monkeypatch.setenv(agent, "restored afterwards")
    monkeypatch.delenv(agent)
    cluster.export_start_timeout()
    assert os.environ[raylet] == "45"
    assert os.environ[worker] == "200"
    assert os.environ[agent] == "200000"  # Ray reads milliseconds


_SLOW_NODE = (
    "The current node timed out during startup. This could happen because some of the Ray "
    "processes failed to startup."
)


@pytest.fixture
def fake_slow_ray(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[float]]:
    """`ray.init` replaced by one that fails as Ray 2.60's does when a local node misses Ray's
    fixed 30 s registration wait, for as many calls as `delays` has entries (each first waits
    that long). The only stand-in in these tests: that wait cannot be made to run out on demand.
    Returns the calls seen and the delays to fill in."""
    import ray
    from ray._private import ray_constants

    calls: list[str] = []
    delays: list[float] = []

    def init(**options: object) -> None:
        calls.append("init")
        if len(calls) <= 2 * len(delays):  # an init and a shutdown per failed attempt
            time.sleep(delays[len(calls) // 2])  # stands for the time a failed start takes
            raise Exception(_SLOW_NODE)  # what Ray raises

    for name in ("RAY_ADDRESS", "RAY_worker_niceness", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.setenv(name, "restored afterwards")
        monkeypatch.delenv(name)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return calls, delays


def test_a_local_node_slow_to_register_is_started_again_while_the_timeout_lasts(
    fake_slow_ray: tuple[list[str], list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, delays = fake_slow_ray
    delays.extend([0.0] * 4)  # more failures than the attempts always allowed
    monkeypatch.setenv(cluster.START_TIMEOUT_ENV, "60")
    cluster.connect(None)
    assert calls == ["init", "shutdown"] * 4 + ["init"]


def test_after_the_timeout_a_start_is_final_once_three_have_failed(
    fake_slow_ray: tuple[list[str], list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, delays = fake_slow_ray
    # a first start that outlasts the timeout still gets two more; the third failure is final
    delays.extend([1.2, 0.0, 0.0, 0.0])
    monkeypatch.setenv(cluster.START_TIMEOUT_ENV, "1")
    with pytest.raises(Exception, match="timed out during startup"):
        cluster.connect(None)
    assert calls == ["init", "shutdown", "init", "shutdown", "init"]


def test_without_the_setting_a_slow_start_is_not_retried(
    fake_slow_ray: tuple[list[str], list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, delays = fake_slow_ray
    delays.append(0.0)
    monkeypatch.delenv(cluster.START_TIMEOUT_ENV, raising=False)
    with pytest.raises(Exception, match="timed out during startup"):
        cluster.connect(None)
    assert calls == ["init"]


@pytest.fixture
def token_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """RAY_AUTH_MODE=token with no token anywhere Ray looks; returns the home folder."""
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    return tmp_path


def test_joining_without_the_token_fails_at_once_in_one_line(token_mode: Path) -> None:
    with pytest.raises(cluster.ClusterConfigError) as info:
        cluster.connect("10.255.255.1:6379")  # unreachable: only a refusal returns at once
    assert "\n" not in str(info.value)
    assert "RAY_AUTH_TOKEN" in str(info.value)


def test_a_token_anywhere_ray_looks_is_enough(
    token_mode: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.check_auth(None)  # a local runtime: Ray writes its own token
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    cluster.check_auth("head:6379")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = token_mode / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    with pytest.raises(cluster.ClusterConfigError):
        cluster.check_auth("head:6379")  # the file it names does not exist
    token_file.write_text("secret")
    cluster.check_auth("head:6379")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (token_mode / ".ray").mkdir()
    (token_mode / ".ray" / "auth_token").write_text("secret")
    cluster.check_auth("head:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    (token_mode / ".ray" / "auth_token").unlink()
    cluster.check_auth("head:6379")


# Loopback as /proc/net/tcp{,6} write it: 127.0.0.1, its IPv4-mapped IPv6 form, and ::1.
_LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
_LISTEN = "0A"


def _listening_addresses(pid: int) -> set[str]:
    """The local addresses (hex, as the kernel lists them) on which process `pid` listens."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == _LISTEN and fields[9] in inodes:
                addresses.add(fields[1].rsplit(":", 1)[0])
    return addresses


@pytest.mark.ray
def test_a_local_runtime_listens_on_loopback_only(ray_runtime: None) -> None:
    """Ray trades a loopback node address for the machine's routable one unless told not to;
    the session's runtime (started by `cluster.connect(None)`) must advertise and listen on
    127.0.0.1 alone."""
    import ray

    assert ray.util.get_node_ip_address() == cluster.LOOPBACK
    assert ray.get_runtime_context().gcs_address.startswith(f"{cluster.LOOPBACK}:")
    pids = subprocess.run(["pgrep", "-x", "gcs_server|raylet"], capture_output=True, text=True)
    ours = [int(p) for p in pids.stdout.split() if _under_this_process(int(p))]
    assert ours, "no GCS or raylet of this test session was found"
    for pid in ours:
        addresses = _listening_addresses(pid)
        assert addresses and addresses <= _LOOPBACK_HEX, (pid, addresses)


def _under_this_process(pid: int) -> bool:
    """Whether `pid` descends from this test process."""
    while pid > 1:
        if pid == os.getpid():
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


@pytest.mark.ray
def test_a_local_runtimes_trials_run_at_normal_priority(ray_runtime: None) -> None:
    """Ray's default puts its workers at nice 15, where any other busy process on the machine
    starves the trials; a runtime `cluster.connect(None)` starts keeps them at this process's
    own priority."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)
