"""`ratebench run SPEC.json`: run a study right here, on Ray, without the API server.

Storage and Ray come from `--database-url` / `--ray-address` or the settings (a SQLite file and
a local Ray runtime by default). With no Ray address anywhere, a runtime already running on this
machine is joined, and the first line says whose (`service.running_ray`: a `ratebench serve`'s,
or `ray start`'s), which spares Ray's start; `--ray-address local` starts a new one. The study
is stored under `--study-key`, by default the spec's name plus a hash of its content, so running
the same spec again resumes it (and a finished study just prints its leaderboard). The key is
also the study's id in `ratebench_studies`, where the run records it as the scheduler records a
submitted study (source "cli"): status, progress, environment and leaderboard rows, so
`ratebench plot`, the API, the leaderboards and the web pages show it like any other; the API's
cancel stops it. A progress bar runs on stderr; the leaderboard is printed as a table at the
end, or as JSON with `--json`. A study that already completed with this spec is not run again:
its stored results are printed, without starting Ray (`service.local_run.finished_result`). An
invalid spec is reported as one line per problem (exit code 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli._common import (
    CliError,
    SubParsers,
    add_database_option,
    console,
    database_url,
    safe,
)
from service.cli._tables import arm_table

if TYPE_CHECKING:
    from worker.spec import StudySpec


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a study spec (JSON file) here, without the API server",
        description="Run every arm's learning-rate sweep and final seeds on Ray, record them in "
        "the Optuna storage, and print the leaderboard. Re-running the same spec resumes it.",
    )
    parser.add_argument("spec", type=Path, help="study spec, e.g. examples/quick.json")
    add_database_option(parser)
    parser.add_argument(
        "--ray-address",
        help="Ray cluster to join (default: RAY_ADDRESS, else a runtime already running on this "
        "machine: a `ratebench serve`'s or `ray start`'s, else a new local one); 'local': a "
        "new local runtime",
    )
    parser.add_argument(
        "--study-key",
        help="the study's name in storage (default: spec name + hash of the spec; the same "
        "spec resumes)",
    )
    parser.add_argument("--json", action="store_true", help="print the leaderboard as JSON")
    parser.set_defaults(handler=_run)


def load_spec(path: Path) -> StudySpec:
    """Read and validate a spec file, or raise CliError with one line per problem."""
    from pydantic import ValidationError

    from service.config import get_settings
    from worker.spec import StudySpec, format_errors
    from worker.tasks import DataRoots, check_data_source

    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    roots = get_settings().allowed_data_roots()  # as the service checks a submitted spec
    try:
        with DataRoots.using(roots):
            spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        lines = "\n".join(f"  {line}" for line in format_errors(exc))
        raise CliError(f"{path} is not a valid study spec:\n{lines}") from None
    problem = check_data_source(spec.task, spec.data.model_dump(), roots)
    if problem is not None:
        raise CliError(f"{path} is not a valid study spec:\n  data.data_dir: {problem}")
    return spec


def default_study_key(spec: StudySpec) -> str:
    content = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-.")[:60] or "study"
    return f"{slug}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"


def _run(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from service import running_ray
    from service.config import get_settings
    from service.local_run import finished_result, run_recorded
    from service.models import STUDY_ID_LENGTH, STUDY_ID_PATTERN

    spec = load_spec(args.spec)
    url = database_url(args)
    settings = get_settings()
    key = args.study_key or default_study_key(spec)
    if not re.fullmatch(STUDY_ID_PATTERN, key):
        raise CliError(
            f"--study-key {key!r}: use 1 to {STUDY_ID_LENGTH} letters, digits, '_', '.' or '-', "
            "starting with a letter, digit or '_'"
        )
    err = console(stderr=True)
    shown = sa.make_url(url).render_as_string(hide_password=True)
    try:
        outcome = finished_result(spec, url, key)  # a completed study: nothing left to run
        if outcome is not None:
            err.print(f"study [bold]{key}[/bold] in {safe(shown)}")
            _warn_few_seeds(err, spec)
            err.print("completed before: its stored results (nothing to run, Ray not started)")
        else:
            ray_address = args.ray_address or settings.ray_address
            rejoin = None
            if ray_address is None:  # nothing asked: join a runtime running here, if any
                running = running_ray.find(settings.data_dir)
                if running is not None:
                    ray_address = running.address
                    running.join_settings()
                    err.print(f"joining the Ray runtime of {safe(running.owner)} at "
                              f"{safe(running.address)} (--ray-address local starts a new "
                              "one)")  # fmt: skip
                rejoin = partial(running_ray.address_to_join, settings.data_dir)
            err.print(f"study [bold]{key}[/bold] in {safe(shown)}")
            _warn_few_seeds(err, spec)
            result, status, error = run_recorded(spec, url, key, ray_address, err, rejoin=rejoin)
            outcome = {**result.to_dict(), "status": status, "error": error}
    except sa.exc.OperationalError as exc:
        raise CliError(f"cannot use the database: {str(exc.orig).strip()}") from None
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        console().print(arm_table(spec.model_dump(mode="json"), outcome["arms"]))
    return _report_outcome(err, outcome)


def _warn_few_seeds(err: Any, spec: StudySpec) -> None:
    from worker.report.stats import seed_warning

    few_seeds = seed_warning(spec.budget.final_seeds)
    if few_seeds:
        err.print(f"[yellow]warning:[/yellow] {few_seeds}")


def _report_outcome(err: Any, outcome: dict[str, Any]) -> int:
    """The study's status, failed arms and rate-range warnings on stderr; exit code 1 unless
    every arm produced results. `outcome`: `StudyResult.to_dict()` with the stored status."""
    from worker.summary import edge_warnings

    status, error = outcome["status"], outcome["error"]
    style = {"completed": "green", "failed": "red"}.get(status, "yellow")
    err.print(f"status: [bold {style}]{status}[/]")
    if error:
        err.print(f"[red]error:[/] {safe(error)}")
    for warning in edge_warnings(outcome["arms"]):
        err.print(f"[yellow]warning:[/yellow] {safe(warning)}")
    return 0 if status == "completed" else 1
