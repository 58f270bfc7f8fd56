"""`ratebench run SPEC.json`: run a study right here, on Ray, without the API server.

Storage and Ray come from `--database-url` / `--ray-address` or the settings (a SQLite file and
a local Ray runtime by default). The study is stored under `--study-key`, by default the spec's
name plus a hash of its content, so running the same spec again resumes it (and a finished
study just prints its leaderboard). A progress bar runs on stderr; the leaderboard is printed
as a table at the end, or as JSON with `--json`. An invalid spec is reported as one line per
problem (exit code 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli._common import CliError, SubParsers, add_database_option, database_url

if TYPE_CHECKING:
    from worker.spec import StudySpec
    from worker.summary import ArmSummary


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a study spec (JSON file) here, without the API server",
        description="Run every arm's learning-rate sweep and final seeds on Ray, record them in "
        "the Optuna storage, and print the leaderboard. Re-running the same spec resumes it.",
    )
    parser.add_argument("spec", type=Path, help="study spec, e.g. examples/quick.json")
    add_database_option(parser)
    parser.add_argument("--ray-address", help="Ray cluster to join (default: a local runtime)")
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
    from worker.tasks import check_data_source

    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        lines = "\n".join(f"  {line}" for line in format_errors(exc))
        raise CliError(f"{path} is not a valid study spec:\n{lines}") from None
    roots = get_settings().allowed_data_roots()  # as the service checks a submitted spec
    problem = check_data_source(spec.task, spec.data.data_dir, roots)
    if problem is not None:
        raise CliError(f"{path} is not a valid study spec:\n  data.data_dir: {problem}")
    return spec


def default_study_key(spec: StudySpec) -> str:
    content = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-")[:60] or "study"
    return f"{slug}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _table(spec: StudySpec, rows: list[ArmSummary]) -> Any:
    from rich.table import Table

    from worker.report.stats import metric_range, rank_arms

    metric = spec.objective.metric
    seeds = {r.arm: r.final_values for r in rows if r.final_values}
    stats = {
        s.arm: s for s in rank_arms(seeds, spec.objective.maximize, bounds=metric_range(metric))
    }
    table = Table(title=f"{spec.name} — {spec.task}, ranked by {metric} over final seeds")
    for name in (
        "#",
        "arm",
        "best lr",
        f"{metric}",
        "95% interval",
        "test",
        "steps→target",
        "time→target",
        "band (decades)",
        "trials ok/pruned/diverged/failed",
        "ties",
        "too few seeds to tell",
    ):
        left = name in ("arm", "ties", "too few seeds to tell")
        table.add_column(name, justify="left" if left else "right")
    for r in rows:
        ranked = stats.get(r.arm)
        low, high = (ranked.interval.low, ranked.interval.high) if ranked else (None, None)
        table.add_row(
            str(r.rank),
            f"{r.arm} [red](failed)[/]" if r.status == "failed" else r.arm,
            _fmt(r.best_lr, 3),
            _pm(r.objective_mean, r.objective_std),
            "-" if low is None or high is None else f"[{low:.4f}, {high:.4f}]",
            _pm(r.test_mean, r.test_std),
            _fmt(r.steps_to_target, 6),
            "-" if r.time_to_target_s is None else f"{r.time_to_target_s:.1f} s",
            _fmt(r.band_decades, 2),
            f"{r.n_complete}/{r.n_pruned}/{r.n_diverged}/{r.n_failed}",
            ", ".join(ranked.not_distinguishable_from) if ranked else "",
            ", ".join(ranked.too_few_seeds_to_tell) if ranked else "",
        )
    target = rows[0].target if rows else None
    table.caption = (
        f"target {metric} = {_fmt(target)}; band: rates within "
        f"{spec.objective.band_tolerance:.0%} of the arm's best; interval clipped to the "
        "metric's range; ties: Welch's test cannot separate the arms; too few seeds to tell: "
        "it cannot because an arm has too few seeds, no evidence either way"
    )
    return table


def _run(args: argparse.Namespace) -> int:
    import sqlalchemy as sa
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from service.config import get_settings
    from worker.report.stats import seed_warning
    from worker.sweep import Progress as StudyProgress
    from worker.sweep import run_study

    spec = load_spec(args.spec)
    url = database_url(args)
    ray_address = args.ray_address or get_settings().ray_address
    key = args.study_key or default_study_key(spec)
    err = Console(stderr=True)
    if not err.is_terminal:
        err = Console(stderr=True, width=160)
    shown = sa.make_url(url).render_as_string(hide_password=True)
    err.print(f"study [bold]{key}[/bold] in {shown}")
    few_seeds = seed_warning(spec.budget.final_seeds)
    if few_seeds:
        err.print(f"[yellow]warning:[/yellow] {few_seeds}")
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
    )
    tasks: dict[str, Any] = {}

    def update(progress: StudyProgress) -> None:
        for arm in progress.arms:
            if arm.arm not in tasks:
                tasks[arm.arm] = bar.add_task(
                    arm.arm, total=arm.budget + arm.final_seeds, status=""
                )
            best = (
                ""
                if arm.best_value is None
                else f"best {arm.best_value:.4g} @ lr {arm.best_lr:.3g}"
            )
            status = (
                f"{arm.running} running, {arm.pruned} pruned, {arm.diverged} diverged, "
                f"{arm.failed} failed  {best}"
            )
            bar.update(tasks[arm.arm], completed=arm.done, status=status)

    try:
        with bar:
            result = run_study(spec, url, key, ray_address=ray_address, on_progress=update)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except sa.exc.OperationalError as exc:
        raise CliError(f"cannot use the database: {str(exc.orig).strip()}") from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        out = Console()
        if not out.is_terminal:  # a pipe or file gets the whole table, not 80 columns
            out = Console(width=160)
        out.print(_table(spec, result.arms))
    return _report_outcome(err, result)


def _report_outcome(err: Any, result: Any) -> int:
    """The study's status, failed arms and rate-range warnings on stderr; exit code 1 unless
    every arm produced results."""
    from worker.summary import edge_warnings

    status, error = result.outcome
    style = {"completed": "green", "failed": "red"}.get(status, "yellow")
    err.print(f"status: [bold {style}]{status}[/]")
    if error:
        err.print(f"[red]error:[/] {error}")
    for warning in edge_warnings([row.to_dict() for row in result.arms]):
        err.print(f"[yellow]warning:[/yellow] {warning}")
    return 0 if status == "completed" else 1
