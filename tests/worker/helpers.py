"""What several worker tests share: a small study spec, and another process's view of a
running study."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from service.processes import alive, command_line, descendants
from worker.spec import StudySpec
from worker.storage import open_storage, study_trials


def digits_spec(*layers: dict[str, Any], **changes: Any) -> StudySpec:
    """A study of digits-MLP trials that take a fraction of a second each, with each of
    `layers` and then `changes` applied in turn: a dict merged into the field it replaces when
    both are dicts, any other value replacing it."""
    data: dict[str, Any] = {
        "name": "sweep-test",
        "task": "digits-mlp",
        "data": {"batch_size": 32, "n_train": 256, "n_val": 128, "n_test": 128},
        "model": {"width": 8, "depth": 1},
        "arms": [{"optimizer": "sgd"}],
        "search_space": {"lr": {"low": 0.01, "high": 0.5, "log": True}},
        "budget": {"trials_per_arm": 4, "epochs": 2, "final_seeds": 1},
        "sampler": "random",
        "pruner": "none",
        "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 2, "device": "cpu"},
    }
    for layer in (*layers, changes):
        for key, value in layer.items():
            merge = isinstance(value, dict) and isinstance(data.get(key), dict)
            data[key] = {**data[key], **value} if merge else value
    return StudySpec.model_validate(data)


def watch_running_trials(
    url: str, study_name: str, act: Callable[[list[FrozenTrial]], bool], timeout_s: float = 120
) -> threading.Thread:
    """A started thread that polls `study_name`'s running trials whose task has announced its
    process (`pid`), through its own storage as another process would, and calls `act` with
    them until it returns True or `timeout_s` passes. Join it, then check what `act` did."""

    def watch() -> None:
        storage = open_storage(url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                running = [
                    t
                    for t in study_trials(storage, study_name)
                    if t.state == TrialState.RUNNING and "pid" in t.user_attrs
                ]
                if running and act(running):
                    return
                time.sleep(0.05)
        finally:
            storage.engine.dispose()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def runs_task(pid: int, key: str) -> bool:
    """Whether the process is running the trial task `key` now (a trial's key, or a cohort's):
    Ray titles a worker by its task. A trial's stored `pid` is not enough: a worker takes task
    after task, and the storage learns of a trial's end only when the driver records it."""
    return alive(pid) and task_of(pid) == key


def task_of(pid: int) -> str | None:
    """The key of the trial task the process runs, by the title Ray gives a worker while it
    runs one (`ray::ratebench trial <key>`); None for any other process."""
    title = command_line(pid).split()
    return title[2] if len(title) == 3 and title[:2] == ["ray::ratebench", "trial"] else None


class TaskKiller:
    """A thread that SIGKILLs the first Ray worker process of this test process's runtime whose
    title names a trial task `wanted(key)` accepts (Ray titles a worker `ray::ratebench trial
    <key>` while it runs that task), then stops; `killed` holds its `pid` and `key`.

    It looks at the processes, not at the storage: a trial's process is recorded only when the
    driver takes its start message, which on a busy machine can come after a short trial has
    ended, and the process is then already running the next trial."""

    def __init__(self, wanted: Callable[[str], bool]) -> None:
        self.wanted = wanted
        self.killed: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> TaskKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for pid in descendants(os.getpid()):
                key = task_of(pid)
                if key is None or not self.wanted(key):
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.update(pid=pid, key=key)
                    return
            self._stop.wait(0.02)
