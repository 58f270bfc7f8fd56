"""What runs on Ray: the trial task, and the mailbox that carries reports back to the driver.

A trial task never opens the database. After each epoch it sends `(trial key, epoch, value)` to
the `Mailbox` actor and waits for the answer; the driver (the only database writer) takes the
reports from the mailbox, records them with Optuna, asks the pruner, and answers. The task also
announces its process id, host and start time when it starts, so the trial records where and
when it ran (and a test can kill that process).

The same task runs a hypergradient arm's jobs (`worker._hypergrad_run`): its tuning sends each
meta-iteration as `(key, index, record)` and waits for the driver to have stored it (the answer
True stops the tuning), so every meta-iteration is recorded before the task's result arrives.

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
from typing import Any

import ray

from worker._hypergrad_run import ScheduleConfig, TuneConfig, TuneSummary
from worker.runner import TrialConfig, TrialResult, run_trial

__all__ = ["Mailbox", "trial_task"]


@ray.remote(num_cpus=0, max_restarts=0)
class Mailbox:
    """Reports from running trials to the driver, and the driver's prune decisions back."""

    def __init__(self) -> None:
        self._messages: list[tuple[Any, ...]] = []
        self._answers: dict[tuple[str, int], asyncio.Future[bool]] = {}
        self._arrived: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        return self._arrived

    async def started(self, key: str, pid: int, host: str, at: float) -> None:
        self._messages.append(("started", key, pid, host, at))
        self._event().set()

    async def report(self, key: str, epoch: int, value: float) -> bool:
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._answers[(key, epoch)] = answer
        self._messages.append(("report", key, epoch, value))
        self._event().set()
        return await answer

    async def take(self, timeout: float) -> list[tuple[Any, ...]]:
        """The messages so far, waiting up to `timeout` seconds for the first one."""
        if not self._messages:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event().wait(), timeout)
        messages, self._messages = self._messages, []
        self._event().clear()
        return messages

    async def meta(self, key: str, index: int, record: dict[str, Any]) -> bool:
        """A hypergradient meta-iteration; answered (by `decide`) once the driver stored it."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._answers[(key, index)] = answer
        self._messages.append(("meta", key, index, record))
        self._event().set()
        return await answer

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
    def __init__(self, mailbox: Any, key: str) -> None:
        self.mailbox, self.key = mailbox, key

    def report(self, epoch: int, value: float) -> bool:
        return bool(ray.get(self.mailbox.report.remote(self.key, epoch, value)))

    def meta(self, index: int, record: dict[str, Any]) -> bool:
        return bool(ray.get(self.mailbox.meta.remote(self.key, index, record)))


Config = TrialConfig | TuneConfig | ScheduleConfig


def _train(config: Config, key: str, mailbox: Any) -> TrialResult | TuneSummary:
    mailbox.started.remote(key, os.getpid(), socket.gethostname(), time.time())
    reporter = _MailboxReporter(mailbox, key)
    if isinstance(config, TrialConfig):
        return run_trial(config, reporter)
    return config.run(reporter)


_FRESH = ray.remote(max_calls=1, max_retries=0)(_train)
_REUSED = ray.remote(max_calls=0, max_retries=0)(_train)


def trial_task(
    config: Config,
    key: str,
    mailbox: Any,
    *,
    num_cpus: float,
    num_gpus: float,
    fresh_process: bool,
) -> ray.ObjectRef:
    """Start one trial (or hypergradient job) as a Ray task; its ObjectRef resolves to the
    `TrialResult` (or the tuning's `TuneSummary`)."""
    remote = _FRESH if fresh_process else _REUSED
    ref: ray.ObjectRef = remote.options(
        num_cpus=num_cpus, num_gpus=num_gpus, name=f"ratebench trial {key}"
    ).remote(config, key, mailbox)
    return ref
