"""Sweeps on Ray: a study spec → one Optuna study per arm → trials as Ray tasks → final seeds.

`run_study(spec, storage_url, study_key)` runs every arm's sweep and final seeds, resumes a study
interrupted earlier (same key), stops promptly when `should_stop()` says so, and returns the
leaderboard rows (`worker.summary`).

Storage under concurrency: driver-side ask/tell, not Optuna's gRPC storage proxy.
  The driver (the process calling `run_study`) is the only process that touches the database:
  it asks Optuna for each trial, runs the trial as a Ray task, and tells Optuna the result. Ray
  tasks never open a connection; their per-epoch reports reach the driver through a small Ray
  actor (`worker.remote.Mailbox`), and the driver answers each with the pruner's decision.
  So however many trials run at once, SQLite sees one writer (no "database is locked") and
  PostgreSQL sees one connection pool of at most two connections per running study. We chose
  this over `optuna.storages.run_grpc_proxy_server` + `GrpcStorageProxy` because the proxy is
  one more server to start, secure and keep reachable from every Ray node (a port on the driver
  machine), while Ray already connects the driver to every task; and because with ask/tell the
  driver knows each trial's fate from its Ray ObjectRef.
  The price of ask/tell: Optuna's heartbeat (`heartbeat_interval`,
  `RetryHeartbeatStaleTrialCallback`) only covers `study.optimize`, so we keep our own lease:
  a trial whose worker process dies surfaces as an error on its ObjectRef (Ray monitors its
  workers and nodes), `resources.trial_timeout_s` (by default one derived from the budget,
  `worker.footprint.default_trial_timeout_s`) bounds a trial that hangs, and trials left
  RUNNING by a driver that died are failed and retried when the study is resumed
  (`worker.arms.base`). Retries are new Optuna trials with the same parameters, so they are
  visible in the study; every other trial's result stays as it was.

Retries. A trial is deterministic on its configuration and seed, so what to do with a failure
depends on who caused it (`worker.failures.classify`):
- an exception raised by the trial's own code (a dataset that is missing or unreadable, a model
  or optimizer that cannot be built, a configuration the code refuses) would be raised again
  by every retry: the trial is recorded once as FAIL with `deterministic` set, and not retried;
- a worker process or node that died, an object or actor Ray lost, a trial that ran past
  `resources.trial_timeout_s`, a machine error (out of memory, CUDA, I/O other than a missing
  file), or a driver that died (its RUNNING trials are failed as stale on resume): the trial is
  retried as a new trial with the same parameters while `attempt <= resources.max_retries`;
- a trial the driver itself stopped (`should_stop`, a cancel) is `interrupted` and re-run on
  resume without using up an attempt.
An arm all of whose sweep trials, or all of whose final seeds, failed is `failed` with its first
error; the study then ends `completed_with_errors`, or `failed` when no arm has a result
(`worker.summary.study_outcome`).

Arms share the trial slots (`resources.max_concurrent_trials`) round-robin, so they progress
together; an arm's final seeds start as soon as its own sweep has finished. A scheduler running
several studies passes each a seat at one `worker.slots.TrialGate` (`slots`): the driver asks
its arm for the next job, then waits its turn at the gate (that job shows as running meanwhile,
and counts as interrupted if the study stops first).

A job may hold several trials (an Optuna arm's cohort, `resources.cohort_size`: one Ray task
training them as one batched model): it takes one slot, and its members report under their own
trial keys (`Job.routes`); the driver needs no more than that.

Each tuner's arm is an `ArmRun` (`worker.arms.TUNERS`, each tuner's `arm`); the driver sees only
`ArmRun.next_assignment()` and the `worker.arms.base.Job` contract, and knows no tuner. A
hypergradient arm (`tuner: "hypergradient"`, `worker.arms.hypergradient.arm`) fills one slot with
a single Ray task that runs the whole tuning and reports every meta-iteration through the same
mailbox; its job stores each as a trial of the arm's sweep study.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import ray

from worker import cluster
from worker.arms import TUNERS
from worker.arms.base import FINAL, SWEEP, ArmRun, Job, close_unfinished
from worker.failures import classify
from worker.footprint import DEFAULT_TIMEOUT_BASE_S, default_trial_timeout_s
from worker.remote import Mailbox, Ran, trial_task
from worker.storage import open_storage
from worker.summary import ArmSummary, study_outcome, summarize_arms
from worker.tasks import DataRoots, redact_paths

if TYPE_CHECKING:
    from worker.slots import StudySlots
    from worker.spec import StudySpec

__all__ = [
    "MAILBOX_NAMESPACE",
    "ArmProgress",
    "Progress",
    "StudyResult",
    "TakenOverError",
    "close_study",
    "run_study",
]

log = logging.getLogger(__name__)

_POLL_S = 0.5  # longest wait between checks of should_stop and trial timeouts
# How long a stopping driver waits for Ray to confirm the cancels it sent (normally well under a
# second) before it removes the mailbox; see `_Driver._await_cancels`.
_CANCEL_CONFIRM_S = 10.0


@dataclass
class ArmProgress:
    arm: str
    scheme: str
    budget: int  # sweep trials
    sweep_done: int  # sweep trials finished (retries of a failed trial count once)
    complete: int
    diverged: int
    pruned: int
    failed: int  # failed attempts, retried or not
    running: int
    final_seeds: int
    final_done: int
    best_value: float | None  # best sweep objective so far (diverged excluded)
    best_lr: float | None
    status: str = "running"  # "running", "done" or "failed" (every trial failed)
    error: str | None = None  # the first failed trial's error

    @property
    def done(self) -> int:
        return self.sweep_done + self.final_done


@dataclass
class Progress:
    study_key: str
    trials_done: int
    trials_total: int
    arms: list[ArmProgress] = field(default_factory=list)
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_key": self.study_key,
            "trials_done": self.trials_done,
            "trials_total": self.trials_total,
            "finished": self.finished,
            "arms": {a.arm: asdict(a) for a in self.arms},
        }


@dataclass
class StudyResult:
    study_key: str
    arms: list[ArmSummary]  # ranked, best first
    stopped: bool  # should_stop() ended the run before every arm had finished
    wall_time: float

    @property
    def outcome(self) -> tuple[str, str | None]:
        """`(status, error)`: completed, completed_with_errors or failed (`study_outcome`)."""
        return study_outcome(self.arms)

    def to_dict(self) -> dict[str, Any]:
        status, error = self.outcome
        return {
            "study_key": self.study_key,
            "status": status,
            "error": error,
            "stopped": self.stopped,
            "wall_time": self.wall_time,
            "arms": [a.to_dict() for a in self.arms],
        }


class TakenOverError(RuntimeError):
    """Another driver closed a trial this one was running: the study was resumed elsewhere
    (its lease ran out while this driver was slow, and another scheduler claimed it). This
    driver stops without recording anything more; what the trials did is the other's to keep.
    The caller tells a lost study from a fault of its own by asking who owns the study now."""


MAILBOX_NAMESPACE = "ratebench"


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0]


def _new_mailbox(study_key: str) -> Any:
    """A study's mailbox, on the driver's own node, strictly: placed on another node (which a
    soft affinity allows) it would die with that node, while the driver's node going down ends
    the driver anyway. Named (`mailbox:<study key>:<random>`, namespace `ratebench`) so that an
    operator, a test or the chaos soak can find it; a driver that loses it resumes the study."""
    node = ray.get_runtime_context().get_node_id()
    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)
    name = f"mailbox:{study_key}:{uuid.uuid4().hex[:8]}"
    return Mailbox.options(  # type: ignore[attr-defined]
        scheduling_strategy=strategy, name=name, namespace=MAILBOX_NAMESPACE
    ).remote()


def _ensure_ray(address: str | None) -> None:
    cluster.connect(address, log_to_driver=False)


def _check_resources(spec: StudySpec) -> None:
    """Fail before any trial when no single alive node can hold one (`worker.fit`): Ray would
    keep such a task pending forever, and the cluster's totals hide it."""
    from worker import fit

    fit.check_fit(spec.resources.cpus_per_trial, spec.resources.gpus_per_trial)


def run_study(
    spec: StudySpec,
    storage_url: str,
    study_key: str,
    *,
    ray_address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    slots: StudySlots | None = None,
) -> StudyResult:
    """Run (or resume) every arm of `spec` under `study_key` in the Optuna storage.

    Initialises Ray (`ray_address`, or a local runtime when None) unless it already is.
    `on_progress` is called whenever a trial starts or ends; `should_stop` is polled at least
    every half second and, when it returns True, in-flight trials are cancelled (recorded as
    failed and interrupted, to be re-run on resume) and the results so far are kept.
    `slots` (a seat at a `worker.slots.TrialGate`, shared with the other studies this process
    runs) is asked before each trial starts and given its slot back when the trial ends; None
    starts trials as `resources.max_concurrent_trials` allows. The caller closes it.
    """
    started = time.monotonic()
    storage = open_storage(storage_url)
    try:
        arms = _join_ray_and_open_arms(spec, storage, study_key, ray_address)
        stopped = _Driver(spec, study_key, arms, on_progress, should_stop, slots).run()
        summaries = summarize_arms(storage, study_key, spec)
    finally:
        storage.engine.dispose()
    return StudyResult(study_key, summaries, stopped, time.monotonic() - started)


def close_study(spec: StudySpec, storage_url: str, study_key: str, reason: str) -> int:
    """Fail the trials a study that ended left RUNNING or WAITING (`close_unfinished`); the
    scheduler calls it when a study fails or is cancelled. Returns how many it closed."""
    storage = open_storage(storage_url)
    try:
        return close_unfinished(storage, study_key, spec.labels, reason)
    finally:
        storage.engine.dispose()


def _join_ray_and_open_arms(
    spec: StudySpec, storage: Any, study_key: str, ray_address: str | None
) -> list[ArmRun]:
    """Every arm opened and recovered (`ArmRun.recover`), with Ray joined and able to hold a
    trial. When Ray has yet to start (`ratebench run`), the two overlap: this thread joins Ray,
    which must happen on the main thread (`service.ray_runtime`) and mostly waits for Ray's
    processes, while another opens the arms, which mostly waits for the database."""

    def open_arms() -> list[ArmRun]:
        arms = [_arm_run(spec, i, storage, study_key) for i in range(len(spec.arms))]
        for arm in arms:
            arm.recover()
        return arms

    if ray.is_initialized():
        _check_resources(spec)
        return open_arms()
    with ThreadPoolExecutor(1, thread_name_prefix=f"open-arms-{study_key[:16]}") as pool:
        opened = pool.submit(open_arms)
        _ensure_ray(ray_address)  # on an error, the pool still waits for the arms to open
        _check_resources(spec)
        return opened.result()


def _arm_run(spec: StudySpec, index: int, storage: Any, study_key: str) -> ArmRun:
    """The arm's runner, by its tuner."""
    return TUNERS[spec.arms[index].tuner].arm_run().open(spec, index, storage, study_key)


class _Driver:
    """Hands trials to Ray, relays reports to Optuna, records results; one per run_study."""

    def __init__(
        self,
        spec: StudySpec,
        study_key: str,
        arms: list[ArmRun],
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        slots: StudySlots | None = None,
    ) -> None:
        self.spec, self.study_key, self.arms = spec, study_key, arms
        self.on_progress, self.should_stop, self.slots = on_progress, should_stop, slots
        self.running: dict[ray.ObjectRef, Job] = {}
        self.by_key: dict[str, Job] = {}
        self.nodes: dict[str, str] = {}  # a started job's key → its Ray node id
        self._next_arm = 0
        self._last_progress: dict[str, Any] | None = None
        res = spec.resources
        self.fresh = res.fresh_process if res.fresh_process is not None else res.gpus_per_trial > 0
        self.mailbox: Any = None
        self.pending: Job | None = None  # handed out by its arm, waiting for a slot
        self._default_timeout: float | None = None  # computed once a trial runs long
        self._cancelled: list[ray.ObjectRef] = []  # tasks cancelled at a stop, not yet confirmed
        self._announced: set[str] = set()  # the running jobs whose start message was recorded

    def run(self) -> bool:
        """Drive every arm to its end; True when stopped by should_stop."""
        self.mailbox = _new_mailbox(self.study_key)
        take = self.mailbox.take.remote(_POLL_S)
        try:
            while True:
                if self.should_stop is not None and self.should_stop():
                    self._harvest()  # keep results that are already in
                    self._interrupt("stopped before it finished (study stopped or cancelled)")
                    self._emit()
                    return True
                waiting = self._fill()
                self._emit()
                if not self.running and not waiting:
                    self._emit(finished=True)
                    return False
                ready, _ = ray.wait([take, *self.running], num_returns=1, timeout=_POLL_S)
                if take in ready:
                    self._handle(ray.get(take))
                    take = self.mailbox.take.remote(_POLL_S)
                self._harvest()
                self._check_timeouts()
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            raise self._abandon(exc) from exc
        except BaseException as exc:
            reason = f"stopped before it finished (the driver was interrupted: {_first_line(exc)})"
            try:
                self._interrupt(reason)
            except optuna.exceptions.UpdateFinishedTrialError as closed:
                raise self._abandon(closed) from closed
            except Exception:  # keep the original error; a resume fails these trials as stale
                log.exception("could not record the interrupted trials")
            raise
        finally:
            if self.slots is not None:
                self.slots.withdraw()  # a slot granted but not taken goes to another study
            self._await_cancels()
            with contextlib.suppress(Exception):  # a dead runtime took it already
                ray.kill(self.mailbox)

    def _await_cancels(self) -> None:
        """Wait, up to `_CANCEL_CONFIRM_S`, until Ray has answered the cancels of a stop, so
        that they reach the trials' processes before the mailbox goes. The other order is a
        race: a trial waiting on the mailbox (for the answer to an epoch's report) sees it die,
        ends by itself, and the cancel then finds nothing running, so the process stays alive
        in Ray's pool instead of being killed (seen on a loaded machine)."""
        cancelled, self._cancelled = self._cancelled, []
        if cancelled:
            with contextlib.suppress(Exception):  # a runtime that is gone ended them all
                ray.wait(cancelled, num_returns=len(cancelled), timeout=_CANCEL_CONFIRM_S)

    def _harvest(self) -> None:
        """Record every trial whose task has ended."""
        if self.running:
            done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
            for ref in done:
                self._finish(ref)

    def _fill(self) -> bool:
        """Start trials while slots allow; True while one waits for its turn at `slots`."""
        n = len(self.arms)
        while len(self.running) < self.spec.resources.max_concurrent_trials:
            if self.pending is None:  # asked of Optuna before the slot: a job, or nothing to do
                for offset in range(n):
                    index = (self._next_arm + offset) % n
                    self.pending = self.arms[index].next_assignment()
                    if self.pending is not None:
                        self._next_arm = (index + 1) % n
                        break
                else:
                    return False
            if self.slots is not None and not self.slots.try_acquire():
                return True  # other studies' turn: the gate keeps this one's place in line
            try:
                self._submit(self.pending)
            except BaseException:
                if self.slots is not None:
                    self.slots.release()
                raise  # still pending: recorded as interrupted on the way out
            self.pending = None
        return False

    def _submit(self, a: Job) -> None:
        res = self.spec.resources
        ref = trial_task(
            a.config,
            a.key,
            self.mailbox,
            num_cpus=res.cpus_per_trial,
            num_gpus=res.gpus_per_trial if a.num_gpus is None else a.num_gpus,
            fresh_process=self.fresh,
            awaits_answers=a.awaits_answers,
        )
        a.started = time.monotonic()
        self.running[ref] = a
        self.by_key.update(a.routes())  # a cohort's member trials report under their own keys

    def _handle(self, messages: list[tuple[Any, ...]]) -> None:
        decisions: list[tuple[str, int, bool]] = []
        for message in messages:
            kind, key = message[0], message[1]
            a = self.by_key.get(key)
            if kind == "started" and a is not None:
                a.record_start(*message[2:6])
                self._announced.add(key)
                node = message[5] or {}
                if node.get("ray_node_id"):  # where it runs: a lost node is not its fault
                    self.nodes[a.key] = str(node["ray_node_id"])
            elif kind == "report":  # an epoch's value, a meta-iteration's record, ...
                index, payload = message[2], message[3]
                stop = a.record_report(index, payload) if a is not None else True
                decisions.append((key, index, stop))
            elif kind == "note" and a is not None:  # one that ended records it from its result
                a.record_report(message[2], message[3])
        if decisions:
            self.mailbox.decide.remote(decisions)

    def _release(self, ref: ray.ObjectRef) -> Job:
        a = self.running.pop(ref)
        self._announced.discard(a.key)
        if self.slots is not None:
            self.slots.release()  # every way a trial ends passes here
        for key in a.routes():
            self.by_key.pop(key, None)
            with contextlib.suppress(Exception):  # a dead mailbox answers nobody anyway
                self.mailbox.forget.remote(key)
        return a

    def _finish(self, ref: ray.ObjectRef) -> None:
        announced = self.running[ref].key in self._announced
        a = self._release(ref)
        try:
            ran: Ran = ray.get(ref)
        except ray.exceptions.RayError as exc:
            node = self.nodes.pop(a.key, None)
            failure = classify(exc, node_alive=node is None or cluster.node_alive(node))
            error = redact_paths(failure.error, DataRoots.from_env())  # readers see it
            log.warning("trial %s failed (attempt %d): %s", a.key, a.attempt, error,
                        extra={"trial_id": a.key})  # fmt: skip
            a.record_failure(error, retry=failure.retry, interrupted=failure.infrastructure)
            return
        self.nodes.pop(a.key, None)
        if not announced:  # the task ended before its start message came
            a.record_start(*ran.start)
        a.record_result(ran.result)

    def _trial_timeout(self, oldest: float) -> float | None:
        """`resources.trial_timeout_s`, else the default derived from the budget
        (`worker.footprint`), worked out only once a trial has run as long as its least
        value; None while no trial may have timed out."""
        limit = self.spec.resources.trial_timeout_s
        if limit is not None:
            return limit
        if self._default_timeout is None:
            if oldest < DEFAULT_TIMEOUT_BASE_S:
                return None
            self._default_timeout = default_trial_timeout_s(self.spec)
        return self._default_timeout

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        oldest = max((now - a.started for a in self.running.values()), default=0.0)
        limit = self._trial_timeout(oldest)
        if limit is None:
            return
        for ref, a in list(self.running.items()):
            allowed = limit * a.trials  # per trial: a cohort of K may take K times as long
            if now - a.started > allowed:
                self._cancel(ref, self._release(ref))
                log.warning("trial %s timed out after %g s", a.key, allowed,
                            extra={"trial_id": a.key})  # fmt: skip
                a.record_failure(f"timed out after {allowed:g} s")

    def _interrupt(self, reason: str) -> None:
        """Record every started or pending job as interrupted (re-run on resume without using
        an attempt), and cancel every started job's task. Each job's record comes before its
        cancel, so a runtime that is gone (and answers a cancel with an error) cannot leave a
        trial running in storage.

        Recording fails when the database is gone, which is often why the driver is stopping.
        Every job still gives its slot back and has its task cancelled: a slot kept would count
        against the study's seat at the gate through every later attempt of the study, since
        the scheduler keeps the seat across them (two studies that each kept one on a 2-CPU
        machine waited for each other until the soak gave up), and a task left running would
        train for nobody. Once one record failed the others are not tried (each would wait out
        the same outage); a resume fails them as stale. The first error is raised at the end."""
        jobs: list[tuple[ray.ObjectRef | None, Job]] = []
        if self.pending is not None:  # never started: re-run on resume, like the others
            jobs.append((None, self.pending))
            self.pending = None
        jobs += [(ref, self._release(ref)) for ref in list(self.running)]
        failed: Exception | None = None
        for ref, a in jobs:
            if failed is None:
                try:
                    a.record_failure(reason, interrupted=True)
                except Exception as exc:
                    failed = exc
            if ref is not None:
                self._cancel(ref, a)
        if failed is not None:
            raise failed

    def _cancel(self, ref: ray.ObjectRef, a: Job) -> None:
        try:
            ray.cancel(ref, force=True)
            self._cancelled.append(ref)
        except Exception as exc:  # its node or the runtime is gone: so is the task
            log.info("could not cancel trial %s (%s)", a.key, _first_line(exc))

    def _abandon(self, closed: Exception) -> TakenOverError:
        """Cancel the running tasks and record nothing, since another driver closed one of
        their trials (`closed`): they are that driver's now. Returns the error to raise."""
        self.pending = None
        for ref in list(self.running):
            self._cancel(ref, self._release(ref))
        return TakenOverError(f"study {self.study_key}: another driver closed a trial this one "
                         f"was running ({closed}); the study is being run elsewhere")  # fmt: skip

    def _emit(self, finished: bool = False) -> None:
        if self.on_progress is None:
            return
        progress = self.progress(finished)
        snapshot = progress.to_dict()
        if snapshot != self._last_progress:
            self._last_progress = snapshot
            self.on_progress(progress)

    def progress(self, finished: bool = False) -> Progress:
        budget = self.spec.budget
        arms = []
        for arm in self.arms:
            sweep, final = arm.counts[SWEEP], arm.counts[FINAL]
            best = arm.best
            arms.append(
                ArmProgress(
                    arm=arm.label,
                    scheme=arm.scheme,
                    budget=budget.trials_per_arm,
                    sweep_done=min(sweep.done, budget.trials_per_arm),
                    complete=sweep.complete,
                    diverged=sweep.diverged,
                    pruned=sweep.pruned,
                    failed=sweep.failed + final.failed,
                    running=sweep.running + final.running,
                    final_seeds=budget.final_seeds,
                    final_done=budget.final_seeds if arm.no_final else final.done,
                    best_value=best.value if best is not None else None,
                    best_lr=best.user_attrs.get("lr") if best is not None else None,
                    status="failed" if arm.failed else "done" if arm.done else "running",
                    error=arm.first_error,
                )
            )
        total = len(self.arms) * (budget.trials_per_arm + budget.final_seeds)
        done = sum(a.done for a in arms)
        return Progress(self.study_key, done, total, arms, finished)
