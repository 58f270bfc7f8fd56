"""The scheduler: claims queued studies and drives them through the worker on Ray.

It runs inside the API process by default (a background thread) or as its own process
(`ratebench scheduler`, the distributed deployment's Ray head). Any number of schedulers may
share a database: `service.queue.claim_next` gives each study to exactly one of them, and the
lease each one renews while it works lets a restarted scheduler resume a study whose scheduler
died. The trials themselves are Ray tasks started by `worker.sweep.run_study`; the scheduler
only records progress, honours cancellation, and stores the leaderboard rows at the end.

One scheduler drives up to `max_running_studies` studies at once, each in its own thread with
its own `StudyDriver` (lease, heartbeat, cancel), so one long study no longer keeps a small one
queued, and a cancel, a lost lease or a failure touches only its own study. The running studies
share the cluster through one `worker.slots.TrialGate`: when their trials want more CPUs or
GPUs than Ray has, the next trial slot goes round-robin over API keys, then over a key's
studies. Only the polling thread claims, so `max_running_per_key` (checked by the claim) and
`max_running_studies` both hold.

Faults never fail a study. When a sweep stops with an error, `worker.failures.study_fault`
says whether it was transient (a Ray runtime, node or actor lost, the cluster not ready) or
deterministic (the spec, data or model refused). A transient fault is noted on the study
(`faults`), the Ray runtime is started again when this process's node died (`RayRuntime`,
on the main thread, once every study has stepped out of Ray), and the study is resumed from
its storage after a back-off: finished trials are kept, interrupted ones re-run. A study that
faults end `max_attempts` times fails, and its error names every attempt's cause. A study
that ends failed or cancelled has whatever trials it left running or waiting closed in its
Optuna studies (`worker.sweep.close_study`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from service import queue
from service.db import is_unavailable, retry_while_unavailable, session_scope
from service.logs import log_context
from service.metrics import LeaseCounters
from service.models import ArmResult, StudyRecord, StudyStatus
from worker.slots import Capacity, StudySlots, TrialGate

if TYPE_CHECKING:
    from service.ray_runtime import RayRuntime

__all__ = ["Scheduler", "SchedulerConfig", "StudyDriver", "attempts_error", "final_status"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_BACKOFF_S = 5.0  # longest wait between two tries while the database is down
_MAX_FAULT_BACKOFF_S = 30.0  # longest wait before a study resumes after a transient fault
_RAY_QUIET_TIMEOUT_S = 180.0  # longest wait for the studies to step out of a dead runtime
_RAY_WATCH_S = 5.0  # how often the polling thread checks that Ray's node is alive


@dataclass(frozen=True)
class SchedulerConfig:
    storage_url: str
    ray_address: str | None = None
    poll_seconds: float = 1.0
    lease_seconds: float = 30.0
    max_running_per_key: int | None = None  # a key's queued studies wait while it runs this many
    max_running_studies: int = 4  # studies this scheduler drives at once, each in its own thread
    max_attempts: int = 8  # attempts of a study that transient faults may end before it fails
    scheduler_id: str = f"{socket.gethostname()}:{os.getpid()}"

    def __post_init__(self) -> None:
        if self.max_running_studies < 1:
            raise ValueError(f"max_running_studies: {self.max_running_studies}; at least 1")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: {self.max_attempts}; at least 1")

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
    """Claims studies and drives up to `max_running_studies` of them at once, each in its own
    thread, until `stop()`; `run_once()` claims one study and drives it in the caller (tests)."""

    def __init__(
        self,
        engine: sa.Engine,
        config: SchedulerConfig,
        gate: TrialGate | None = None,
        ray: RayRuntime | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.ray = ray  # restarts a dead runtime; None: faults are resumed on the same one
        self._in_ray = 0  # study threads inside `run_study`
        self._ray_quiet = threading.Condition()
        self._ray_down = threading.Event()  # set while a dead runtime is being replaced
        self._ray_checked = time.monotonic()  # when the polling thread last looked at Ray
        self.leases = LeaseCounters()  # exported by the app's /metrics when it runs here
        self.gate = gate if gate is not None else TrialGate()  # the running studies' trials
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a study ended, or stop() was called
        self._thread: threading.Thread | None = None
        self._studies: dict[str, threading.Thread] = {}  # id → the thread driving it
        self._lock = threading.Lock()

    @property
    def running(self) -> list[str]:
        """The ids of the studies this scheduler is driving now."""
        with self._lock:
            return [study_id for study_id, t in self._studies.items() if t.is_alive()]

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop claiming, and stop every running study (each is released for the next claim,
        or recorded cancelled if it was being cancelled); waits up to `timeout` seconds."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        log.info("scheduler %s polling for studies (up to %d at once)",
                 self.config.scheduler_id, self.config.max_running_studies)  # fmt: skip
        idle = self.config.poll_seconds
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                self._watch_ray()
                if len(self.running) >= self.config.max_running_studies:
                    self._wake.wait(self.config.poll_seconds)  # until a study ends
                    continue
                try:
                    study = self._claim()
                    idle = self.config.poll_seconds
                except Exception as exc:  # keep serving the running studies; it is logged
                    if not is_unavailable(exc):
                        log.exception("scheduler iteration failed")
                    else:  # the database is down: poll it less often until it is back
                        log.warning("scheduler: database unavailable (%s)",
                                    str(exc).splitlines()[0])  # fmt: skip
                        idle = min(2 * idle, _MAX_BACKOFF_S)
                    study = None
                if study is None:
                    self._stopping.wait(idle)
                    continue
                self._start(study)  # and claim again at once: more may be waiting
        finally:
            self._join_studies()

    def _watch_ray(self) -> None:
        """Every `_RAY_WATCH_S`, bring back a runtime whose node died while no study used it
        (a study that uses it notices by itself), so the next claimed study finds Ray up."""
        now = time.monotonic()
        if self.ray is None or now - self._ray_checked < _RAY_WATCH_S:
            return
        self._ray_checked = now
        from worker import cluster

        if self.ray.ask(cluster.local_node_alive) is False:  # None: restarting or not connected
            log.warning("the Ray runtime's node is gone; starting Ray again before the next claim")
            self._recover_ray(self.ray.generation)

    def run_once(self) -> bool:
        """Claim one study and drive it to an end (or to shutdown) in this thread; False when
        none waited."""
        study = self._claim()
        if study is None:
            return False
        self._drive(study)
        return True

    def _claim(self) -> StudyRecord | None:
        study = queue.claim_next(
            self.engine,
            self.config.scheduler_id,
            self.config.lease,
            max_running_per_key=self.config.max_running_per_key,
            driving=self.running,
        )
        if study is not None:
            log.info("running study %s (%s), attempt %d", study.id, study.name, study.attempts)
        return study

    def _start(self, study: StudyRecord) -> None:
        thread = threading.Thread(
            target=self._drive_in_thread, args=(study,), name=f"study-{study.id[:8]}", daemon=True
        )
        with self._lock:
            self._studies = {i: t for i, t in self._studies.items() if t.is_alive()}
            self._studies[study.id] = thread
        thread.start()

    def _drive_in_thread(self, study: StudyRecord) -> None:
        try:
            self._drive(study)
        except Exception:  # the other studies go on; the lease expires and a claim resumes it
            log.exception("study %s: driving it failed", study.id)
        finally:
            self._wake.set()

    def _join_studies(self) -> None:
        """Wait for every study thread: each sees the stop within a poll, and releases its
        study (or records its cancellation) before it ends."""
        with self._lock:
            threads = list(self._studies.values())
        for thread in threads:
            thread.join()

    def _drive(self, study: StudyRecord) -> None:
        from worker.spec import StudySpec

        spec = StudySpec.from_stored(study.spec)
        trial = Capacity(spec.resources.cpus_per_trial, spec.resources.gpus_per_trial)
        with (
            log_context(study_id=study.id),
            StudyDriver(self.engine, study.id, self.config, self.leases) as driver,
            self.gate.seat(study.id, study.api_key_id, trial) as slots,
        ):
            if len(study.faults or []) >= self.config.max_attempts:  # it kept killing drivers
                self._give_up(study.id, spec, driver, study.faults or [])
                return
            self._run_and_record(study, spec, driver, slots)

    def _run_and_record(
        self, study: StudyRecord, spec: Any, driver: StudyDriver, slots: StudySlots | None = None
    ) -> None:
        """Run the sweep and store its outcome, all while `driver` holds the lease; resume it
        after a database outage or a transient fault."""
        from worker.failures import study_fault
        from worker.sweep import run_study

        while True:
            generation = self.ray.generation if self.ray is not None else 0
            try:
                with self._using_ray():
                    result = run_study(
                        spec,
                        self.config.storage_url,
                        study.id,
                        ray_address=self.config.ray_address,
                        on_progress=driver.on_progress,
                        should_stop=lambda: (
                            driver.should_stop(self._stopping) or self._ray_down.is_set()
                        ),
                        slots=slots,
                    )
                    for_ray = result.stopped and self._ray_down.is_set()  # before it clears
                if not for_ray or driver.should_stop(self._stopping):
                    break
                fault: Exception = ConnectionError("the Ray runtime's node died; Ray restarted")
            except Exception as exc:  # a failed study is recorded, and the scheduler goes on
                if is_unavailable(exc) and not driver.should_stop(self._stopping):
                    self._wait_for_database(study.id, exc)
                    if self._lost(study.id, driver):  # another claimed it during the outage
                        log.warning("study %s: lease lost during the outage; stopping", study.id)
                        return
                    continue  # resume: finished trials are kept, interrupted ones re-run
                if self._lost(study.id, driver):  # another scheduler's driver closed a trial
                    log.warning("study %s: lease lost to another scheduler, which runs it now "
                                "(%s); stopping", study.id, exc)  # fmt: skip
                    return
                if not study_fault(exc).retry or driver.should_stop(self._stopping):
                    log.exception("study %s failed", study.id)
                    self._fail(study.id, spec, driver, exc)
                    return
                fault = exc
            if not self._resume_after(study.id, spec, driver, fault, generation):
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
        if status is StudyStatus.CANCELLED:
            self._close_trials(study.id, spec, "the study was cancelled")
        self._retry(
            f"study {study.id}: recording the result",
            lambda: self.finish_study(
                study.id, status, driver, error=error, store=(study, spec, summaries)
            ),
        )
        log.info("study %s %s", study.id, status.value)

    def _resume_after(
        self, study_id: str, spec: Any, driver: StudyDriver, fault: Exception, generation: int
    ) -> bool:
        """A transient fault ended this attempt: note it, bring Ray back if its node died, and
        wait a back-off. True: resume the study; False: it was given up (or lost) here."""
        from worker.failures import study_fault

        error = study_fault(fault).error
        log.warning("study %s: a transient fault stopped it (%s); resuming", study_id, error)
        faults = self._retry(
            f"study {study_id}: noting a fault",
            lambda: queue.record_fault(self.engine, study_id, self.config.scheduler_id, error),
        )
        if not faults:  # no longer ours
            return False
        if len(faults) >= self.config.max_attempts:
            self._give_up(study_id, spec, driver, faults)
            return False
        self._recover_ray(generation)
        delay = min(2.0 ** (len(faults) - 1), _MAX_FAULT_BACKOFF_S)
        return not self._stopping.wait(delay) and not driver.should_stop(self._stopping)

    @contextlib.contextmanager
    def _using_ray(self) -> Iterator[None]:
        """Count a study thread in Ray; none enters while a dead runtime is being replaced."""
        with self._ray_quiet:
            self._ray_quiet.wait_for(lambda: not self._ray_down.is_set())
            self._in_ray += 1
        try:
            yield
        finally:
            with self._ray_quiet:
                self._in_ray -= 1
                self._ray_quiet.notify_all()

    def _recover_ray(self, generation: int) -> None:
        """When the Ray runtime this process drives died, stop every study's use of it (their
        drivers see `_ray_down` within a poll and interrupt their trials), then have the main
        thread start a new one (`RayRuntime.recover`). A no-op when only an actor was lost."""
        if self.ray is None or self.ray.generation != generation:
            return
        from worker import cluster

        if self.ray.ask(cluster.local_node_alive):  # only an actor or an object was lost
            return
        self._ray_down.set()
        try:
            with self._ray_quiet:
                if not self._ray_quiet.wait_for(lambda: self._in_ray == 0, _RAY_QUIET_TIMEOUT_S):
                    log.warning("studies still in Ray after %g s; restarting it regardless",
                                _RAY_QUIET_TIMEOUT_S)  # fmt: skip
            self.ray.recover(generation)
        finally:
            with self._ray_quiet:
                self._ray_down.clear()
                self._ray_quiet.notify_all()

    def _fail(self, study_id: str, spec: Any, driver: StudyDriver, exc: Exception) -> None:
        self._close_trials(study_id, spec, f"the study failed: {type(exc).__name__}")
        self._retry(
            f"study {study_id}: recording the failure",
            partial(self.finish_study, study_id, StudyStatus.FAILED, driver, exc=exc),
        )

    def _give_up(
        self, study_id: str, spec: Any, driver: StudyDriver, faults: list[dict[str, Any]]
    ) -> None:
        error = attempts_error(faults, self.config.max_attempts)
        log.error("study %s: %s", study_id, error)
        self._close_trials(study_id, spec, "the study ran out of attempts")
        self._retry(
            f"study {study_id}: recording the failure",
            partial(self.finish_study, study_id, StudyStatus.FAILED, driver, error=error),
        )

    def _close_trials(self, study_id: str, spec: Any, reason: str) -> None:
        """Fail the trials the ending study left running or waiting (best effort: a study
        whose storage cannot be reached keeps them, and says so in the log)."""
        from worker.sweep import close_study

        try:
            closed = close_study(spec, self.config.storage_url, study_id, reason)
        except Exception:
            log.warning("study %s: could not close its unfinished trials", study_id,
                        exc_info=True)  # fmt: skip
            return
        if closed:
            log.info("study %s: closed %d unfinished trials (%s)", study_id, closed, reason)

    def _lost(self, study_id: str, driver: StudyDriver) -> bool:
        """The lease is gone (the heartbeat saw it, or the database says another owns it)."""
        if driver.lost:
            return True
        try:
            lost = not queue.owns(self.engine, study_id, self.config.scheduler_id)
        except sa.exc.SQLAlchemyError:
            return False  # cannot tell: record the failure, which only an owner can
        if lost:
            self.leases.lost()  # the heartbeat, stopping with the driver, will not count it
        return lost

    def finish_study(
        self,
        study_id: str,
        status: StudyStatus,
        driver: StudyDriver | None,
        *,
        exc: Exception | None = None,
        error: str | None = None,
        store: tuple[StudyRecord, Any, list[Any]] | None = None,
    ) -> None:
        """One transaction: the final status (and the leaderboard rows), so a retry after a
        lost connection writes everything or nothing. `driver` None: a study that ended before
        its driver began (no progress to keep)."""
        if exc is not None:  # readers see it: no server path outside the data roots
            from worker.tasks import DataRoots, redact_paths

            error = redact_paths(f"{type(exc).__name__}: {exc}", DataRoots.from_env())
        with session_scope(self.engine) as session:
            finished = queue.finish(
                session, study_id, self.config.scheduler_id, status,
                error=error, progress=None if driver is None else driver.progress,
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


def attempts_error(faults: list[dict[str, Any]], max_attempts: int) -> str:
    """The error of a study that faults ended `max_attempts` times: every attempt's cause."""
    causes = "; ".join(f"attempt {f.get('attempt')}: {f.get('error')}" for f in faults)
    return (f"gave up after {len(faults)} attempts ended by faults "
            f"(RATEBENCH_MAX_ATTEMPTS={max_attempts}): {causes}")  # fmt: skip


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
