"""Running a study in this process, recorded in the database as a scheduler records one.

`ratebench run` (`service.cli._run`) and the Python API (`ratebench.compare`) run a study right
where they are called, on Ray, without the API server: `run_recorded` makes the study a row of
`ratebench_studies` (source "cli" or "python") that is claimed and leased like a scheduler's
(the lease renewed, the progress stored, a cancel from the API honoured), runs the sweep, and
finishes it with its status and leaderboard rows by the scheduler's own `finish_study`, so the
API, the leaderboards, the web pages and the exports show it like any other study. A progress
bar per arm runs on the given console.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from service.cli._common import CliError
from service.models import StudySource

if TYPE_CHECKING:
    from worker.spec import StudySpec
    from worker.sweep import Progress, StudyResult

__all__ = ["finished_result", "run_recorded"]


def finished_result(
    spec: StudySpec, url: str, key: str, source: StudySource = StudySource.CLI
) -> dict[str, Any] | None:
    """The stored result of the study `key` when it already completed with this very spec (its
    own source, the same spec hash, status `completed`, a leaderboard row per arm), as
    `StudyResult.to_dict()` shapes it; None otherwise, and the study is run (or resumed).

    A re-run of a completed study has nothing left to train: resuming it would start Ray, claim
    the row, reopen every Optuna study and summarise them again, only to print what the
    scheduler's `finish_study` stored. Its rows are read instead and the row is left as it was.
    A study that ended otherwise (failed arms, cancelled, interrupted) is run again, as before.
    `wall_time` is the stored run's, from its start to its end."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from service.db import get_engine
    from service.models import ArmResult, StudyRecord, StudyStatus
    from service.refusals import spec_hash

    if sa.make_url(url).get_backend_name() == "sqlite":
        path = sa.make_url(url).database
        if path not in (None, "", ":memory:") and not _exists(path):
            return None  # a fresh database: nothing stored, and nothing to create here
    try:
        with Session(get_engine(url)) as session:
            study = session.get(StudyRecord, key)
            if (
                study is None
                or study.source != source.value
                or study.status != StudyStatus.COMPLETED.value
                or study.spec_hash != spec_hash(spec.model_dump(mode="json"))
            ):
                return None
            rows = session.scalars(
                sa.select(ArmResult).where(ArmResult.study_id == key).order_by(ArmResult.rank)
            ).all()
            arms = [dict(row.summary or {}) for row in rows]
            started, finished = study.started_at, study.finished_at
    except sa.exc.DBAPIError:  # no tables yet, or a schema to migrate: the run sees to it
        return None
    if sorted(str(a.get("arm")) for a in arms) != sorted(spec.labels):
        return None
    wall = (finished - started).total_seconds() if started and finished else 0.0
    return {
        "study_key": key, "status": StudyStatus.COMPLETED.value, "error": None,
        "stopped": False, "wall_time": wall, "arms": arms,
    }  # fmt: skip


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def run_recorded(
    spec: StudySpec,
    url: str,
    key: str,
    ray_address: str | None,
    err: Any,
    source: StudySource = StudySource.CLI,
    rejoin: Callable[[], str | None] | None = None,
) -> tuple[StudyResult, str, str | None]:
    """Run the study as the row `key` of `ratebench_studies` (of `source`), recorded exactly
    as a scheduler records an API study: claimed and leased (the lease renewed, the progress
    stored, a cancel from the API honoured by `StudyDriver`), and finished with its status
    and leaderboard rows by the scheduler's own `finish_study`. Returns the sweep's result and
    the status and error stored. `rejoin()` gives the Ray address to join when the runtime
    died under the study (default: `ray_address` again); a runtime that was found running
    here may have been replaced by its owner since."""
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
            scheduler_id=f"{source.value}:{socket.gethostname()}:{os.getpid()}",
        )
        try:
            study = queue.start_local(
                engine, key, config.scheduler_id, config.lease, spec.model_dump(mode="json"),
                name=spec.name, task=spec.task, source=source,
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
    again = rejoin if rejoin is not None else lambda: ray_address
    with StudyDriver(engine, key, config) as driver, _progress_bar(err) as bar:

        def update(progress: Progress) -> None:
            driver.on_progress(progress)
            bar(progress)

        while True:
            try:
                result = run_study(
                    spec, url, key, ray_address=ray_address, on_progress=update,
                    should_stop=lambda: driver.lost or driver.cancelled,
                )  # fmt: skip
                break
            except KeyboardInterrupt:
                recorder.finish_study(key, StudyStatus.CANCELLED, driver, error=_INTERRUPTED)
                raise
            except Exception as exc:
                if _resumed_after_fault(exc, recorder, key, driver, again, err):
                    continue
                recorder.finish_study(key, StudyStatus.FAILED, driver, exc=exc)  # if ours
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


def _resumed_after_fault(
    exc: Exception,
    recorder: Any,
    key: str,
    driver: Any,
    rejoin: Callable[[], str | None],
    err: Any,
) -> bool:
    """After a transient fault (`worker.failures.study_fault`), as the scheduler does: note it,
    start Ray again when this process's node died (here, on the main thread), wait a back-off,
    and say True to resume. False: the study fails with `exc` (deterministic, or no longer
    ours). Out of attempts (`RATEBENCH_MAX_ATTEMPTS`): it fails naming every attempt's cause."""
    import time

    from rich.markup import escape

    from service import queue
    from service.config import get_settings
    from service.models import StudyStatus
    from service.scheduler import attempts_error
    from worker import cluster
    from worker.failures import study_fault
    from worker.remote import warm_workers

    fault = study_fault(exc)
    if not fault.retry or driver.lost or driver.cancelled:
        return False
    owner = recorder.config.scheduler_id
    faults = queue.record_fault(recorder.engine, key, owner, fault.error)
    if not faults:
        return False
    max_attempts = get_settings().max_attempts
    if len(faults) >= max_attempts:
        error = attempts_error(faults, max_attempts)
        recorder.finish_study(key, StudyStatus.FAILED, driver, error=error)
        raise CliError(f"study {key}: {error}")
    err.print(f"[yellow]fault:[/yellow] {escape(fault.error)}; resuming the study")
    if not cluster.local_node_alive():
        cluster.reconnect(rejoin(), log_to_driver=False)
        warm_workers()
    time.sleep(min(2.0 ** (len(faults) - 1), 30.0))
    return True


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
            joins = cluster.cluster_to_join(ray_address)
            where = "start a local Ray runtime" if joins is None else f"join Ray at {joins}"
            first = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            raise CliError(f"could not {where}: {first}") from None
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
                else f"best sweep trial {arm.best_value:.4g} @ lr {arm.best_lr:.3g}"
            )
            status = (
                f"{arm.running} running, {arm.pruned} pruned, {arm.diverged} diverged, "
                f"{arm.failed} failed  {best}"
            )
            bars.update(tasks[arm.arm], completed=arm.done, status=status)

    with bars:
        yield update
