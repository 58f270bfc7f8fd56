"""What runs on Ray: the trial task, and the mailbox that carries reports back to the driver.

A task runs one job's work (`worker.arms.base.Work`: a `TrialConfig`, or a hypergradient arm's
tuning or retraining) and never opens the database. Every report of the work — an epoch's
objective `(key, epoch, value)`, a hypergradient meta-iteration `(key, index, record)` — goes
to the `Mailbox` actor; the driver (the only database writer) takes the reports from the
mailbox, hands each to its job (`Job.record_report`: Optuna and its pruner, or a meta-iteration
trial stored), and answers (True stops the work). A task whose answers matter (a pruner may
stop it, a hypergradient arm's tuning) waits for each answer, so each of its reports is
recorded before its result arrives. Any other task (`Job.awaits_answers` False: no pruner,
a final seed) sends its epochs' objectives as notes and trains on: waiting for the driver to
record each epoch cost a short trial a fifth of its time. It sends at most one note a second
(`NOTE_INTERVAL_S`): the driver records the notes that arrive while the trial runs (the
study's live view) and, from the result's history, every epoch that no note brought. The
task also announces its process id, host, start time and machine (`worker.environment.node`)
when it starts, so the trial records where and when it ran (and a test can kill that
process). This module knows no tuner.

Trials that use GPUs run in a fresh worker process each (`max_calls=1`): the process exits
after the trial, so CUDA memory, caches and allocator state never leak into the next trial.
CPU trials reuse worker processes unless the spec asks otherwise (`resources.fresh_process`),
which saves the second or so that importing PyTorch costs per process. Ray's own retries are
off (`max_retries=0`): a retry is a new Optuna trial, visible in the study.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from worker import environment

if TYPE_CHECKING:  # not at run time: a Ray worker process need not import Optuna
    from worker.arms.base import Work

# The shortest time between two notes of a job that awaits no answer (`_MailboxReporter`): the
# live view of a running trial is at most this late, and the driver writes at most one epoch
# per trial and interval while it trains instead of every epoch.
NOTE_INTERVAL_S = 1.0
_clock = time.monotonic  # the notes' clock (a test steps it)

__all__ = ["Mailbox", "Ran", "trial_task", "warm_workers"]


@ray.remote(num_cpus=0, max_restarts=0)
class Mailbox:
    """Reports from running trials to the driver, and the driver's prune decisions back."""

    def __init__(self) -> None:
        self._messages: list[tuple[Any, ...]] = []
        self._answers: dict[tuple[str, int], asyncio.Future[bool]] = {}
        self._arrived: asyncio.Event | None = None

    async def pid(self) -> int:
        """The actor's process id (the chaos soak and the tests kill it by this)."""
        return os.getpid()

    def _event(self) -> asyncio.Event:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        return self._arrived

    async def started(
        self, key: str, pid: int, host: str, at: float, node: dict[str, Any] | None = None
    ) -> None:
        self._messages.append(("started", key, pid, host, at, node))
        self._event().set()

    async def report(self, key: str, index: int, payload: Any) -> bool:
        """A report of a running job (an epoch's value, a meta-iteration's record); answered
        (by `decide`) once the driver recorded it: True stops the job."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._answers[(key, index)] = answer
        self._messages.append(("report", key, index, payload))
        self._event().set()
        return await answer

    async def note(self, key: str, index: int, payload: Any) -> None:
        """A report that needs no answer (`_MailboxReporter` of a job that awaits none)."""
        self._messages.append(("note", key, index, payload))
        self._event().set()

    async def take(self, timeout: float) -> list[tuple[Any, ...]]:
        """The messages so far, waiting up to `timeout` seconds for the first one."""
        if not self._messages:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event().wait(), timeout)
        messages, self._messages = self._messages, []
        self._event().clear()
        return messages

    async def decide(self, decisions: list[tuple[str, int, bool]]) -> None:
        for key, epoch, prune in decisions:
            answer = self._answers.pop((key, epoch), None)
            if answer is not None and not answer.done():
                answer.set_result(prune)

    async def forget(self, key: str) -> None:
        """Drop the unanswered reports of a trial that ended (e.g. its process died)."""
        for pending in [k for k in self._answers if k[0] == key]:
            answer = self._answers.pop(pending)
            if not answer.done():
                answer.set_result(True)


class _MailboxReporter:
    """A job's reports to the mailbox: each waits for its answer when `awaits`, else it is
    sent as a note, at most one per `NOTE_INTERVAL_S`, and the work goes on (never stopped).

    A note is only the study's live view: the result's history brings every epoch, so the notes
    in between can be left out. Each one is a message to the mailbox and a storage transaction
    of the driver, and a short trial's epochs take tens of milliseconds."""

    def __init__(self, mailbox: Any, key: str, awaits: bool) -> None:
        self.mailbox, self.key, self.awaits = mailbox, key, awaits
        self._last_note: float | None = None

    def report(self, index: int, payload: Any) -> bool:
        if not self.awaits:
            now = _clock()
            if self._last_note is None or now - self._last_note >= NOTE_INTERVAL_S:
                self._last_note = now
                self.mailbox.note.remote(self.key, index, payload)
            return False
        return bool(ray.get(self.mailbox.report.remote(self.key, index, payload)))

    def under(self, key: str) -> _MailboxReporter:
        """A reporter for another key of the same job (a cohort's member trial)."""
        return _MailboxReporter(self.mailbox, key, self.awaits)


@dataclass(frozen=True)
class Ran:
    """What a trial task returns: where and when it started (the `started` message's
    arguments after the key) and what its work returned. The start comes back with the result
    because the message may arrive after it: nothing orders a task's notes and its end."""

    start: tuple[int, str, float, dict[str, Any] | None]
    result: Any


def _train(work: Work, key: str, mailbox: Any, awaits: bool) -> Ran:
    start = (os.getpid(), socket.gethostname(), time.time(), environment.node())
    mailbox.started.remote(key, *start)
    return Ran(start, work.run(_MailboxReporter(mailbox, key, awaits)))


_FRESH = ray.remote(max_calls=1, max_retries=0)(_train)
_REUSED = ray.remote(max_calls=0, max_retries=0)(_train)


def trial_task(
    work: Work,
    key: str,
    mailbox: Any,
    *,
    num_cpus: float,
    num_gpus: float,
    fresh_process: bool,
    awaits_answers: bool = True,
) -> ray.ObjectRef:
    """Start one job's work as a Ray task; its ObjectRef resolves to a `Ran`: the task's start
    and what `work.run` returned (a `TrialResult`, or a tuning's `TuneSummary`).
    `awaits_answers` False: its reports are notes, sent without waiting (`Job.awaits_answers`)."""
    remote = _FRESH if fresh_process else _REUSED
    ref: ray.ObjectRef = remote.options(
        num_cpus=num_cpus, num_gpus=num_gpus, name=f"ratebench trial {key}"
    ).remote(work, key, mailbox, awaits_answers)
    return ref


@ray.remote(max_retries=0)
def _import_trial_code() -> int:
    import torch._dynamo  # noqa: F401  (the first optimizer a process builds imports it: ~1 s)

    import worker.cohort_task  # noqa: F401  (and with it PyTorch, optim and the runner)

    return os.getpid()


def warm_workers() -> list[ray.ObjectRef]:
    """Have up to one worker per CPU of the cluster import the trial code now, so that the first
    trials a long-running scheduler starts find it imported (PyTorch alone takes seconds).

    Reused workers keep what they imported (`_REUSED`), and Ray keeps about one idle worker per
    CPU alive, which these become. Fresh-process trials (GPU) gain nothing from it. Returns the
    tasks' refs; nobody needs to wait for them."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return [_import_trial_code.options(num_cpus=1).remote() for _ in range(cpus)]
