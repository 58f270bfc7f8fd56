"""A real sweep behind a trial gate (worker.slots): it starts no more trials at once than the
gate grants, and gives every slot back however its trials end: completed, failed, timed out,
or stopped."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import pytest
import sqlalchemy as sa
from optuna.exceptions import StorageInternalError

from service.processes import descendants
from tests.worker.helpers import digits_spec, task_of
from worker import storage
from worker.results import TrialRecord, load_trials
from worker.slots import Capacity, TrialGate
from worker.spec import StudySpec
from worker.sweep import Progress, run_study

pytestmark = pytest.mark.ray


def _spec(**changes: Any) -> StudySpec:
    """Two arms, four slots."""
    base: dict[str, Any] = {
        "name": "slots-test",
        "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}],
        "budget": {"trials_per_arm": 3},
        "resources": {"max_concurrent_trials": 4},
    }
    return digits_spec(base, **changes)


def _max_overlap(trials: list[TrialRecord]) -> int:
    """Most trials whose processes ran at the same moment (from their start and durations)."""
    events = []
    for t in trials:
        if "started_at" not in t.user_attrs or "wall_time" not in t.user_attrs:
            continue
        start = t.user_attrs["started_at"]
        end = start + t.user_attrs["setup_time"] + t.user_attrs["wall_time"]
        events += [(end, -1), (start, 1)]
    running = peak = 0
    for _, step in sorted(events):
        running += step
        peak = max(peak, running)
    return peak


def _stop_once_running() -> tuple[Any, Any]:
    since: dict[str, float | None] = {"at": None}

    def on_progress(progress: Progress) -> None:
        if since["at"] is None and sum(a.running for a in progress.arms) >= 2:
            since["at"] = time.monotonic()

    def should_stop() -> bool:
        return since["at"] is not None and time.monotonic() - since["at"] > 2

    return on_progress, should_stop


def test_the_gate_bounds_a_sweep_below_its_own_concurrency(
    ray_runtime: None, sqlite_url: str
) -> None:
    gate = TrialGate(Capacity(1.0))  # two trials of 0.5 CPU, though the spec allows four
    spec = _spec(budget={"trials_per_arm": 2})
    with gate.seat("bounded", "key", Capacity(0.5)) as slots:
        result = run_study(spec, sqlite_url, "bounded", slots=slots)
        assert slots.held == 0 and not slots.waiting
    trials = load_trials(sqlite_url, "bounded", spec)
    assert {t.state for t in trials} == {"COMPLETE"} and len(trials) == 6
    assert _max_overlap(trials) <= 2
    assert [r.n_seeds for r in result.arms] == [1, 1]
    assert gate.in_use == Capacity(0.0) and gate.seats == 0


@pytest.mark.parametrize("ending", ["failed", "timed_out", "stopped"])
def test_every_slot_comes_back_however_the_trials_end(
    ray_runtime: None, sqlite_url: str, ending: str
) -> None:
    gate = TrialGate(Capacity(1.0))
    options: dict[str, Any] = {}
    if ending == "failed":  # a batch larger than the split: every trial raises, no retry
        spec = _spec(data={"batch_size": 8192, "n_train": None}, budget={"trials_per_arm": 2})
    elif ending == "timed_out":  # minutes of training, cut at two seconds, retried once
        spec = _spec(
            budget={"trials_per_arm": 1, "epochs": 100, "steps_per_epoch": 500},
            resources={"trial_timeout_s": 2, "max_retries": 1},
        )
    else:  # stopped while two trials run
        spec = _spec(budget={"epochs": 100, "steps_per_epoch": 500})
        options["on_progress"], options["should_stop"] = _stop_once_running()
    with gate.seat(ending, "key", Capacity(0.5)) as slots:
        result = run_study(spec, sqlite_url, ending, slots=slots, **options)
        assert slots.held == 0 and not slots.waiting, ending  # released by the sweep itself
        assert gate.in_use == Capacity(0.0)
    trials = load_trials(sqlite_url, ending, spec)
    assert trials and all(t.state in {"FAIL", "WAITING"} for t in trials), ending
    if ending == "timed_out":
        assert sum("timed out" in (t.user_attrs.get("error") or "") for t in trials) == 4
    assert result.stopped == (ending == "stopped")
    assert gate.seats == 0


def _causes(exc: BaseException | None) -> str:
    """An error and those it was raised from (Optuna wraps SQLAlchemy's)."""
    lines = []
    while exc is not None:
        lines.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(lines)


def test_a_driver_that_loses_its_database_gives_back_every_slot_and_cancels_its_trials(
    ray_runtime: None, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database goes away (here another connection holds SQLite's write lock) while two
    trials run and a third waits at the gate: the driver cannot record them as interrupted,
    and still gives back every slot and cancels every task. The scheduler keeps a study's seat
    across its attempts, so a slot kept here would be lost to every later attempt: two studies
    that each kept one on a 2-CPU machine once waited for each other for good."""
    monkeypatch.setattr(storage, "SQLITE_TIMEOUT_S", 0.5)  # each write gives up at once
    database = sqlite_url.removeprefix("sqlite:///")
    lock = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    spec = _spec(budget={"epochs": 100, "steps_per_epoch": 500})

    def on_progress(progress: Progress) -> None:
        if not lock.in_transaction and sum(a.running for a in progress.arms) >= 2:
            lock.execute("BEGIN EXCLUSIVE")

    gate = TrialGate(Capacity(1.0))
    try:
        with gate.seat("locked", "key", Capacity(0.5)) as slots:
            with pytest.raises((sa.exc.OperationalError, StorageInternalError)) as stopped:
                run_study(spec, sqlite_url, "locked", slots=slots, on_progress=on_progress)
            assert lock.in_transaction
            assert "database is locked" in _causes(stopped.value)  # not something else
            assert slots.held == 0 and not slots.waiting
            assert gate.in_use == Capacity(0.0)
    finally:
        lock.close()

    def trial_processes() -> list[int]:
        return [p for p in descendants(os.getpid()) if task_of(p) is not None]

    deadline = time.monotonic() + 60
    while trial_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not trial_processes(), "a trial kept training after its driver stopped"
