"""The API under load: many concurrent clients against a real `ratebench serve` on 127.0.0.1.

Starts the service (no scheduler, so submitted studies just queue) on a fresh SQLite file, or
on a fresh database created in the PostgreSQL server named by `--database-url` (dropped after),
then runs `--clients` asyncio clients, each with its own connection, for `--seconds`. Each
client repeats a request drawn from a fixed mix: reads (list, get, study leaderboard, task
leaderboard, trials, health), writes (cancel) and submits (POST a small spec). Reported: every
request's status, the 5xx count, transport errors, and p50/p99 latency per kind.

Usage: python bench/api_load.py [--clients 200] [--seconds 60]
       [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
Prints one JSON object and exits 0 (1 when any response was 5xx or a request failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from _service import HOST, ms, postgres_database, server

from service.auth import create_key
from service.db import get_engine, migrate, session_scope

MAX_CLIENTS = 1000
MAX_SECONDS = 600
MAX_REQUESTS = 2_000_000
MIX = {  # kind -> weight
    "list": 25,
    "get": 20,
    "study_leaderboard": 10,
    "task_leaderboard": 5,
    "trials": 10,
    "health": 10,
    "cancel": 5,
    "submit": 15,
}
SPEC: dict[str, Any] = {
    "name": "load",
    "task": "mnist1d-mlp",
    "model": {"width": 32, "depth": 1},
    "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}],
    "search_space": {"lr": {"low": 1e-3, "high": 1.0, "log": True}},
    "budget": {"trials_per_arm": 3, "epochs": 1, "final_seeds": 1},
}


@contextmanager
def _database(url: str | None, folder: Path) -> Iterator[str]:
    """A fresh database: a SQLite file in `folder`, or a new database on the given server."""
    if url is None:
        yield f"sqlite:///{folder / 'ratebench.db'}"
        return
    with postgres_database(url, "ratebench_load") as database:
        yield database


@contextmanager
def _service(url: str, folder: Path) -> Iterator[str]:
    """`ratebench serve` on a free local port; yields its base URL, stops it afterwards."""
    env = {
        **os.environ,
        "RATEBENCH_DATA_DIR": str(folder),
        "RATEBENCH_DATABASE_URL": url,
        "RATEBENCH_RUN_SCHEDULER": "false",  # submitted studies just queue
        "RATEBENCH_MAX_QUEUED_PER_KEY": "100000",  # measure load, not the per-key limit
        "RATEBENCH_RATE_LIMIT_PER_MINUTE": "0",  # nor the per-key request rate
    }
    for name in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS"):
        env.pop(name, None)

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "service.cli", "serve", "--host", HOST, "--port",
                str(port), "--log-level", "warning"]  # fmt: skip

    with server(command, folder / "serve.log", env) as (base, _):
        yield base


class Load:
    """Shared state of one run: study ids to read and cancel, and every request's outcome."""

    def __init__(self, key: str, seconds: float, seed: int) -> None:
        self.auth = {"Authorization": f"Bearer {key}"}
        self.deadline = time.monotonic() + seconds
        self.random = random.Random(seed)
        self.study_ids: list[str] = []
        self.statuses: Counter[int] = Counter()
        self.by_kind: dict[str, Counter[int]] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.requests = 0

    def pick(self) -> str:
        kinds, weights = zip(*MIX.items(), strict=True)
        return self.random.choices(kinds, weights)[0]

    def some_study(self) -> str:
        return self.random.choice(self.study_ids)

    async def request(self, client: httpx.AsyncClient, kind: str) -> None:
        method, path, body = "GET", "/studies?limit=20", None
        if kind == "get":
            path = f"/studies/{self.some_study()}"
        elif kind == "study_leaderboard":
            path = f"/studies/{self.some_study()}/leaderboard"
        elif kind == "task_leaderboard":
            path = "/leaderboard?task=mnist1d-mlp"
        elif kind == "trials":
            path = f"/studies/{self.some_study()}/trials"
        elif kind == "health":
            path = "/health"
        elif kind == "cancel":
            method, path = "POST", f"/studies/{self.some_study()}/cancel"
        elif kind == "submit":
            method, path, body = "POST", "/studies", SPEC
        headers = self.auth if method == "POST" else None
        started = time.perf_counter()
        try:
            response = await client.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            self.errors[f"{kind}: {type(exc).__name__}"] += 1
            return
        self.latency[kind].append(time.perf_counter() - started)
        self.statuses[response.status_code] += 1
        self.by_kind[kind][response.status_code] += 1
        if kind == "submit" and response.status_code == 202:
            self.study_ids.append(response.json()["id"])

    async def client(self, base: str) -> None:
        async with httpx.AsyncClient(base_url=f"{base}/api/v1", timeout=60) as client:
            while time.monotonic() < self.deadline and self.requests < MAX_REQUESTS:
                self.requests += 1
                await self.request(client, self.pick())


async def _run(base: str, load: Load, clients: int) -> float:
    async with httpx.AsyncClient(base_url=f"{base}/api/v1", timeout=60) as client:
        for _ in range(20):  # studies to read and cancel from the first request on
            response = await client.post("/studies", json=SPEC, headers=load.auth)
            response.raise_for_status()
            load.study_ids.append(response.json()["id"])
    started = time.monotonic()
    await asyncio.gather(*(load.client(base) for _ in range(clients)))
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, choices=range(1, MAX_CLIENTS + 1),
                        metavar=f"1..{MAX_CLIENTS}")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--database-url", help="PostgreSQL server (a fresh database is made)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds: must be in (0, {MAX_SECONDS}]")
    with tempfile.TemporaryDirectory(prefix="ratebench-load-") as tmp:
        folder = Path(tmp)
        with _database(args.database_url, folder) as url:
            migrate(url)
            with session_scope(get_engine(url)) as session:
                key = create_key(session, "load").key
            get_engine(url).dispose()
            with _service(url, folder) as base:
                load = Load(key, args.seconds, args.seed)
                elapsed = asyncio.run(_run(base, load, args.clients))
    server_errors = sum(n for status, n in load.statuses.items() if status >= 500)
    report = {
        "benchmark": "api_load",
        "database": sa.make_url(url).get_backend_name(),
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": sum(load.statuses.values()),
        "requests_per_second": round(sum(load.statuses.values()) / elapsed, 1),
        "status_counts": {str(k): v for k, v in sorted(load.statuses.items())},
        "server_errors_5xx": server_errors,
        "transport_errors": dict(load.errors),
        "latency_ms": {
            kind: {
                "n": len(v),
                "p50": ms(v, 0.5),
                "p99": ms(v, 0.99),
                "mean": round(1000 * statistics.fmean(v), 1),
                "status": {str(k): n for k, n in sorted(load.by_kind[kind].items())},
            }
            for kind, v in sorted(load.latency.items())
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "python": sys.version.split()[0],
            "httpx": httpx.__version__,
            "sqlalchemy": sa.__version__,
        },
    }
    print(json.dumps(report, indent=2))
    return 1 if server_errors or load.errors else 0


if __name__ == "__main__":
    sys.exit(main())
