"""Fuzz the API from its own OpenAPI document with schemathesis, on SQLite and on PostgreSQL.

For each database: a fresh one (a SQLite file in a temporary folder; a temporary database on the
PostgreSQL server named by RATEBENCH_TEST_POSTGRES_URL, dropped afterwards), an API key made
with `ratebench keys create`, and `ratebench serve` without the scheduler (studies are queued,
never trained). schemathesis then sends generated requests to every operation, with the key,
through all its phases (coverage, fuzzing, stateful), and checks two things of every response:
no 5xx (`not_a_server_error`) and a body that matches the documented schema
(`response_schema_conformance`). The server's access log counts the requests it answered.
The run is reproducible: `--seed` (default 0) fixes schemathesis' generation, and
`--max-examples` bounds it per operation and phase.

Then the explicit examples (`EXPLICIT`): the hostile requests a review found, each sent as it
is and checked the same way (no 5xx; the documented schema, through schemathesis' own
validation of the operation's response) and for its expected status: JSON nested thousands
deep in a body and in a filter, unknown HTTP methods, a study whose step needs hundreds of
gigabytes, an anonymous submit, a data folder outside the roots (and no server path in the
answer), names in mathtext, Rich markup, escape sequences and path traversal, and the plots
and lists that show them.

    scripts/fuzz --max-examples 200              # both databases
    scripts/fuzz --max-examples 20 --database sqlite
    scripts/fuzz --database-url postgresql+psycopg://…/db   # an existing, empty database

Prints one JSON line per database and exits 1 if any check failed on any of them (errors of
schemathesis itself are reported, with its output, but are not findings about the API).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CHECKS = "not_a_server_error,response_schema_conformance"
_ACCESS = re.compile(r'"[A-Z]+ [^"]*" (\d{3})')
_SPEC = {"name": "explicit", "task": "digits-mlp", "arms": [{"optimizer": "sgd"}],
         "budget": {"trials_per_arm": 1, "epochs": 1, "final_seeds": 1}}  # fmt: skip
_DEEP = "[" * 5000 + "]" * 5000
# (name, method, path template, path values, request options, expected status); a name's
# study is submitted first (`{id}` in a path is its id)
EXPLICIT: list[tuple[str, str, str, dict[str, str], dict[str, Any], int]] = [
    ("json nested 5000 deep", "POST", "/api/v1/studies", {},
     {"content": json.dumps(_SPEC)[:-1] + ', "x": ' + _DEEP + "}",
      "headers": {"Content-Type": "application/json"}}, 422),
    ("a filter nested 2000 deep", "GET", "/api/v1/leaderboard", {},
     {"params": {"task": "digits-mlp", "model.width": "[" * 2000}}, 404),
    ("an unknown method", "PURGE", "/api/v1/health", {}, {}, 405),
    ("381 GiB of activations", "POST", "/api/v1/studies", {},
     {"json": {**_SPEC, "task": "synthetic-vgg",
               "data": {"input_shape": [1, 4096, 4096], "n_examples": 11, "batch_size": 8}}},
     422),
    ("an anonymous submit", "POST", "/api/v1/studies", {},
     {"json": {**_SPEC, "task": "cifar10-cnn"}, "anonymous": True}, 401),
    ("a data folder outside the roots", "POST", "/api/v1/studies", {},
     {"json": {**_SPEC, "task": "cifar10-cnn", "data": {"data_dir": "/etc"}}}, 422),
    ("a name in mathtext", "POST", "/api/v1/studies", {},
     {"json": {**_SPEC, "name": "$\\frac{1}{$ x^$"}}, 202),
    ("its plot", "GET", "/api/v1/studies/{study_id}/plots/{kind}.{fmt}",
     {"study_id": "a name in mathtext", "kind": "curves", "fmt": "svg"}, {}, 200),
    ("a name in markup", "POST", "/api/v1/studies", {},
     {"json": {**_SPEC, "name": "[/][bold]\x1b[2J\x1b]0;t\x07"}}, 202),
    ("a name that climbs", "POST", "/api/v1/studies", {},
     {"json": {**_SPEC, "name": "../../../tmp/x"}}, 202),
    ("the list of them", "GET", "/api/v1/studies", {}, {}, 200),
    ("its export", "GET", "/api/v1/studies/{study_id}/export",
     {"study_id": "a name that climbs"}, {}, 200),
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service did not start:\n{log.read_text()[-3000:]}")


def _run(database: str, url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        **os.environ,
        "RATEBENCH_DATA_DIR": str(work),
        "RATEBENCH_DATABASE_URL": url,
        "RATEBENCH_RUN_SCHEDULER": "false",
        "RATEBENCH_ANONYMOUS_READS": "true",
        # Not the limits under test: let generated submissions reach the database.
        "RATEBENCH_MAX_QUEUED_PER_KEY": "100000",
        "RATEBENCH_RATE_LIMIT_PER_MINUTE": "0",  # thousands of requests from one key
    }
    for name in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS"):
        env.pop(name, None)
    cli = [str(BIN / "python"), "-m", "service.cli"]
    key = subprocess.run([*cli, "keys", "create", "--name", "fuzz"], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    port = _free_port()
    log = work / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env, cwd=ROOT,
                                  stdout=out, stderr=out, start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/openapi.json", server, log)
        report = work / "report.json"
        command = [
            str(BIN / "schemathesis"), "run", f"{base}/openapi.json",
            "--checks", CHECKS,
            "--header", f"Authorization: Bearer {key}",
            "--max-examples", str(args.max_examples),
            "--seed", str(args.seed),
            "--workers", str(args.workers),
            "--report", "json", "--report-json-path", str(report),
            "--no-color",
        ]  # fmt: skip
        started = time.monotonic()
        result = subprocess.run(command, cwd=work, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        explicit = _explicit(base, key)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    if not report.exists():
        raise SystemExit(f"schemathesis wrote no report:\n{result.stdout[-3000:]}")
    summary = _summary(database, json.loads(report.read_text()), log.read_text(), elapsed, result)
    summary["explicit"] = explicit
    return summary


def _explicit(base: str, key: str) -> dict[str, Any]:
    """Send `EXPLICIT`; each failure as `name: what went wrong`."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    ids: dict[str, str] = {}
    failed = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for name, method, template, values, options, expected in EXPLICIT:
            options = dict(options)
            headers = {} if options.pop("anonymous", False) else {"Authorization": f"Bearer {key}"}
            headers.update(options.pop("headers", {}))
            path = template.format(**{k: ids.get(v, v) for k, v in values.items()})
            response = client.request(method, path, headers=headers, **options)
            if response.status_code == 202:
                ids[name] = response.json()["id"]
            problem = None
            if response.status_code != expected:
                problem = f"status {response.status_code}, expected {expected}"
            elif re.search(r'"/(etc|tmp|home|root|srv)\b', response.text):
                problem = "a server path in the answer"
            else:
                try:  # documented operations only: an unknown method has no schema
                    operation = schema[template][method]
                except (KeyError, LookupError):
                    operation = None
                try:
                    if operation is not None:
                        operation.validate_response(response)
                except Exception as exc:  # schemathesis' FailureGroup: the schema's violations
                    problem = f"schema: {str(exc).splitlines()[0][:300]}"
            if problem is not None:
                failed.append(f"{name}: {problem}")
    return {"cases": len(EXPLICIT), "failed": failed}


def _summary(
    database: str,
    report: dict[str, Any],
    server_log: str,
    elapsed: float,
    result: subprocess.CompletedProcess[str],
) -> dict[str, Any]:
    statuses = collections.Counter(int(code) for code in _ACCESS.findall(server_log))
    failures: collections.Counter[str] = collections.Counter()
    for group in report.get("failures", []):  # one group per kind of failure found
        failures[f"{group['title']} ({', '.join(group['operations'])})"] += group["count"]
    summary = {
        "database": database,
        "requests": sum(statuses.values()),
        "test_cases": report["test_cases"]["generated"],
        "server_errors": sum(n for code, n in statuses.items() if code >= 500),
        "failed_checks": dict(failures),
        "test_cases_with_failures": report["test_cases"]["with_failures"],
        "errors": len(report.get("errors", [])),
        "statuses": dict(sorted(statuses.items())),
        "seconds": round(elapsed, 1),
        "exit_code": result.returncode,
    }
    if result.returncode != 0:
        summary["output"] = result.stdout[-4000:]
    return summary


def _postgres_database(admin_url: str) -> tuple[sa.Engine, str, str]:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"ratebench_fuzz_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return admin, name, admin.url.set(database=name).render_as_string(hide_password=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers")
    parser.add_argument("--database-url", help="fuzz this (empty) database instead")
    args = parser.parse_args(argv)
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    if args.database_url:
        databases = [sa.engine.make_url(args.database_url).get_backend_name()]
    failed = False
    for database in databases:
        work = Path(tempfile.mkdtemp(prefix=f"ratebench-fuzz-{database}-"))
        admin = name = None
        try:
            if args.database_url:
                url = args.database_url
            elif database == "sqlite":
                url = f"sqlite:///{work / 'ratebench.db'}"
            else:
                admin_url = os.environ.get("RATEBENCH_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
                admin, name, url = _postgres_database(admin_url)
            summary = _run(database, url, work, args)
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
        # A finding is a 5xx or a failed check. schemathesis' own errors (a crash while it
        # generates cases) are reported, with its output, but say nothing about the API.
        bad = bool(
            summary["server_errors"]
            or summary["failed_checks"]
            or not summary["requests"]
            or summary["explicit"]["failed"]
        )
        if bad:
            summary["kept"] = str(work)  # the server's log and schemathesis' report
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(summary), flush=True)
        failed |= bad
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
