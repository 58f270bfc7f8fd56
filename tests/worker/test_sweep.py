"""Sweeps on a real local Ray runtime and real databases: concurrency, faults, resume, stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from service.processes import alive, command_line
from tests.worker.helpers import TaskKiller, digits_spec, runs_task, watch_running_trials
from worker.arms.optuna.arm import OptunaArmRun
from worker.results import TrialRecord, load_trials
from worker.spec import StudySpec
from worker.storage import MAX_OVERFLOW, POOL_SIZE, open_storage, study_trials
from worker.sweep import Progress, TakenOverError, run_study

pytestmark = pytest.mark.ray


def _spec(**changes: Any) -> StudySpec:
    """One trial per task: these tests count tasks and order trials (cohorts:
    test_sweep_cohorts.py)."""
    return digits_spec({"resources": {"cohort_size": 1}}, **changes)


def _sweep(trials: list[TrialRecord]) -> list[TrialRecord]:
    return [t for t in trials if t.role == "sweep"]


def _max_overlap(trials: list[TrialRecord]) -> int:
    """Most trials whose processes ran at the same moment (from their start and durations)."""
    events = []
    for t in trials:
        start = t.user_attrs["started_at"]
        end = start + t.user_attrs["setup_time"] + t.user_attrs["wall_time"]
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events):
        running += step
        peak = max(peak, running)
    return peak


def _connections_counter(url: str) -> Callable[[], int]:
    """Connections to the test database other than this counter's own."""
    engine = sa.create_engine(url, poolclass=sa.pool.StaticPool)
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    return count


@pytest.mark.slow
def test_eight_concurrent_trials_with_one_database_writer(
    ray_runtime: None, database_url: str
) -> None:
    spec = _spec(
        arms=[{"optimizer": "sgd"}, {"optimizer": "adam"}],
        # a few seconds each: long enough to overlap when a busy machine staggers their starts
        budget={"trials_per_arm": 4, "epochs": 6, "steps_per_epoch": 400},
        resources={"cpus_per_trial": 0.25, "max_concurrent_trials": 8},
    )
    postgres = database_url.startswith("postgresql")
    count = _connections_counter(database_url) if postgres else None
    in_flight: list[int] = []
    connections: list[int] = []

    def on_progress(progress: Progress) -> None:
        in_flight.append(sum(a.running for a in progress.arms))
        if count is not None:
            connections.append(count())

    result = run_study(spec, database_url, "conc", on_progress=on_progress)

    assert max(in_flight) == 8
    trials = load_trials(database_url, "conc", spec)
    assert len(_sweep(trials)) == 8 and len(trials) == 10
    assert {t.state for t in trials} == {"COMPLETE"}, [t.user_attrs.get("error") for t in trials]
    # The tasks really ran side by side: all 8 at once on an idle machine; on a busy one Ray
    # starts worker processes two at a time (one per CPU), so a trial may end before the last
    # one starts (3 at once was seen next to two busy loops). One at a time would be the fault.
    assert _max_overlap(_sweep(trials)) >= 2
    assert [r.n_seeds for r in result.arms] == [1, 1]
    # No pruner: the trials reported without waiting, and every epoch's objective is stored,
    # as it arrived or from the trial's result.
    for t in trials:
        stored = t.intermediate_values
        assert stored == {r["epoch"]: r["val_accuracy"] for r in t.user_attrs["history"]}, t.number
        assert sorted(stored) == [1, 2, 3, 4, 5, 6]
    if postgres:
        assert 0 < max(connections) <= POOL_SIZE + MAX_OVERFLOW


@pytest.mark.slow
def test_a_killed_trial_is_failed_and_retried_and_the_others_stay_intact(
    ray_runtime: None, sqlite_url: str
) -> None:
    # Trials of a few seconds (6 × 300 steps), so that the killer finds one still training
    # on a busy machine: no report holds a trial back (no pruner).
    spec = _spec(
        budget={"epochs": 6, "steps_per_epoch": 300},
        resources={"max_retries": 1},
    )
    with TaskKiller(lambda key: key.startswith("sgd/sweep/")) as killer:
        result = run_study(spec, sqlite_url, "fault")

    assert killer.killed, "no running trial was found to kill"
    sweep = {t.number: t for t in _sweep(load_trials(sqlite_url, "fault", spec))}
    victim = sweep[int(killer.killed["key"].rsplit("/", 1)[1])]
    assert victim.state == "FAIL" and victim.outcome == "failed"
    assert "worker process" in victim.user_attrs["error"]
    (retry,) = [t for t in sweep.values() if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == "COMPLETE" and retry.user_attrs["attempt"] == 2
    assert retry.params == victim.params
    others = [t for t in sweep.values() if t.number not in (victim.number, retry.number)]
    assert len(others) == 3 and all(t.state == "COMPLETE" for t in others)
    assert result.arms[0].n_failed == 1 and result.arms[0].n_seeds == 1


@pytest.mark.slow
def test_an_interrupted_study_resumes_instead_of_restarting(
    ray_runtime: None, sqlite_url: str
) -> None:
    spec = _spec(budget={"trials_per_arm": 6})
    done = {"n": 0}

    def on_progress(progress: Progress) -> None:
        done["n"] = progress.arms[0].sweep_done

    first = run_study(
        spec, sqlite_url, "resume", on_progress=on_progress, should_stop=lambda: done["n"] >= 2
    )
    assert first.stopped
    before = {t.number: t for t in load_trials(sqlite_url, "resume", spec)}
    assert 2 <= sum(t.state == "COMPLETE" for t in before.values()) < 6
    # A driver that died left a trial RUNNING:
    storage = open_storage(sqlite_url)
    stale = optuna.load_study(study_name="resume/sgd", storage=storage).ask(
        {"lr": FloatDistribution(0.01, 0.5, log=True)}
    )
    storage.engine.dispose()

    second = run_study(spec, sqlite_url, "resume")

    assert not second.stopped
    after = {t.number: t for t in load_trials(sqlite_url, "resume", spec) if t.role == "sweep"}
    for number, t in before.items():
        if t.role == "sweep" and t.state == "COMPLETE":
            assert (after[number].state, after[number].value) == ("COMPLETE", t.value)
    assert after[stale.number].state == "FAIL"
    assert "stale" in after[stale.number].user_attrs["error"]
    retried = {t.user_attrs.get("retry_of") for t in after.values()}
    assert stale.number in retried
    for t in after.values():
        if t.user_attrs.get("interrupted"):
            assert t.number in retried
    originals = [t for t in after.values() if "retry_of" not in t.user_attrs]
    assert len(originals) == 6
    assert sum(t.state == "COMPLETE" for t in after.values()) == 6
    assert second.arms[0].n_seeds == 1


def test_should_stop_cancels_running_trials_promptly(ray_runtime: None, sqlite_url: str) -> None:
    spec = _spec(budget={"epochs": 100, "steps_per_epoch": 500})
    running: dict[str, float | None] = {"since": None}

    def on_progress(progress: Progress) -> None:
        if progress.arms[0].running == 2 and running["since"] is None:
            running["since"] = time.monotonic()

    def should_stop() -> bool:
        return running["since"] is not None and time.monotonic() - running["since"] > 3

    result = run_study(spec, sqlite_url, "stop", on_progress=on_progress, should_stop=should_stop)
    stopped_after = time.monotonic() - (running["since"] or 0) - 3

    assert result.stopped and stopped_after < 20  # a trial alone would take minutes
    trials = _sweep(load_trials(sqlite_url, "stop", spec))
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 2 and all(t.state == "FAIL" for t in interrupted)
    assert sum(t.state == "WAITING" for t in trials) == 2  # their re-runs, for a resume
    pids = [t.user_attrs["pid"] for t in interrupted if "pid" in t.user_attrs]
    _wait_until_no_trial_runs_in(pids, 30, "the cancelled trials")


def test_a_driver_whose_trials_another_driver_closed_stops_and_writes_nothing_more(
    ray_runtime: None, sqlite_url: str
) -> None:
    """A lease ran out while this driver was slow and another scheduler resumed the study: its
    recovery closes this driver's running trials as stale and enqueues their retries. This
    driver must stop at its next write with `TakenOverError` (which the scheduler tells from a
    failure), not fail the study, and must not touch the other driver's trials."""
    # Trials of tens of seconds: the other driver must close them while they run, however
    # slowly it opens the study on a busy machine. This driver stops at its next write (the
    # next epoch's report), so their length costs the test nothing.
    spec = _spec(budget={"epochs": 100, "steps_per_epoch": 200})
    closed: list[int] = []

    def resume_elsewhere(running: list[FrozenTrial]) -> bool:
        if len(running) < 2:  # both trials started
            return False
        storage = open_storage(sqlite_url)
        OptunaArmRun.open(spec, 0, storage, "taken").recover()  # a second driver's first step
        storage.engine.dispose()
        closed.extend(t.number for t in running)
        return True

    other = watch_running_trials(sqlite_url, "taken/sgd", resume_elsewhere)
    with pytest.raises(TakenOverError, match="another driver closed a trial"):
        run_study(spec, sqlite_url, "taken")
    other.join()
    assert len(closed) == 2
    trials = {t.number: t for t in _sweep(load_trials(sqlite_url, "taken", spec))}
    for number in closed:
        assert trials[number].state == "FAIL"
        # the other driver's words; the loser, writing nothing more, never replaced them with
        # its own ("stopped before it finished ...")
        assert trials[number].user_attrs["error"].startswith("stale:")
    retries = [t for t in trials.values() if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(closed)
    assert all(t.state == "WAITING" for t in retries)  # left for the other driver
    pids = [trials[n].user_attrs["pid"] for n in closed]
    _wait_until_no_trial_runs_in(pids, 60, "the abandoned trials")


def _wait_until_no_trial_runs_in(pids: list[int], timeout: float, what: str) -> None:
    """Wait until none of `pids` runs a trial any more: each process has ended (a force-cancel
    kills it) or is an idle worker of Ray's pool. The second happens when a trial ends by
    itself before the cancel reaches it (its mailbox gone, say): the cancel then finds nothing
    to kill, and Ray keeps the process for later tasks, titled `ray::IDLE`."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _runs_a_trial(pid)]
        time.sleep(0.1)
    assert not pids, f"{what} still run: " + ", ".join(
        f"{pid} ({_state(pid)}, {command_line(pid).strip()!r})" for pid in pids
    )


def _runs_a_trial(pid: int) -> bool:
    return alive(pid) and command_line(pid).startswith("ray::ratebench trial")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_the_pruner_stops_a_bad_rate_through_the_driver(ray_runtime: None, sqlite_url: str) -> None:
    spec = _spec(
        search_space={"lr": {"low": 1e-6, "high": 1.0, "log": True}},
        budget={"trials_per_arm": 2, "epochs": 4},
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_epochs": 0},
        resources={"max_concurrent_trials": 1},
    )
    storage = open_storage(sqlite_url)
    study = optuna.create_study(study_name="prune/sgd", storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 0.3})  # runs first and learns
    study.enqueue_trial({"lr": 1e-6})  # then a rate that cannot learn
    storage.engine.dispose()

    run_study(spec, sqlite_url, "prune")

    good, bad = _sweep(load_trials(sqlite_url, "prune", spec))
    assert (good.state, bad.state) == ("COMPLETE", "PRUNED")
    assert bad.outcome == "pruned" and len(bad.user_attrs["history"]) < 4
    assert list(bad.intermediate_values) == list(range(1, len(bad.user_attrs["history"]) + 1))
    assert list(good.intermediate_values) == [1, 2, 3, 4]


def test_a_deterministic_error_is_tried_once_and_the_arm_fails(
    ray_runtime: None, sqlite_url: str
) -> None:
    # 8192 examples per batch is more than the digits training split holds: run_trial raises,
    # and would raise again on every retry.
    spec = _spec(
        data={"batch_size": 8192, "n_train": None},
        budget={"trials_per_arm": 2},
        resources={"max_retries": 2},
    )
    result = run_study(spec, sqlite_url, "fails")
    trials = load_trials(sqlite_url, "fails", spec)
    assert len(trials) == 2 and {t.state for t in trials} == {"FAIL"}  # 2 originals, no retry
    assert all(t.user_attrs["attempt"] == 1 and t.user_attrs["deterministic"] for t in trials)
    assert all("data.batch_size" in t.user_attrs["error"] for t in trials)
    (row,) = result.arms
    assert (row.n_failed, row.n_seeds, row.best_lr) == (2, 0, None)
    assert row.status == "failed" and row.error is not None and "data.batch_size" in row.error
    status, error = result.outcome
    assert status == "failed" and error is not None and error.startswith("arm sgd failed: ")


@pytest.mark.slow
def test_a_worker_that_keeps_dying_is_retried_up_to_the_limit(
    ray_runtime: None, sqlite_url: str
) -> None:
    """An infrastructure error is retried: every attempt's worker process is killed, so the
    trial runs 1 + max_retries times, and then the arm ends (failed, with the first error).
    Each attempt would train for many seconds (30 epochs): it must still run when the killer
    first sees it, as no report holds a trial back (no pruner)."""
    spec = _spec(
        budget={"trials_per_arm": 1, "epochs": 30, "steps_per_epoch": 300},
        resources={"max_retries": 1, "max_concurrent_trials": 1},
    )
    killed: list[int] = []
    done = threading.Event()

    def kill_every_running_trial() -> None:
        storage = open_storage(sqlite_url)
        deadline = time.monotonic() + 120
        try:
            while not done.is_set() and time.monotonic() < deadline:
                for t in study_trials(storage, "dying/sgd"):
                    running = t.state == TrialState.RUNNING and "pid" in t.user_attrs
                    if running and t.number not in killed:
                        pid = t.user_attrs["pid"]
                        if not runs_task(pid, f"sgd/sweep/{t.number}"):
                            continue  # not started yet, or its process is between trials
                        os.kill(pid, signal.SIGKILL)
                        killed.append(t.number)
                time.sleep(0.05)
        finally:
            storage.engine.dispose()

    killer = threading.Thread(target=kill_every_running_trial)
    killer.start()
    try:
        result = run_study(spec, sqlite_url, "dying")
    finally:
        done.set()
        killer.join()

    trials = _sweep(load_trials(sqlite_url, "dying", spec))
    assert killed == [t.number for t in trials]  # every attempt was killed, no third one
    first, retry = trials
    assert [first.user_attrs["attempt"], retry.user_attrs["attempt"]] == [1, 2]
    assert retry.user_attrs["retry_of"] == first.number and retry.params == first.params
    for t in trials:
        assert t.state == "FAIL" and "worker process" in t.user_attrs["error"]
        assert "deterministic" not in t.user_attrs
    (row,) = result.arms
    assert row.status == "failed" and row.error == first.user_attrs["error"]


@pytest.mark.slow
def test_fresh_process_runs_every_trial_in_its_own_worker(
    ray_runtime: None, sqlite_url: str
) -> None:
    spec = _spec(
        budget={"trials_per_arm": 2}, resources={"fresh_process": True, "max_concurrent_trials": 1}
    )
    run_study(spec, sqlite_url, "fresh")
    pids = [t.user_attrs["pid"] for t in load_trials(sqlite_url, "fresh", spec)]
    assert len(pids) == 3 and len(set(pids)) == 3  # two sweep trials and a final seed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_trials_run_on_the_gpu_in_fresh_processes(ray_runtime: None, sqlite_url: str) -> None:
    spec = _spec(
        budget={"trials_per_arm": 3},
        resources={"gpus_per_trial": 0.5, "device": "auto", "max_concurrent_trials": 2},
    )
    run_study(spec, sqlite_url, "gpu")
    trials = load_trials(sqlite_url, "gpu", spec)
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}
    assert len({t.user_attrs["pid"] for t in trials}) == len(trials)
