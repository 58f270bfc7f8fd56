"""Sweeps whose trials train in cohorts (`resources.cohort_size`), on a real local Ray runtime.

A cohort is K trials of one arm in one Ray task (`worker.cohort_task`); each trial is still its
own Optuna trial. The networks are tiny digits MLPs: the tests are about what is recorded and
how many tasks ran, and compare a cohort sweep with a sweep of single trials on the same grid
(float32: the batched kernels round differently, so values agree to `_RTOL`).
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from pydantic import ValidationError

from tests.worker.helpers import TaskKiller, digits_spec
from worker.arms.base import sweep_study_name
from worker.arms.optuna.sampling import grid_values
from worker.results import TrialRecord, load_trials
from worker.spec import StudySpec, format_errors
from worker.storage import open_storage
from worker.sweep import Progress, _arm_run, run_study

pytestmark = pytest.mark.ray

_RTOL = 1e-3  # float32 cohort vs single runs over two epochs (loose: kernels round differently)


def _spec(cohort_size: int | str, **changes: Any) -> StudySpec:
    base: dict[str, Any] = {
        "name": "cohort-sweep",
        "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}],
        "search_space": {"lr": {"low": 0.01, "high": 0.3, "log": True}},
        "budget": {"trials_per_arm": 6, "final_seeds": 2},
        "sampler": "grid",
        "objective": {"metric": "val_loss"},
        "resources": {"cohort_size": cohort_size},
    }
    return digits_spec(base, **changes)


def _tasks(trials: list[TrialRecord]) -> set[tuple[int, float]]:
    """The Ray tasks the trials ran in: each task announces its process and start time once."""
    return {(t.user_attrs["pid"], t.user_attrs["started_at"]) for t in trials}


def _study_attrs(url: str, key: str, label: str) -> dict[str, Any]:
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name=sweep_study_name(key, label), storage=storage)
        return dict(study.user_attrs)
    finally:
        storage.engine.dispose()


def test_a_cohort_sweep_records_what_single_trials_record(
    ray_runtime: None, sqlite_url: str
) -> None:
    """Cohorts of 3 on a 6-point grid over two slots: two Ray tasks for the sweep, every trial
    told its own value, equal (to float32 rounding) to the value of the same rate trained
    alone. The two final seeds fill the two slots, one each (a cohort never idles a slot)."""
    cohorts, singles = _spec(4), _spec(1)
    assert not run_study(cohorts, sqlite_url, "cohorts").stopped
    assert not run_study(singles, sqlite_url, "singles").stopped
    grid = grid_values(cohorts, cohorts.arm_search_space(cohorts.arms[0]), "sgd")["lr"]

    together = load_trials(sqlite_url, "cohorts", cohorts)
    alone = load_trials(sqlite_url, "singles", singles)
    sweep = [t for t in together if t.role == "sweep"]
    assert sorted(t.params["lr"] for t in sweep) == sorted(grid)
    assert all(t.state == "COMPLETE" and t.user_attrs["outcome"] == "complete" for t in sweep)
    assert [t.user_attrs["cohort"]["size"] for t in sweep] == [3] * 6  # 6 trials / 2 slots
    assert len(_tasks(sweep)) == 2  # 6 trials, 2 tasks
    assert len({t.user_attrs["cohort"]["key"] for t in sweep}) == 2
    final = [t for t in together if t.role == "final"]
    assert len(final) == 2 and len(_tasks(final)) == 2
    assert not any("cohort" in t.user_attrs for t in final)

    by_lr = {t.params["lr"]: t for t in alone if t.role == "sweep"}
    assert len(_tasks(list(by_lr.values()))) == 6  # cohort_size 1: one task per trial
    assert not any("cohort" in t.user_attrs for t in alone)
    for t in sweep:
        single = by_lr[t.params["lr"]]
        assert t.value == pytest.approx(single.value, rel=_RTOL), t.params
        assert len(t.user_attrs["history"]) == len(single.user_attrs["history"]) == 2
    best_alone = min(by_lr.values(), key=lambda t: t.value or 0.0).params["lr"]
    best_together = min(sweep, key=lambda t: t.value or 0.0).params["lr"]
    assert best_together == best_alone

    assert _study_attrs(sqlite_url, "cohorts", "sgd")["cohort_size"] == 4
    assert _study_attrs(sqlite_url, "singles", "sgd")["cohort_size"] == 1


def test_cohort_members_with_swept_schedules_match_their_single_runs(
    ray_runtime: None, sqlite_url: str
) -> None:
    """A warm-up swept with the rate (`schedule.warmup`) on a 2 × 2 grid, one slot: one cohort
    of four whose members train with different warm-ups of one cosine schedule, each trial's
    value equal (to float32 rounding) to the same point trained alone, and differing between
    the two warm-ups. The best point's schedule is the final seed's."""
    changes: dict[str, Any] = {
        "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}, "schedule": "cosine"}],
        "search_space": {"lr": {"values": [0.05, 0.3]}, "schedule.warmup": {"values": [0, 0.5]}},
        "budget": {"trials_per_arm": 4, "final_seeds": 1},
        "resources": {"max_concurrent_trials": 1},
    }
    cohorts, singles = _spec(4, **changes), _spec(1, **changes)
    assert cohorts.labels == ["sgd+warmup-cosine"]
    assert not run_study(cohorts, sqlite_url, "sched-cohorts").stopped
    assert not run_study(singles, sqlite_url, "sched-singles").stopped

    def point(t: TrialRecord) -> tuple[float, float]:
        return t.params["lr"], t.params["schedule.warmup"]

    together = [t for t in load_trials(sqlite_url, "sched-cohorts", cohorts) if t.role == "sweep"]
    alone = {point(t): t for t in load_trials(sqlite_url, "sched-singles", singles)
             if t.role == "sweep"}  # fmt: skip
    assert sorted(point(t) for t in together) == sorted(alone) == [
        (0.05, 0), (0.05, 0.5), (0.3, 0), (0.3, 0.5),
    ]  # fmt: skip
    assert [t.user_attrs["cohort"]["size"] for t in together] == [4] * 4
    assert len(_tasks(together)) == 1
    for t in together:
        assert t.value == pytest.approx(alone[point(t)].value, rel=_RTOL), point(t)
    assert alone[0.3, 0].value != pytest.approx(alone[0.3, 0.5].value, rel=_RTOL)
    final = [t for t in load_trials(sqlite_url, "sched-cohorts", cohorts) if t.role == "final"]
    best = min(together, key=lambda t: t.value or 0.0)
    assert [point(t) for t in final] == [point(best)]


def test_bmp_arms_batch_and_hypergradient_arms_stay_at_one_and_say_why(
    ray_runtime: None, sqlite_url: str
) -> None:
    """'auto' batches sgd, bmp and bmp_exact arms (their optimizers per member); a
    hypergradient arm (one tuning per task) keeps one trial per task, with the reason in the
    sweep study."""
    spec = _spec(
        "auto",
        task="mnist1d-mlp",
        data={"batch_size": 64, "n_train": 512, "n_val": 128, "n_test": 128},
        model={"width": 16, "depth": 1},
        arms=[
            {"optimizer": "sgd"},
            {"optimizer": "bmp"},
            {"optimizer": "bmp_exact"},
            {
                "optimizer": "sgd",
                "tuner": "hypergradient",
                "hypergradient": {"steps": 20, "blocks": 2, "batch_size": 64, "lr": 0.3},
            },
        ],
        budget={"trials_per_arm": 4, "epochs": 1, "steps_per_epoch": 10, "final_seeds": 1},
        sampler="random",
    )
    storage = open_storage(sqlite_url)
    try:
        arms = [_arm_run(spec, i, storage, "probe") for i in range(4)]
        sizes = [arm.cohort_size for arm in arms]
    finally:
        storage.engine.dispose()
    assert sizes[0] > 1 and sizes[1] == sizes[2] == sizes[0] and sizes[3] == 1
    for arm in arms[:3]:
        assert _study_attrs(sqlite_url, "probe", arm.label)["cohort_note"] is None
    assert "hypergradient" in _study_attrs(sqlite_url, "probe", arms[3].label)["cohort_note"]

    spec = spec.model_copy(update={"arms": spec.arms[:3]})
    assert not run_study(spec, sqlite_url, "run").stopped
    trials = load_trials(sqlite_url, "run", spec)
    sweeps = {arm: [t for t in trials if t.arm == arm and t.role == "sweep"] for arm in spec.labels}
    assert [len(s) for s in sweeps.values()] == [4, 4, 4]
    for sweep in sweeps.values():
        assert all("cohort" in t.user_attrs for t in sweep) and len(_tasks(sweep)) < 4
        assert all(t.state == "COMPLETE" for t in sweep)
    bmp = sweeps["bmp-local-mean-positions"]  # bmp's default variant
    assert all(len(t.user_attrs["layer_factors"]["values"]) == 1 for t in bmp)


def test_a_stopped_cohort_sweep_resumes_to_the_uninterrupted_rates(
    ray_runtime: None, sqlite_url: str
) -> None:
    """Cohorts of 3 on a 6-point grid, one slot: stopped while the second cohort trains, its
    three members are interrupted, and the resumed study runs them again (a new cohort) and
    ends with the rates an uninterrupted run ran, each once. A cohort trains for seconds (300
    steps an epoch): the stop comes at the driver's next turn after the cohort started, and no
    report holds the cohort back until the driver answers (no pruner)."""
    spec = _spec(3, budget={"steps_per_epoch": 300}, resources={"max_concurrent_trials": 1})
    assert not run_study(spec, sqlite_url, "whole").stopped

    state = {"stop": False}

    def on_progress(progress: Progress) -> None:
        arm = progress.arms[0]
        state["stop"] = state["stop"] or (arm.sweep_done >= 3 and arm.running > 0)

    stopped = run_study(
        spec, sqlite_url, "resumed", on_progress=on_progress, should_stop=lambda: state["stop"]
    )
    assert stopped.stopped
    trials = [t for t in load_trials(sqlite_url, "resumed", spec) if t.role == "sweep"]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 3, [(t.state, t.user_attrs.get("outcome")) for t in trials]
    assert len({t.user_attrs["cohort"]["key"] for t in interrupted}) == 1

    assert not run_study(spec, sqlite_url, "resumed").stopped

    def rates(key: str) -> list[float]:
        sweep = [t for t in load_trials(sqlite_url, key, spec) if t.role == "sweep"]
        return sorted(t.params["lr"] for t in sweep if t.state == "COMPLETE")

    grid = grid_values(spec, spec.arm_search_space(spec.arms[0]), "sgd")["lr"]
    assert rates("resumed") == rates("whole") == sorted(grid)
    trials = [t for t in load_trials(sqlite_url, "resumed", spec) if t.role == "sweep"]
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(
        t.number for t in interrupted
    )
    assert all(t.user_attrs["attempt"] == 1 for t in retries)  # interruptions use no attempt
    assert len(_tasks(retries)) == 1  # the three retries ran as one cohort
    final = [t for t in load_trials(sqlite_url, "resumed", spec) if t.role == "final"]
    assert sorted(t.user_attrs["seed"] for t in final) == [1, 2]
    assert len(_tasks(final)) == 1 and final[0].user_attrs["cohort"]["size"] == 2
    assert all(t.user_attrs["test_accuracy"] is not None for t in final)


def test_the_pruner_answers_each_member_of_a_cohort(ray_runtime: None, sqlite_url: str) -> None:
    """Cohorts of 2, one slot: the first cohort learns; in the second, the rate that cannot learn
    is pruned (its trial PRUNED, with the epochs it reported) and its partner completes."""
    spec = _spec(
        2,
        search_space={"lr": {"low": 1e-6, "high": 1.0, "log": True}},
        budget={"trials_per_arm": 4, "epochs": 3, "final_seeds": 1},
        sampler="random",
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_epochs": 0},
        resources={"max_concurrent_trials": 1},
    )
    storage = open_storage(sqlite_url)
    study = optuna.create_study(study_name="prune/sgd", storage=storage, direction="minimize")
    for lr in (0.3, 0.2, 1e-6, 0.25):  # the second cohort: a rate that cannot learn, and one
        study.enqueue_trial({"lr": lr})
    storage.engine.dispose()

    run_study(spec, sqlite_url, "prune")

    sweep = sorted(
        (t for t in load_trials(sqlite_url, "prune", spec) if t.role == "sweep"),
        key=lambda t: t.number,
    )
    assert [t.params["lr"] for t in sweep] == [0.3, 0.2, 1e-6, 0.25]
    assert [t.state for t in sweep] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert len(_tasks(sweep)) == 2
    pruned = sweep[2]
    assert pruned.outcome == "pruned" and len(pruned.intermediate_values) < 3
    assert len(sweep[3].intermediate_values) == 3


def test_a_killed_cohort_fails_and_retries_each_member(ray_runtime: None, sqlite_url: str) -> None:
    """The process of a cohort of 3 is killed: each member is failed and retried on its own (a
    new trial with its parameters, attempt 2); every grid point ends complete once."""
    spec = _spec(
        3,
        budget={"trials_per_arm": 6, "epochs": 2, "steps_per_epoch": 150, "final_seeds": 1},
        resources={"max_concurrent_trials": 1, "max_retries": 1},
    )
    with TaskKiller(lambda key: key.startswith("sgd/sweep/cohort/")) as killer:
        result = run_study(spec, sqlite_url, "fault")

    assert killer.killed, "no running cohort was found to kill"
    cohort = killer.killed["key"]
    sweep = [t for t in load_trials(sqlite_url, "fault", spec) if t.role == "sweep"]
    victims = [t for t in sweep if t.user_attrs.get("cohort", {}).get("key") == cohort]
    assert len(victims) == 3
    assert all(t.state == "FAIL" and "worker process" in t.user_attrs["error"] for t in victims)
    retries = {t.user_attrs["retry_of"]: t for t in sweep if "retry_of" in t.user_attrs}
    assert sorted(retries) == sorted(t.number for t in victims)
    for victim in victims:
        retry = retries[victim.number]
        assert retry.state == "COMPLETE" and retry.user_attrs["attempt"] == 2
        assert retry.params == victim.params
    grid = grid_values(spec, spec.arm_search_space(spec.arms[0]), "sgd")["lr"]
    complete = sorted(t.params["lr"] for t in sweep if t.state == "COMPLETE")
    assert complete == sorted(grid)
    assert result.arms[0].n_failed == 3 and result.arms[0].n_seeds == 1


@pytest.mark.parametrize("value", [0, 65, "big", True, 2.5])
def test_a_cohort_size_out_of_range_is_refused_by_name(value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        _spec(value)
    (line,) = format_errors(info.value)
    assert line.startswith("resources.cohort_size: must be 'auto' or a whole number from 1 to 64")
