"""The scheduler: claims queued studies and drives them through the worker on Ray.

It runs inside the API process by default (a background thread) or as its own process
(`ratebench scheduler`, the distributed deployment's Ray head). Any number of schedulers may
share a database: `service.queue.claim_next` gives each study to exactly one of them, and the
lease each one renews while it works lets a restarted scheduler resume a study whose scheduler
died. The trials themselves are Ray tasks started by `worker.sweep.run_study`; the scheduler
only records progress, honours cancellation, and stores the leaderboard rows at the end.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from service import queue
from service.db import session_scope
from service.models import ArmResult, StudyRecord, StudyStatus

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    storage_url: str
    ray_address: str | None = None
    poll_seconds: float = 1.0
    lease_seconds: float = 30.0
    scheduler_id: str = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)


class _StudyDriver:
    """Holds the lease of one claimed study while the sweep runs, and answers should_stop.

    A heartbeat thread renews the lease every lease/3 seconds (storing the latest progress),
    independently of the sweep: Ray's start-up or one long trial must not let the lease expire
    while this scheduler is alive, or another scheduler would claim the study a second time.
    """

    def __init__(self, engine: sa.Engine, study_id: str, config: SchedulerConfig) -> None:
        self.engine, self.study_id, self.config = engine, study_id, config
        self.progress: dict[str, Any] | None = None
        self.cancelled = False
        self.lost = False
        self._done = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._renew_until_done, name=f"lease-{study_id[:8]}", daemon=True
        )

    def __enter__(self) -> _StudyDriver:
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
            except sa.exc.SQLAlchemyError:  # a database hiccup: try again at the next beat
                log.warning("study %s: lease renewal failed", self.study_id, exc_info=True)
                continue
            self.lost, self.cancelled = not owned, cancel
            if self.lost:
                return

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
        while not self._stopping.is_set():
            try:
                ran = self.run_once()
            except Exception:  # keep serving other studies; the failure is logged and stored
                log.exception("scheduler iteration failed")
                ran = False
            if not ran:
                self._stopping.wait(self.config.poll_seconds)

    def run_once(self) -> bool:
        """Claim one study and drive it to an end (or to shutdown); False when none waited."""
        study = queue.claim_next(self.engine, self.config.scheduler_id, self.config.lease)
        if study is None:
            return False
        log.info("running study %s (%s), attempt %d", study.id, study.name, study.attempts)
        self._drive(study)
        return True

    def _drive(self, study: StudyRecord) -> None:
        from worker.spec import StudySpec

        spec = StudySpec.model_validate(study.spec)
        with _StudyDriver(self.engine, study.id, self.config) as driver:
            self._run_and_record(study, spec, driver)

    def _run_and_record(self, study: StudyRecord, spec: Any, driver: _StudyDriver) -> None:
        """Run the sweep and store its outcome, all while `driver` holds the lease."""
        from worker.summary import summarize_study
        from worker.sweep import run_study

        try:
            run_study(
                spec,
                self.config.storage_url,
                study.id,
                ray_address=self.config.ray_address,
                on_progress=driver.on_progress,
                should_stop=lambda: driver.should_stop(self._stopping),
            )
        except Exception as exc:  # a failed study is recorded, and the scheduler goes on
            log.exception("study %s failed", study.id)
            with session_scope(self.engine) as session:
                queue.finish(
                    session,
                    study.id,
                    self.config.scheduler_id,
                    StudyStatus.FAILED,
                    error=f"{type(exc).__name__}: {exc}",
                    progress=driver.progress,
                )
            return
        if driver.lost:
            log.warning("study %s: lease lost to another scheduler; stopping", study.id)
            return
        if self._stopping.is_set() and not driver.cancelled:
            queue.release(self.engine, study.id, self.config.scheduler_id)
            return
        status = StudyStatus.CANCELLED if driver.cancelled else StudyStatus.COMPLETED
        summaries = summarize_study(self.config.storage_url, study.id, spec)
        with session_scope(self.engine) as session:
            if queue.finish(
                session, study.id, self.config.scheduler_id, status, progress=driver.progress
            ):
                _store_arm_results(session, study, spec, summaries)
        log.info("study %s %s", study.id, status.value)


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
