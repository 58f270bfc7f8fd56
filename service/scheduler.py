"""The scheduler: claims queued studies and drives them through the worker on Ray.

It runs inside the API process by default (a background thread) or as its own process
(`ratebench scheduler`, the distributed deployment's Ray head). Any number of schedulers may
share a database: `service.queue.claim_next` gives each study to exactly one of them, and the
lease each one renews while it works lets a restarted scheduler resume a study whose scheduler
died. The trials themselves are Ray tasks started by `worker.sweep.run_study`; the scheduler
only records progress, honours cancellation, and stores the leaderboard rows at the end.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa

from service import queue
from service.db import is_unavailable, retry_while_unavailable, session_scope
from service.logs import log_context
from service.metrics import LeaseCounters
from service.models import ArmResult, StudyRecord, StudyStatus

__all__ = ["Scheduler", "SchedulerConfig", "StudyDriver", "final_status"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_BACKOFF_S = 5.0  # longest wait between two tries while the database is down


@dataclass(frozen=True)
class SchedulerConfig:
    storage_url: str
    ray_address: str | None = None
    poll_seconds: float = 1.0
    lease_seconds: float = 30.0
    max_running_per_key: int | None = None  # a key's queued studies wait while it runs this many
    scheduler_id: str = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)


class StudyDriver:
    """Holds the lease of one claimed study while the sweep runs, and answers should_stop.

    A heartbeat thread renews the lease every lease/3 seconds (storing the latest progress),
    independently of the sweep: Ray's start-up or one long trial must not let the lease expire
    while this scheduler is alive, or another scheduler would claim the study a second time.
    """

    def __init__(
        self,
        engine: sa.Engine,
        study_id: str,
        config: SchedulerConfig,
        leases: LeaseCounters | None = None,
    ) -> None:
        self.engine, self.study_id, self.config = engine, study_id, config
        self.leases = leases if leases is not None else LeaseCounters()
        self.progress: dict[str, Any] | None = None
        self.cancelled = False
        self.lost = False
        self._done = threading.Event()
        context = contextvars.copy_context()  # the heartbeat logs with the study's log_context
        self._heartbeat = threading.Thread(
            target=partial(context.run, self._renew_until_done),
            name=f"lease-{study_id[:8]}",
            daemon=True,
        )

    def __enter__(self) -> StudyDriver:
        self._heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._heartbeat.join()

    def _renew_until_done(self) -> None:
        while not self._done.wait(self.config.lease_seconds / 3):
            try:
                owned, cancel = queue.renew_lease(
                    self.engine,
                    self.study_id,
                    self.config.scheduler_id,
                    self.config.lease,
                    self.progress,
                )
            except sa.exc.SQLAlchemyError as exc:  # a database hiccup: try at the next beat
                log.warning("study %s: lease renewal failed (%s)", self.study_id,
                            str(exc).splitlines()[0], exc_info=not is_unavailable(exc))  # fmt: skip
                continue
            self.lost, self.cancelled = not owned, cancel
            if self.lost:
                self.leases.lost()
                return
            self.leases.renewed()

    def on_progress(self, progress: Any) -> None:
        self.progress = progress.to_dict() if hasattr(progress, "to_dict") else dict(progress)

    def should_stop(self, shutting_down: threading.Event) -> bool:
        """Polled by the sweep; reads what the heartbeat last learned."""
        return self.lost or self.cancelled or shutting_down.is_set()


class Scheduler:
    """Claims and runs studies until `stop()`; `run_once()` handles one study (tests)."""

    def __init__(self, engine: sa.Engine, config: SchedulerConfig) -> None:
        self.engine = engine
        self.config = config
        self.leases = LeaseCounters()  # exported by the app's /metrics when it runs here
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        log.info("scheduler %s polling for studies", self.config.scheduler_id)
        idle = self.config.poll_seconds
        while not self._stopping.is_set():
            try:
                ran = self.run_once()
                idle = self.config.poll_seconds
            except Exception as exc:  # keep serving other studies; the failure is logged
                if not is_unavailable(exc):
                    log.exception("scheduler iteration failed")
                else:  # the database is down: poll it less often until it is back
                    log.warning("scheduler: database unavailable (%s)", str(exc).splitlines()[0])
                    idle = min(2 * idle, _MAX_BACKOFF_S)
                ran = False
            if not ran:
                self._stopping.wait(idle)

    def run_once(self) -> bool:
        """Claim one study and drive it to an end (or to shutdown); False when none waited."""
        study = queue.claim_next(
            self.engine,
            self.config.scheduler_id,
            self.config.lease,
            max_running_per_key=self.config.max_running_per_key,
        )
        if study is None:
            return False
        log.info("running study %s (%s), attempt %d", study.id, study.name, study.attempts)
        self._drive(study)
        return True

    def _drive(self, study: StudyRecord) -> None:
        from worker.spec import StudySpec

        spec = StudySpec.from_stored(study.spec)
        with (
            log_context(study_id=study.id),
            StudyDriver(self.engine, study.id, self.config, self.leases) as driver,
        ):
            self._run_and_record(study, spec, driver)

    def _run_and_record(self, study: StudyRecord, spec: Any, driver: StudyDriver) -> None:
        """Run the sweep and store its outcome, all while `driver` holds the lease."""
        from worker.sweep import run_study

        while True:
            try:
                result = run_study(
                    spec,
                    self.config.storage_url,
                    study.id,
                    ray_address=self.config.ray_address,
                    on_progress=driver.on_progress,
                    should_stop=lambda: driver.should_stop(self._stopping),
                )
                break
            except Exception as exc:  # a failed study is recorded, and the scheduler goes on
                if is_unavailable(exc) and not driver.should_stop(self._stopping):
                    self._wait_for_database(study.id, exc)
                    continue  # resume: finished trials are kept, interrupted ones re-run
                log.exception("study %s failed", study.id)
                self._retry(
                    f"study {study.id}: recording the failure",
                    partial(self.finish_study, study.id, StudyStatus.FAILED, driver, exc=exc),
                )
                return
        if driver.lost:
            log.warning("study %s: lease lost to another scheduler; stopping", study.id)
            return
        if self._stopping.is_set() and not driver.cancelled:
            self._retry(
                f"study {study.id}: release",
                lambda: queue.release(self.engine, study.id, self.config.scheduler_id),
            )
            return
        summaries = result.arms  # the leaderboard rows run_study read once the trials ended
        status, error = final_status(driver.cancelled, summaries)
        self._retry(
            f"study {study.id}: recording the result",
            lambda: self.finish_study(
                study.id, status, driver, error=error, store=(study, spec, summaries)
            ),
        )
        log.info("study %s %s", study.id, status.value)

    def finish_study(
        self,
        study_id: str,
        status: StudyStatus,
        driver: StudyDriver,
        *,
        exc: Exception | None = None,
        error: str | None = None,
        store: tuple[StudyRecord, Any, list[Any]] | None = None,
    ) -> None:
        """One transaction: the final status (and the leaderboard rows), so a retry after a
        lost connection writes everything or nothing."""
        if exc is not None:  # readers see it: no server path outside the data roots
            from worker.tasks import DataRoots, redact_paths

            error = redact_paths(f"{type(exc).__name__}: {exc}", DataRoots.from_env())
        with session_scope(self.engine) as session:
            finished = queue.finish(
                session, study_id, self.config.scheduler_id, status,
                error=error, progress=driver.progress,
            )  # fmt: skip
            if finished and store is not None:
                _store_arm_results(session, *store)

    def _retry(self, what: str, action: Callable[[], T]) -> T:
        """`action()`, retried with backoff while the database is unavailable: an outage
        delays a study's bookkeeping, it never fails the study. A scheduler stopping meanwhile
        gives up: the lease expires and the next claim resumes the study."""
        return retry_while_unavailable(action, what, self._stopping, max_delay=_MAX_BACKOFF_S)

    def _wait_for_database(self, study_id: str, exc: Exception) -> None:
        """Block (with backoff) until the database answers again, or the scheduler stops."""
        log.warning("study %s: database unavailable during the sweep (%s); resuming once it "
                    "is back", study_id, str(exc).splitlines()[0])  # fmt: skip
        retry_while_unavailable(
            lambda: _ping(self.engine), f"study {study_id}: waiting for the database",
            self._stopping, max_delay=_MAX_BACKOFF_S,
        )  # fmt: skip


def final_status(cancelled: bool, summaries: list[Any]) -> tuple[StudyStatus, str | None]:
    """A finished study's status and error: cancelled, or what its arms' rows say
    (`worker.summary.study_outcome`: completed, completed_with_errors or failed)."""
    from worker.summary import study_outcome

    status, error = study_outcome(summaries)
    return (StudyStatus.CANCELLED if cancelled else StudyStatus(status)), error


def _ping(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


def _store_arm_results(session: Any, study: StudyRecord, spec: Any, summaries: list[Any]) -> None:
    session.execute(sa.delete(ArmResult).where(ArmResult.study_id == study.id))
    for rank, row in enumerate(summaries, start=1):
        data = row.to_dict()
        session.add(
            ArmResult(
                study_id=study.id,
                task=study.task,
                arm=data["arm"],
                scheme=data["scheme"],
                metric=spec.objective.metric,
                direction=spec.objective.direction,
                rank=rank,
                best_lr=data.get("best_lr"),
                objective_mean=data.get("objective_mean"),
                objective_std=data.get("objective_std"),
                test_mean=data.get("test_mean"),
                n_trials=data.get("n_trials", 0),
                n_diverged=data.get("n_diverged", 0),
                summary=data,
            )
        )
