"""Do the read endpoints stay fast as the database grows? p50/p99 at 1k and 100k trials.

Creates two fresh databases on the PostgreSQL server named by `--database-url` (dropped after),
each holding `--studies` finished studies: the large one with `--trials` trials per study
(100 × 1,000 = 100k trials by default), the small one with `--small-trials` per study
(100 × 10 = 1k trials in all). The same number of studies in both, so that only the trials
grow. Each study has the shape of a finished `ratebench` study: a row of `ratebench_studies`
with its spec, two arms (`sgd` with momentum, `adam`), each a sweep study and a final study in
Optuna's tables (trials complete, pruned, diverged or failed, with the user attributes
`worker.sweep` records: per-epoch history, timings, the machine), and the arms' rows of
`ratebench_arm_results` computed by `worker.summary.summarize_study` from the first study's
trials. Rows are written with PostgreSQL's COPY; Optuna's own API then loads them back (the
first study's summary), which checks they are well formed.

Then it serves the real API on each database (`service.app.create_app(start_ray=False)` under
uvicorn, on 127.0.0.1, a child process each) and sends `--requests` sequential requests to
each endpoint, after a warm-up, the two sizes taking turns request by request (so that other
work on the machine slows both alike): the task leaderboard, a study leaderboard, a study, a
page of 10 trials from the middle of a study (10: a small study's whole size, so both pages
hold as many trials) and the studies list (50 per page), each on a study drawn at random.
Prints a markdown table of p50/p99 (ms) per endpoint and size, with the ratios large/small and
the API process's CPU time per request (from /proc),
and exits 1 when a p99 at the large size reaches `--target-ms` (50).

Usage: python bench/api_scale.py [--quick] [--requests 300] [--studies 100] [--trials 1000]
       [--small-trials 10] [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from _service import HOST, ms, postgres_database, server
from optuna.distributions import FloatDistribution, distribution_to_json

from service.db import get_engine, migrate, session_scope
from service.models import ArmResult, StudyRecord
from worker.arms.base import final_study_name, sweep_study_name
from worker.spec import StudySpec
from worker.storage import open_storage
from worker.summary import summarize_study

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TASK = "mnist1d-mlp"
ARMS: tuple[tuple[str, dict[str, Any]], ...] = (("sgd", {"momentum": 0.9}), ("adam", {}))
FINAL_SEEDS = 2
EPOCHS = 10
STEPS_PER_EPOCH = 40
LR = FloatDistribution(1e-4, 1.0, log=True)
WARMUP = 20
PAGE = 10  # trials per page: as many at both sizes (a small study has 10)
ENDPOINTS = ("task leaderboard", "study leaderboard", "study", "trials page", "studies list")


def _spec(name: str, trials_per_study: int) -> StudySpec:
    """A spec whose arms hold `trials_per_study` trials in all, sweeps and final seeds."""
    per_arm = trials_per_study // len(ARMS) - FINAL_SEEDS
    return StudySpec.model_validate(
        {
            "name": name,
            "task": TASK,
            "data": {"batch_size": 100},
            "model": {"width": 128, "depth": 2},
            "arms": [{"optimizer": s, "fixed": fixed} for s, fixed in ARMS],
            "search_space": {"lr": {"low": LR.low, "high": LR.high, "log": True}},
            "budget": {"trials_per_arm": per_arm, "epochs": EPOCHS, "final_seeds": FINAL_SEEDS,
                       "steps_per_epoch": STEPS_PER_EPOCH},
            "sampler": "tpe",
            "pruner": "median",
        }
    )  # fmt: skip


class Rows:
    """Rows for Optuna's tables, with their ids, as a driver would have written them."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.tables: dict[str, list[tuple[Any, ...]]] = {
            name: []
            for name in ("studies", "study_directions", "study_user_attributes", "trials",
                         "trial_params", "trial_values", "trial_user_attributes",
                         "trial_intermediate_values")
        }  # fmt: skip
        self.ids = dict.fromkeys(self.tables, 0)
        self.node = {"hostname": "gpu-node-1", "ip": "10.0.0.7", "cpu": "AMD EPYC", "gpus": []}

    def _id(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def add(self, table: str, *values: Any) -> int:
        row_id = self._id(table)
        self.tables[table].append((row_id, *values))
        return row_id

    def study(self, name: str) -> int:
        study_id = self.add("studies", name)
        self.add("study_directions", "MAXIMIZE", study_id, 0)
        return study_id

    def trial(
        self, study_id: int, number: int, arm: str, fixed: dict[str, Any], role: str,
        start: datetime, seed: int,
    ) -> datetime:  # fmt: skip
        """One trial; returns when it ended."""
        r = self.random
        lr = math.exp(r.uniform(math.log(LR.low), math.log(LR.high)))
        outcome = "complete"
        if role == "sweep":
            outcome = r.choices(["complete", "pruned", "diverged", "failed"], [60, 30, 8, 2])[0]
        epochs = r.randint(2, EPOCHS - 1) if outcome == "pruned" else EPOCHS
        if outcome in ("failed", "diverged"):
            epochs = r.randint(0, 3)
        peak = 0.65 - 0.08 * abs(math.log10(lr) + 1.5) + r.gauss(0, 0.01)
        history = []
        for e in range(1, epochs + 1):
            acc = round(peak * (1 - math.exp(-e / 3)), 6)
            history.append(
                {"epoch": e, "step": STEPS_PER_EPOCH * e, "train_loss": round(2.3 - 2 * acc, 6),
                 "val_loss": round(2.3 - 1.9 * acc, 6), "val_accuracy": acc,
                 "wall_time": round(0.11 * e, 4), "examples_per_sec": round(r.uniform(3e4, 4e4), 1)}
            )  # fmt: skip
        duration = 0.11 * max(epochs, 1) + 0.4
        end = start + timedelta(seconds=duration)
        state = {"complete": "COMPLETE", "diverged": "COMPLETE", "pruned": "PRUNED"}.get(
            outcome, "FAIL"
        )
        trial_id = self.add("trials", number, study_id, state, start, end)
        self.add("trial_params", trial_id, "lr", lr, distribution_to_json(LR))
        value = 0.0 if outcome == "diverged" else (history[-1]["val_accuracy"] if history else None)
        if state != "FAIL" and value is not None:
            self.add("trial_values", trial_id, 0, value, "FINITE")
        for step, record in enumerate(history, start=1):
            self.add("trial_intermediate_values", trial_id, step, record["val_accuracy"], "FINITE")
        attrs: dict[str, Any] = {
            "arm": arm, "scheme": arm, "role": role, "lr": lr, "seed": seed, "attempt": 1,
            **({"fixed": fixed} if fixed else {}),
            "pid": r.randint(1000, 60000), "host": "gpu-node-1",
            "started_at": start.replace(tzinfo=UTC).timestamp(), "node": self.node,
            "outcome": outcome, "history": history, "steps": STEPS_PER_EPOCH * len(history),
            "wall_time": round(duration - 0.4, 4), "setup_time": 0.4, "n_parameters": 25_000,
            "device": "cpu",
        }  # fmt: skip
        if outcome == "diverged":
            attrs["diverged_at_step"] = STEPS_PER_EPOCH * len(history) + 3
        if outcome == "failed":
            attrs["error"] = "RuntimeError: CUDA error: an illegal memory access was encountered"
        if role == "final":
            attrs.update(test_accuracy=round(peak - 0.01, 6), test_loss=round(2.3 - 1.9 * peak, 6))
        for key, value_ in attrs.items():
            self.add("trial_user_attributes", trial_id, key, json.dumps(value_))
        return end


COLUMNS = {
    "studies": "study_id, study_name",
    "study_directions": "study_direction_id, direction, study_id, objective",
    "study_user_attributes": "study_user_attribute_id, study_id, key, value_json",
    "trials": "trial_id, number, study_id, state, datetime_start, datetime_complete",
    "trial_params": "param_id, trial_id, param_name, param_value, distribution_json",
    "trial_values": "trial_value_id, trial_id, objective, value, value_type",
    "trial_user_attributes": "trial_user_attribute_id, trial_id, key, value_json",
    "trial_intermediate_values": (
        "trial_intermediate_value_id, trial_id, step, intermediate_value, intermediate_value_type"
    ),
}


def _copy(url: str, rows: Rows) -> None:
    """COPY every row in, then move each table's id sequence past it (Optuna inserts after)."""
    engine = sa.create_engine(url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table, data in rows.tables.items():
            with cursor.copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as copy:
                for row in data:
                    copy.write_row(row)
            key = COLUMNS[table].split(",")[0]
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "
                f"(SELECT coalesce(max({key}), 0) + 1 FROM {table}), false)"
            )
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


def seed(url: str, studies: int, trials_per_study: int) -> list[tuple[str, int]]:
    """Fill the fresh database at `url`; returns each study's (id, trial count)."""
    migrate(url)
    open_storage(url).engine.dispose()  # Optuna's tables, as its first driver creates them
    rows = Rows(seed=trials_per_study)
    created = datetime(2026, 11, 1, tzinfo=UTC)
    made: list[tuple[str, int, StudySpec, datetime]] = []
    for s in range(studies):
        study_id = uuid.uuid4().hex
        spec = _spec(f"scale-{s}", trials_per_study)
        start = created + timedelta(hours=s)
        clock = start.replace(tzinfo=None)
        for label, (_, fixed) in zip(spec.labels, ARMS, strict=True):
            sweep = rows.study(sweep_study_name(study_id, label))
            for n in range(spec.budget.trials_per_arm):
                clock = rows.trial(sweep, n, label, fixed, "sweep", clock, spec.seed)
            final = rows.study(final_study_name(study_id, label))
            rows.add("study_user_attributes", final, "best_trial", json.dumps(0))
            for n in range(FINAL_SEEDS):
                clock = rows.trial(final, n, label, fixed, "final", clock, 1 + n)
        made.append((study_id, trials_per_study, spec, start))
    _copy(url, rows)
    first_id, _, first_spec, _ = made[0]
    arm_rows = summarize_study(url, first_id, first_spec)  # Optuna's reader accepts the rows
    with session_scope(get_engine(url)) as session:
        for study_id, n, spec, start in made:
            session.add(
                StudyRecord(
                    id=study_id, name=spec.name, task=spec.task, status="completed",
                    spec=spec.model_dump(mode="json"), created_at=start, started_at=start,
                    finished_at=start + timedelta(minutes=50), attempts=1,
                    progress={"trials_done": n, "trials_total": n},
                    environment={"python": "3.11", "ratebench": "0.1.0", "nodes": [rows.node]},
                )
            )  # fmt: skip
            session.flush()
            for rank, row in enumerate(arm_rows, start=1):
                session.add(
                    ArmResult(
                        study_id=study_id, task=spec.task, arm=row.arm, scheme=row.scheme,
                        metric=spec.objective.metric, direction=str(spec.objective.direction),
                        rank=rank, best_lr=row.best_lr, objective_mean=row.objective_mean,
                        objective_std=row.objective_std, test_mean=row.test_mean,
                        n_trials=row.n_trials, n_diverged=row.n_diverged, summary=row.to_dict(),
                    )
                )  # fmt: skip
    engine = get_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))
    engine.dispose()
    return [(study_id, n) for study_id, n, _, _ in made]


SERVE = """
import sys, uvicorn
from service.app import create_app
from service.config import Settings
settings = Settings(database_url=sys.argv[1], data_dir=sys.argv[2], anonymous_reads=True,
                    rate_limit_per_minute=0)  # the cost per request, not the rate limit
uvicorn.run(create_app(settings, start_ray=False), host=sys.argv[3], port=int(sys.argv[4]),
            log_level="warning")
"""


@contextmanager
def _service(url: str, folder: Path) -> Iterator[tuple[str, int]]:
    """The API (no Ray, no scheduler) on a free local port, in a child process: its base URL
    and process id."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-c", SERVE, url, str(folder), HOST, str(port)]

    with server(command, folder / "serve.log") as (base, proc):
        yield base, proc.pid


def _paths(studies: list[tuple[str, int]], random_: random.Random) -> dict[str, Any]:
    """Per endpoint, a function giving the next request's path."""

    def study() -> tuple[str, int]:
        return random_.choice(studies)

    return {
        "task leaderboard": lambda: f"/leaderboard?task={TASK}",
        "study leaderboard": lambda: f"/studies/{study()[0]}/leaderboard",
        "study": lambda: f"/studies/{study()[0]}",
        "trials page": lambda: _middle_page(*study()),
        "studies list": lambda: "/studies?limit=50",
    }


def _middle_page(study_id: str, trials: int) -> str:
    """The page of `PAGE` trials in the middle of the study (all of a study that small)."""
    return f"/studies/{study_id}/trials?limit={PAGE}&offset={max(0, (trials - PAGE) // 2)}"


def _cpu_s(pid: int) -> float | None:
    """CPU time (user + system) the process has used so far; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    servers: dict[str, tuple[str, int]], studies: dict[str, list[tuple[str, int]]], requests: int
) -> dict[str, dict[str, Any]]:
    """p50/p99 of `requests` sequential requests per endpoint and size, after a warm-up, and
    the server's CPU time per request. The sizes take turns request by request, so that other
    work on the machine slows both alike; the CPU time is what one request costs the API
    process whatever the machine's load (the database server's work is not in it)."""
    paths = {size: _paths(studies[size], random.Random(0)) for size in servers}
    out: dict[str, dict[str, Any]] = {size: {} for size in servers}
    clients = {
        size: httpx.Client(base_url=f"{base}/api/v1", timeout=60)
        for size, (base, _) in servers.items()
    }
    try:
        for endpoint in ENDPOINTS:
            times: dict[str, list[float]] = {size: [] for size in servers}
            size_of: dict[str, int] = {}
            cpu: dict[str, float | None] = {}
            for i in range(WARMUP + requests):
                if i == WARMUP:
                    cpu = {size: _cpu_s(pid) for size, (_, pid) in servers.items()}
                for size, client in clients.items():
                    path = paths[size][endpoint]()
                    started = time.perf_counter()
                    response = client.get(path)
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise SystemExit(f"{path}: {response.status_code} {response.text[:300]}")
                    if i >= WARMUP:
                        times[size].append(elapsed)
                    size_of[size] = len(response.content)
            for size, values in times.items():
                before, after = cpu.get(size), _cpu_s(servers[size][1])
                cpu_ms = None
                if before is not None and after is not None:
                    cpu_ms = round(1000 * (after - before) / len(values), 2)
                out[size][endpoint] = {
                    "n": len(values), "p50": ms(values, 0.5), "p99": ms(values, 0.99),
                    "server_cpu_ms": cpu_ms, "bytes": size_of[size],
                }  # fmt: skip
    finally:
        for client in clients.values():
            client.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_URL, help="PostgreSQL server")
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--trials", type=int, default=1000, help="per study, large database")
    parser.add_argument("--small-trials", type=int, default=10, help="per study, small database")
    parser.add_argument("--requests", type=int, default=300, help="per endpoint and size")
    parser.add_argument("--target-ms", type=float, default=50.0)
    parser.add_argument("--quick", action="store_true", help="20 studies, 60 requests")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.requests = 20, 60
    if min(args.trials, args.small_trials) < 2 * (FINAL_SEEDS + 1) or args.studies < 1:
        parser.error(f"--trials and --small-trials: at least {2 * (FINAL_SEEDS + 1)}")
    sizes = {"small": args.small_trials, "large": args.trials}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ratebench-scale-") as tmp, ExitStack() as stack:
        servers: dict[str, tuple[str, int]] = {}
        studies: dict[str, list[tuple[str, int]]] = {}
        for size, per_study in sizes.items():
            database = postgres_database(args.database_url, f"ratebench_scale_{size}")
            url = stack.enter_context(database)
            started = time.monotonic()
            studies[size] = seed(url, args.studies, per_study)
            seeded_s = time.monotonic() - started
            get_engine(url).dispose()
            folder = Path(tmp) / size
            folder.mkdir()
            servers[size] = stack.enter_context(_service(url, folder))
            results[size] = {"studies": args.studies, "trials": args.studies * per_study,
                             "seed_seconds": round(seeded_s, 1)}  # fmt: skip
            print(f"{size}: {args.studies * per_study} trials seeded in {seeded_s:.0f} s",
                  file=sys.stderr)  # fmt: skip
        for size, latency in measure(servers, studies, args.requests).items():
            results[size]["latency_ms"] = latency
    small, large = results["small"], results["large"]
    print(f"| endpoint | p50 / p99 at {small['trials']:,} trials (ms) | p50 / p99 at "
          f"{large['trials']:,} trials (ms) | ratio p50 / p99 | API CPU per request, "
          f"{small['trials']:,} / {large['trials']:,} (ms) |")  # fmt: skip
    print("|---|---|---|---|---|")
    missed = []
    for endpoint in ENDPOINTS:
        s, g = small["latency_ms"][endpoint], large["latency_ms"][endpoint]
        ratios = " / ".join(
            f"{g[q] / s[q]:.2f}" if s[q] else "-" for q in ("p50", "p99")
        )  # large over small
        print(f"| {endpoint} | {s['p50']} / {s['p99']} | {g['p50']} / {g['p99']} | {ratios} | "
              f"{s['server_cpu_ms']} / {g['server_cpu_ms']} |")  # fmt: skip
        if g["p99"] >= args.target_ms:
            missed.append(endpoint)
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"\n{args.requests} sequential requests per endpoint and size; load average {load}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs", file=sys.stderr)  # fmt: skip
    if args.json:
        report = {"benchmark": "api_scale", "requests": args.requests, "results": results,
                  "load_average": load, "target_ms": args.target_ms, "missed": missed}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
