"""The chaos soak: a real service on PostgreSQL, studies training, readers polling, and faults.

It starts a private PostgreSQL server (`scripts/private_postgres.py`) and `ratebench serve` on it
with its embedded scheduler and local Ray runtime, all on 127.0.0.1; submits `--studies` grid
studies from two API keys (mnist1d-mlp, sgd and adam, `--rates` rates, `--epochs` epochs, 2
final seeds; 40 epochs, the default, keep 8 studies training for more than ten minutes on a
2-core machine, so that every fault meets running trials); runs `--readers` threads that poll
the API; and every `--fault-every` seconds (uniform between the two bounds) injects one fault,
each kind at least once before any repeats (those that hit a running trial's machinery first).
A fault waits for a running study: when every study has ended (a fast machine trains the wave
before the faults are through), another wave of `--studies` is submitted first. The faults:

- `service`: SIGKILL of the service's whole process tree (Ray's processes with it), then a
  restart;
- `trial_worker`: SIGKILL of a Ray worker process running a trial;
- `mailbox`: SIGKILL of a study's mailbox actor;
- `agent`: SIGKILL of Ray's dashboard agent (the raylet exits with it, as after an OOM kill);
- `raylet`: SIGKILL of the raylet;
- `postgres`: a crash of the database server (`pg_ctl stop -m immediate`), restarted 5-15 s later.

After `--minutes` it stops injecting, waits for every study to end, and checks: every study
`completed`; every arm's configurations finished exactly once, every final seed once, no trial
left RUNNING or WAITING (`worker.results.integrity_problems`); no 5xx answered while the
database was up; every fault met at least one running study. It prints one JSON summary
(faults injected, attempts and faults per study, reads by status) and exits 1 when a check
failed.

    scripts/chaos --minutes 10 --studies 8      # the soak docs/operations.md reports
    scripts/chaos --minutes 2 --studies 2 --faults postgres,trial_worker,agent --epochs 25
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.private_postgres import PrivatePostgres  # noqa: E402
from service.processes import command_line, descendants, outermost  # noqa: E402

FAULTS = ("service", "trial_worker", "mailbox", "agent", "raylet", "postgres")
# What each Ray fault hits: the process whose command line (its title, for Ray's workers and
# agents) starts so. Matching anywhere would hit the raylet too, whose arguments name its agents.
_TARGETS = {
    "trial_worker": "ray::ratebench trial",
    "mailbox": "ray::Mailbox",
    "agent": "ray::DashboardAgent",
}
# Faults that hit a running trial's machinery come first, while the studies run.
_NEEDS_TRIALS = ("trial_worker", "mailbox", "agent", "raylet")
_TARGET_WAIT_S = 10.0  # how long a Ray fault looks for its process before another kind goes
_OUTAGE_GRACE_S = 5.0  # requests answered this soon after the database is back may still 503


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _is_target(kind: str, command: str) -> bool:
    if kind == "raylet":
        return command.split(" ", 1)[0].endswith("/raylet")
    return command.startswith(_TARGETS[kind])


def grid_spec(name: str, rates: int, epochs: int) -> dict[str, Any]:
    grid = [round(10 ** (-3 + 3 * i / max(1, rates - 1)), 6) for i in range(rates)]
    return {
        "name": name,
        "task": "mnist1d-mlp",
        "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "adam"}],
        "search_space": {"lr": {"values": grid}},
        "budget": {"trials_per_arm": rates, "epochs": epochs, "final_seeds": 2},
        "sampler": "grid",
        "pruner": "none",
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
    }


@dataclass
class Service:
    """`ratebench serve` on the private database, in its own process group."""

    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> None:
        self.starts += 1
        log = (self.workdir / f"serve-{self.starts}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            env=self.env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=5).json()["status"] == "ok":
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the service did not become healthy (see {log.name})")

    def descendants(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc is not None else []

    def kill(self) -> None:
        """SIGKILL the process group and anything below the service that left it."""
        assert self.proc is not None
        below = self.descendants()
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


@dataclass
class Reads:
    """What the readers got: counts by status, and every 5xx with its time."""

    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    server_errors: list[tuple[float, int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: str, at: float, path: str) -> None:
        with self.lock:
            self.by_status[status] += 1
            if status.isdigit() and int(status) >= 500:
                self.server_errors.append((at, int(status), path))


def _reader(service: Service, study_ids: list[str], reads: Reads, stop: threading.Event,
            rng: random.Random) -> None:  # fmt: skip
    paths = ["/studies", "/studies/{id}", "/studies/{id}/trials?limit=50",
             "/studies/{id}/leaderboard", "/leaderboard?task=mnist1d-mlp", "/health"]  # fmt: skip
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            path = rng.choice(paths).format(id=rng.choice(study_ids))
            try:
                status = str(client.get(f"{service.url}/api/v1{path}").status_code)
            except httpx.TransportError:
                status = "unreachable"  # the service is restarting
            reads.add(status, time.monotonic(), path)
            stop.wait(rng.uniform(0.05, 0.3))


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="ratebench-chaos-"))
        self.postgres = PrivatePostgres.create()
        env = {**os.environ, "RATEBENCH_DATABASE_URL": self.postgres.url,
               "RATEBENCH_DATA_DIR": str(self.workdir / "data"),
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        for name in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS"):
            env.pop(name, None)
        env.setdefault("RATEBENCH_RAY_START_TIMEOUT_S", "180")
        env.setdefault("RATEBENCH_RATE_LIMIT_PER_MINUTE", "0")  # the readers load, unthrottled
        if args.lease_seconds:
            env["RATEBENCH_LEASE_SECONDS"] = str(args.lease_seconds)
        self.service = Service(env, self.workdir)
        self.faults: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.study_ids: list[str] = []  # the readers read it as it grows
        self.waves = 0
        self.outages: list[tuple[float, float]] = []
        self.started = time.monotonic()

    def key(self, name: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", "create", "--name", name,
             "--database-url", self.postgres.url],
            env=self.service.env, cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    def submit(self) -> None:
        """One wave of `--studies` studies, from the two API keys in turn."""
        self.waves += 1
        for i in range(self.args.studies):
            spec = grid_spec(f"chaos-{self.waves}-{i}", self.args.rates, self.args.epochs)
            response = httpx.post(
                f"{self.service.url}/api/v1/studies", json=spec, timeout=60,
                headers={"Authorization": f"Bearer {self.keys[i % len(self.keys)]}"},
            )  # fmt: skip
            response.raise_for_status()
            self.study_ids.append(response.json()["id"])

    def studies_to_hit(self, timeout: float = 120) -> int | None:
        """How many studies run now; when none does (a fast machine finished the wave), submit
        another wave and wait up to `timeout` seconds for one of it to run, so that every fault
        meets running studies however fast the machine trains. None: the API cannot say."""
        running = self.running_studies()
        if running != 0 or self.running_studies("queued") != 0:
            return running  # some run, or are about to be claimed (or the API cannot say)
        self.submit()
        deadline = time.monotonic() + timeout
        while running == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            running = self.running_studies()
        return running

    def running_studies(self, status: str = "running") -> int | None:
        """How many studies have `status` now, by the API (None when it cannot say)."""
        try:
            page = httpx.get(f"{self.service.url}/api/v1/studies?status={status}", timeout=10)
            return int(page.json()["total"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def inject(self, kind: str) -> dict[str, Any] | None:
        """One fault of `kind`, or None when it found nothing to hit now."""
        fault = self._inject(kind)
        if fault is not None:
            fault["studies_running"] = fault.pop("running")
        return fault

    def _inject(self, kind: str) -> dict[str, Any] | None:
        running = self.studies_to_hit()
        at = round(time.monotonic() - self.started, 1)
        if kind == "service":
            self.service.kill()
            time.sleep(self.rng.uniform(1, 3))
            self.service.start()
            back = round(time.monotonic() - self.started - at, 1)
            return {"at_s": at, "fault": kind, "running": running, "back_after_s": back}
        if kind == "postgres":
            began = time.monotonic()
            self.postgres.crash()
            time.sleep(self.rng.uniform(5, 15))
            self.postgres.start()
            self.outages.append((began, time.monotonic() + _OUTAGE_GRACE_S))
            down = round(time.monotonic() - began, 1)
            return {"at_s": at, "fault": kind, "running": running, "down_s": down}
        targets = self._targets(kind)
        if not targets:
            return None
        pid = self.rng.choice(targets)
        title = command_line(pid).strip()[:80]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return {"at_s": at, "fault": kind, "running": running, "process": title}

    def _targets(self, kind: str) -> list[int]:
        """The processes a Ray fault of `kind` may hit, waiting up to `_TARGET_WAIT_S` for
        one: a trial's worker exists only while a trial trains, and short trials leave gaps."""
        deadline = time.monotonic() + _TARGET_WAIT_S
        while True:
            matches = [p for p in self.service.descendants() if _is_target(kind, command_line(p))]
            targets = outermost(matches)  # not a process the raylet is starting, say
            if targets or time.monotonic() > deadline:
                return targets
            time.sleep(0.05)

    def run_faults(self, until: float) -> None:
        kinds = list(self.args.faults)
        self.rng.shuffle(kinds)  # every kind once, in a random order, then at random
        kinds.sort(key=lambda kind: kind not in _NEEDS_TRIALS)  # those while trials run first
        pending = collections.deque(kinds)
        low, high = self.args.fault_every
        next_at = time.monotonic() + self.rng.uniform(low, high)
        while time.monotonic() < until:
            time.sleep(max(0.0, min(next_at, until) - time.monotonic()))
            if time.monotonic() >= until:
                return
            order = list(pending) or [self.rng.choice(kinds)]
            for kind in order + [k for k in kinds if k not in order]:
                done = self.inject(kind)
                if done is not None:
                    self.faults.append(done)
                    if kind in pending:
                        pending.remove(kind)
                    break
            next_at = time.monotonic() + self.rng.uniform(low, high)

    def wait_finished(self, study_ids: list[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        studies: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                studies = {i: httpx.get(f"{self.service.url}/api/v1/studies/{i}",
                                        timeout=30).json() for i in study_ids}  # fmt: skip
                if all(s.get("status") not in {"queued", "running"} for s in studies.values()):
                    return studies
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(2)
        return studies

    def during_outage(self, at: float) -> bool:
        return any(began <= at <= ended for began, ended in self.outages)

    def close(self) -> None:
        if self.service.proc is not None and self.service.proc.poll() is None:
            self.service.kill()
        self.postgres.remove()


def check_trials(url: str, studies: dict[str, Any]) -> dict[str, list[str]]:
    """`integrity_problems` of every study, read from the database."""
    from worker.results import integrity_problems, load_trials
    from worker.spec import StudySpec

    problems = {}
    for study_id, study in studies.items():
        spec = StudySpec.from_stored(study["spec"])
        problems[study_id] = integrity_problems(load_trials(url, study_id, spec), spec)
    return problems


def _study_summary(study: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    return {
        "status": study.get("status"),
        "attempts": study.get("attempts"),
        "faults": [str(f.get("error", ""))[:160] for f in study.get("faults") or []],
        "error": study.get("error"),
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long faults come")
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--rates", type=int, default=8, help="grid points per arm")
    parser.add_argument(
        "--epochs", type=int, default=40, help="per trial (40: the studies outlast the faults)"
    )
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument(
        "--fault-every",
        type=float,
        nargs=2,
        default=(60.0, 90.0),
        metavar=("LOW", "HIGH"),
        help="seconds between faults",
    )
    parser.add_argument(
        "--faults",
        type=lambda s: s.split(","),
        default=list(FAULTS),
        help=f"kinds, comma-separated (default: all of {','.join(FAULTS)})",
    )
    parser.add_argument(
        "--settle-minutes",
        type=float,
        default=30.0,
        help="how long the studies may take to end after the faults stop",
    )
    parser.add_argument("--lease-seconds", type=float, help="RATEBENCH_LEASE_SECONDS (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"--faults: unknown {sorted(unknown)}; known: {', '.join(FAULTS)}")

    soak = Soak(args)
    reads, stop = Reads(), threading.Event()
    try:
        soak.service.start()
        soak.keys = [soak.key("chaos-a"), soak.key("chaos-b")]
        soak.submit()
        readers = [threading.Thread(target=_reader, args=(soak.service, soak.study_ids, reads, stop,
                                                          random.Random(args.seed + i)),
                                    daemon=True) for i in range(args.readers)]  # fmt: skip
        for reader in readers:
            reader.start()
        soak.run_faults(time.monotonic() + 60 * args.minutes)
        faults_done = time.monotonic()
        studies = soak.wait_finished(soak.study_ids, 60 * args.settle_minutes)
        settled = time.monotonic()
        stop.set()
        for reader in readers:
            reader.join(timeout=60)
        problems = check_trials(soak.postgres.url, studies)
    finally:
        stop.set()
        soak.close()

    up_errors = [e for e in reads.server_errors if not soak.during_outage(e[0])]
    statuses = {i: s.get("status") for i, s in studies.items()}
    checks = {
        "every_study_completed": all(v == "completed" for v in statuses.values()),
        "every_configuration_and_seed_once": not any(problems.values()),
        "no_5xx_while_database_up": not up_errors,
        "every_fault_kind_injected": set(args.faults) <= {f["fault"] for f in soak.faults},
        "every_fault_met_a_running_study": all(f["studies_running"] for f in soak.faults),
    }
    summary = {
        "minutes_of_faults": round((faults_done - soak.started) / 60, 2),
        "minutes_to_settle": round((settled - faults_done) / 60, 2),
        "faults": soak.faults,
        "fault_kinds": dict(collections.Counter(f["fault"] for f in soak.faults)),
        "waves_of_studies": soak.waves,
        "studies": {i: _study_summary(s, problems.get(i, [])) for i, s in studies.items()},
        "reads": dict(reads.by_status),
        "server_errors_while_database_up": [
            {"at_s": round(at - soak.started, 1), "status": code, "path": path}
            for at, code, path in up_errors
        ],
        "checks": checks,
        "workdir": str(soak.workdir),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
