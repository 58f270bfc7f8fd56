"""`ratebench run SPEC.json`: run a study right here, on Ray, without the API server.

Storage and Ray come from `--database-url` / `--ray-address` or the settings (a SQLite file and
a local Ray runtime by default). The study is stored under `--study-key`, by default the spec's
name plus a hash of its content, so running the same spec again resumes it (and a finished
study just prints its leaderboard). The key is also the study's id in `ratebench_studies`,
where the run records it as the scheduler records a submitted study (source "cli"): status,
progress, environment and leaderboard rows, so `ratebench plot`, the API, the leaderboards and
the web pages show it like any other; the API's cancel stops it. A progress bar runs on stderr;
the leaderboard is printed as a table at the end, or as JSON with `--json`. An invalid spec is
reported as one line per problem (exit code 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from service.cli._common import CliError, SubParsers, add_database_option, database_url
from service.cli._tables import arm_table

if TYPE_CHECKING:
    from worker.spec import StudySpec
    from worker.sweep import Progress, StudyResult


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
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-.")[:60] or "study"
    return f"{slug}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"


def _run(args: argparse.Namespace) -> int:
    import sqlalchemy as sa
    from rich.console import Console

    from service.config import get_settings
    from service.models import STUDY_ID_LENGTH
    from worker.report.stats import seed_warning

    spec = load_spec(args.spec)
    url = database_url(args)
    ray_address = args.ray_address or get_settings().ray_address
    key = args.study_key or default_study_key(spec)
    if not re.fullmatch(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{STUDY_ID_LENGTH - 1}}}", key):
        raise CliError(
            f"--study-key {key!r}: use 1 to {STUDY_ID_LENGTH} letters, digits, '_', '.' or '-', "
            "starting with a letter, digit or '_'"
        )
    err = Console(stderr=True)
    if not err.is_terminal:
        err = Console(stderr=True, width=160)
    shown = sa.make_url(url).render_as_string(hide_password=True)
    err.print(f"study [bold]{key}[/bold] in {shown}")
    few_seeds = seed_warning(spec.budget.final_seeds)
    if few_seeds:
        err.print(f"[yellow]warning:[/yellow] {few_seeds}")
    try:
        result, status, error = _run_recorded(spec, url, key, ray_address, err)
    except sa.exc.OperationalError as exc:
        raise CliError(f"cannot use the database: {str(exc.orig).strip()}") from None
    if args.json:
        print(json.dumps({**result.to_dict(), "status": status, "error": error}, indent=2))
    else:
        out = Console()
        if not out.is_terminal:  # a pipe or file gets the whole table, not 80 columns
            out = Console(width=160)
        out.print(arm_table(spec.model_dump(mode="json"), [r.to_dict() for r in result.arms]))
    return _report_outcome(err, result, status, error)


def _run_recorded(
    spec: StudySpec, url: str, key: str, ray_address: str | None, err: Any
) -> tuple[StudyResult, str, str | None]:
    """Run the study as the row `key` of `ratebench_studies` (source "cli"), recorded exactly
    as a scheduler records an API study: claimed and leased (the lease renewed, the progress
    stored, a cancel from the API honoured by `StudyDriver`), and finished with its status
    and leaderboard rows by the scheduler's own `finish_study`. Returns the sweep's result and
    the status and error stored."""
    import os
    import socket

    from worker import cluster

    cluster.check_auth(ray_address)  # a missing Ray token fails here, before the study is claimed

    def claim() -> tuple[Any, Any, Any]:
        """The database migrated and the study claimed, with what the sweep imports."""
        from service import queue
        from service.db import get_engine, migrate
        from service.scheduler import SchedulerConfig

        migrate(url)
        engine = get_engine(url)
        config = SchedulerConfig(
            storage_url=url,
            ray_address=ray_address,
            scheduler_id=f"cli:{socket.gethostname()}:{os.getpid()}",
        )
        try:
            study = queue.start_local(
                engine, key, config.scheduler_id, config.lease, spec.model_dump(mode="json"),
                name=spec.name, task=spec.task,
            )  # fmt: skip
        except queue.StudyBusyError as exc:
            raise CliError(str(exc)) from None
        import worker.sweep  # noqa: F401  Optuna, PyTorch: imported here, while Ray starts

        return engine, config, study

    def ray_failed(claimed: tuple[Any, Any, Any], exc: Exception) -> None:
        """Ray did not start: the claimed study fails with Ray's error, as a sweep's would."""
        from service.models import StudyStatus
        from service.scheduler import Scheduler

        engine, config, _ = claimed
        Scheduler(engine, config).finish_study(key, StudyStatus.FAILED, None, exc=exc)

    engine, config, study = _while_ray_starts(ray_address, claim, ray_failed)
    from service.models import StudyStatus
    from service.scheduler import Scheduler, StudyDriver, final_status
    from worker.sweep import TakenOverError, run_study

    recorder = Scheduler(engine, config)  # not started: only its way of recording an end
    with StudyDriver(engine, key, config) as driver, _progress_bar(err) as bar:

        def update(progress: Progress) -> None:
            driver.on_progress(progress)
            bar(progress)

        try:
            result = run_study(
                spec, url, key, ray_address=ray_address, on_progress=update,
                should_stop=lambda: driver.lost or driver.cancelled,
            )  # fmt: skip
        except KeyboardInterrupt:
            recorder.finish_study(key, StudyStatus.CANCELLED, driver, error=_INTERRUPTED)
            raise
        except Exception as exc:
            recorder.finish_study(key, StudyStatus.FAILED, driver, exc=exc)  # only if still ours
            if isinstance(exc, TakenOverError) or driver.lost:
                raise CliError(_TAKEN_OVER.format(key=key)) from None
            if isinstance(exc, ValueError):  # the spec does not fit the cluster
                raise CliError(str(exc)) from None
            raise
    if driver.lost:
        raise CliError(_TAKEN_OVER.format(key=key))
    status, error = final_status(driver.cancelled, result.arms)
    recorder.finish_study(key, status, driver, error=error, store=(study, spec, result.arms))
    return result, status.value, error


def _while_ray_starts(
    ray_address: str | None,
    work: Callable[[], _T],
    ray_failed: Callable[[_T, Exception], None],
) -> _T:
    """`work()` on another thread while this one joins Ray, which must happen on the main thread
    (`service.ray_runtime`) and mostly waits for Ray's own processes; then Ray's idle workers
    import the trial code (`worker.remote.warm_workers`) while the sweep opens its arms. Ray's
    start, the imports, the migrations and the claim are most of what `ratebench run` does
    before its first trial, and need not wait for one another. When Ray fails to start after
    `work()` succeeded, `ray_failed(its result, the error)` runs, then a CliError says why."""
    from concurrent.futures import ThreadPoolExecutor

    from worker import cluster

    with ThreadPoolExecutor(1, thread_name_prefix="claim") as pool:
        done = pool.submit(work)
        try:
            cluster.connect(ray_address, log_to_driver=False)
        except Exception as exc:  # Ray raises many types; the user gets one line
            if done.exception() is None:  # waits for work(); its own error is shadowed by Ray's
                ray_failed(done.result(), exc)
            where = f"join Ray at {ray_address}" if ray_address else "start a local Ray runtime"
            raise CliError(f"could not {where}: {type(exc).__name__}: {exc}") from None
        from worker.remote import warm_workers

        warm_workers()  # nobody waits for them: the first trials find the imports done
        return done.result()


_T = TypeVar("_T")
_TAKEN_OVER = "study {key}: another process took it over; its results are theirs"
_INTERRUPTED = "interrupted before it finished; run the same spec again to resume it"


@contextmanager
def _progress_bar(err: Any) -> Iterator[Callable[[Progress], None]]:
    """A bar per arm on stderr; yields the function that updates them."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
    )
    tasks: dict[str, Any] = {}

    def update(progress: Progress) -> None:
        for arm in progress.arms:
            if arm.arm not in tasks:
                tasks[arm.arm] = bars.add_task(
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
            bars.update(tasks[arm.arm], completed=arm.done, status=status)

    with bars:
        yield update


def _report_outcome(err: Any, result: StudyResult, status: str, error: str | None) -> int:
    """The study's status, failed arms and rate-range warnings on stderr; exit code 1 unless
    every arm produced results."""
    from worker.summary import edge_warnings

    style = {"completed": "green", "failed": "red"}.get(status, "yellow")
    err.print(f"status: [bold {style}]{status}[/]")
    if error:
        err.print(f"[red]error:[/] {error}")
    for warning in edge_warnings([row.to_dict() for row in result.arms]):
        err.print(f"[yellow]warning:[/yellow] {warning}")
    return 0 if status == "completed" else 1
