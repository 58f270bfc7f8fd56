"""Hypergradient arms: the spec's rules, the tuning and retraining jobs, and real studies on a
local Ray runtime and a SQLite file (stop, resume, final seeds, leaderboard)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from optuna.trial import TrialState
from pydantic import ValidationError

from optim.hypergrad import mlp_param_names
from worker.arms.hypergradient.jobs import Schedule, ScheduleConfig, TuneConfig, mlp_layer_sizes
from worker.results import TrialRecord, load_trials
from worker.spec import StudySpec, format_errors
from worker.sweep import Progress, run_study

HYPERGRADIENT = {"steps": 60, "blocks": 3, "batch_size": 64, "lr": 0.3, "meta_lr": 0.1}


def _data(**changes: Any) -> dict[str, Any]:
    """A study with one optuna arm and one hypergradient arm on a tiny mnist1d MLP."""
    data: dict[str, Any] = {
        "name": "hypergradient-test",
        "task": "mnist1d-mlp",
        "data": {"batch_size": 64, "n_train": 1024, "n_val": 256, "n_test": 256},
        "model": {"width": 16, "depth": 1},
        "arms": [
            {"optimizer": "sgd", "fixed": {"momentum": 0.9}},
            {"optimizer": "sgd", "tuner": "hypergradient", "hypergradient": HYPERGRADIENT},
        ],
        "search_space": {"lr": {"low": 0.01, "high": 0.5, "log": True}},
        "budget": {"trials_per_arm": 3, "epochs": 3, "steps_per_epoch": 20, "final_seeds": 2},
        "sampler": "random",
        "pruner": "none",
        "objective": {"metric": "val_loss"},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2, "device": "cpu"},
    }
    data.update(changes)
    return data


def _errors(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(data)
    return dict(line.split(": ", 1) for line in format_errors(info.value))


def _hg_arm(**changes: Any) -> dict[str, Any]:
    return {"optimizer": "sgd", "tuner": "hypergradient", **changes}


# -- the spec ----------------------------------------------------------------------------------


def test_a_hypergradient_arm_is_accepted_and_its_steps_default_to_the_budget() -> None:
    spec = StudySpec.model_validate(_data(arms=[{"optimizer": "sgd"}, _hg_arm()]))
    arm = spec.arms[1]
    assert arm.tuner == "hypergradient"
    assert spec.labels == ["sgd", "sgd-2"]
    assert arm.hypergradient_options.learn == ["lr"]
    assert arm.run_steps(spec.budget) == 3 * 20  # epochs × steps_per_epoch, as sgd trains


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"arms": [_hg_arm(optimizer="adam")]}, "arms.0.optimizer", "set optimizer 'sgd'"),
        ({"objective": {"metric": "val_accuracy"}}, "arms.1.tuner", "objective.metric 'val_loss'"),
        (
            {"task": "digits-cnn", "model": {}},
            "arms.1.tuner",
            "digits-cnn is a classification task whose cnn model does not declare one",
        ),
        (
            {"task": "cifar10-mlp", "model": {"width": 64, "depth": 1}},  # 3072 inputs
            "arms.1.model",
            "197,322 parameters; the hypergradient tuner takes",
        ),
        ({"arms": [_hg_arm(model={"activation": "tanh"})]}, "arms.0.model", "ReLU"),
        ({"arms": [_hg_arm(model={"transformed": True})]}, "arms.0.model", "not transformed"),
        ({"model": {"width": 600}}, "arms.1.model", "width <= 512"),
        ({"model": {"depth": 5}}, "arms.1.model", "depth <= 4"),
        ({"arms": [_hg_arm(fixed={"momentum": 0.9})]}, "arms.0.fixed", "not fixed"),
        (
            {"arms": [_hg_arm(search_space={"lr": {"low": 0.1, "high": 1.0}})]},
            "arms.0.search_space",
            "searches nothing",
        ),
        ({"arms": [{"optimizer": "sgd", "hypergradient": {}}]}, "arms.0.hypergradient", "'optuna'"),
        (
            {"arms": [_hg_arm()], "budget": {"epochs": 3}},
            "arms.0.hypergradient.steps",
            "budget.steps_per_epoch",
        ),
        (
            {"arms": [_hg_arm()], "budget": {"epochs": 100, "steps_per_epoch": 100}},
            "arms.0.hypergradient.steps",
            "at most 5000",
        ),
        ({"arms": [_hg_arm(hypergradient={"steps": 5001})]}, "arms.0.hypergradient.steps", "5000"),
        ({"arms": [_hg_arm(hypergradient={"blocks": 101})]}, "arms.0.hypergradient.blocks", "100"),
        ({"arms": [_hg_arm(hypergradient={"steps": 5})]}, "arms.0.hypergradient", "blocks 10 > "),
        (
            {"arms": [_hg_arm(hypergradient={"learn": ["l2"]})]},
            "arms.0.hypergradient",
            "starting l2 > 0",
        ),
        (
            {"arms": [_hg_arm(hypergradient={"learn": ["lr", "lr"]})]},
            "arms.0.hypergradient.learn",
            "at most once",
        ),
        (
            {"arms": [_hg_arm(hypergradient={"batch_size": 2048})]},
            "arms.0.hypergradient.batch_size",
            "larger than data.n_train",
        ),
    ],
)
def test_a_hypergradient_arm_that_cannot_run_is_refused_under_its_field(
    changes: dict[str, Any], field: str, words: str
) -> None:
    errors = _errors(_data(**changes))
    assert field in errors, errors
    assert words in errors[field]


def test_the_tuner_takes_any_classifier_that_is_a_plain_relu_mlp() -> None:
    """What the task declares decides (`Model.layer_sizes`), not a list of dataset names: image
    inputs reach the MLP flattened, as they reach the built-in mlp."""
    spec = StudySpec.model_validate(
        _data(task="synthetic-mlp", data={**_data()["data"], "input_shape": [1, 8, 8]})
    )
    assert spec.arms[1].tuner == "hypergradient"


# -- the jobs, without Ray ---------------------------------------------------------------------


class _Collect:
    """A reporter: a tuning's meta-iteration records, or a retraining's epoch values."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, Any]] = {}
        self.reports: list[tuple[int, float]] = []

    def report(self, index: int, payload: Any) -> bool:
        if isinstance(payload, dict):
            self.records[index] = payload
        else:
            self.reports.append((index, payload))
        return False


def _tune_config(spec: StudySpec, **changes: Any) -> TuneConfig:
    options = spec.arms[1].hypergradient_options
    values: dict[str, Any] = {
        "task": spec.task,
        "data": spec.data,
        "model": spec.model,
        "steps": 60,
        "blocks": 3,
        "batch_size": 64,
        "meta_iterations": 3,
        "meta_lr": options.meta_lr,
        "learn": ("lr", "momentum"),
        "lr": options.lr,
        "momentum": options.momentum,
        "init_scale": 1.0,
        "l2": 0.0,
        "seed": 0,
    }
    return TuneConfig(**{**values, **changes})


@pytest.mark.usefixtures("one_thread")
def test_resuming_replays_the_tuning_and_retraining_reproduces_it() -> None:
    spec = StudySpec.model_validate(_data())
    first, resumed = _Collect(), _Collect()
    summary = _tune_config(spec).run(first)
    assert summary.meta_iterations == summary.reported == 3 and not summary.stopped
    _tune_config(spec, skip=2).run(resumed)
    assert list(resumed.records) == [2]  # the stored ones are replayed silently ...
    assert resumed.records[2]["value"] == first.records[2]["value"]  # ... and deterministically
    losses = [first.records[i]["val_loss"] for i in range(3)]
    assert losses[2] < losses[0]  # the tuner improves the validation loss it descends

    best = first.records[2]
    sizes = mlp_layer_sizes(spec.task, spec.data, spec.model)
    schedule = Schedule.from_flat(best["schedule"], mlp_param_names(sizes), 3)
    assert len(schedule.lr) == 3 and len(schedule.lr[0]) == len(sizes[:-1]) * 2
    assert schedule.momentum[0] != schedule.momentum[2]  # momentum was learned per block
    assert best["lr"] == pytest.approx(schedule.sgd_rate())

    def retrain(seed: int) -> Any:
        config = ScheduleConfig(
            spec.task, spec.data, spec.model, best["schedule"],
            steps=60, blocks=3, batch_size=64, seed=seed,
        )  # fmt: skip
        return config.run(collect)

    collect = _Collect()
    same = retrain(0)  # the tuning seed: the float64 retraining is the reversible run
    assert same.outcome == "complete"
    assert same.value == pytest.approx(best["val_loss"], rel=1e-6)
    assert [r.epoch for r in same.history] == [1, 2, 3] and [r.step for r in same.history][-1] == 60
    assert collect.reports == [(r.epoch, r.val_loss) for r in same.history]
    assert same.test_loss is not None and 0 < same.test_accuracy <= 1  # type: ignore[operator]
    other = retrain(1)  # a fresh seed: other weights and batches, a real retraining
    assert other.value != same.value and math.isfinite(other.value)


# -- real studies on Ray -----------------------------------------------------------------------


def _arm(trials: list[TrialRecord], arm: str, role: str) -> list[TrialRecord]:
    return [t for t in trials if t.arm == arm and t.role == role]


@pytest.mark.ray
def test_a_study_records_meta_iterations_as_trials_and_final_seeds(
    ray_runtime: None, sqlite_url: str
) -> None:
    spec = StudySpec.model_validate(_data())
    result = run_study(spec, sqlite_url, "hg")
    assert not result.stopped
    trials = load_trials(sqlite_url, "hg", spec)
    sweep = _arm(trials, "sgd-2", "sweep")
    assert [t.user_attrs["meta_iteration"] for t in sweep] == [0, 1, 2]
    for t in sweep:
        assert t.state == TrialState.COMPLETE.name and t.outcome == "complete"
        attrs = t.user_attrs
        assert attrs["arm"] == "sgd-2" and attrs["scheme"] == "sgd" and attrs["role"] == "sweep"
        assert attrs["tuner"] == "hypergradient" and attrs["seed"] == 0 and attrs["steps"] == 60
        assert t.value == attrs["val_loss"] and t.params["lr"] == attrs["lr"] > 0
        assert len(attrs["schedule"]) == 2 * 3 * 4 + 2 * 4  # lr, momentum per block; init, l2
        assert attrs["history"][0]["val_loss"] == t.value
    losses = [float(t.value) for t in sweep]  # type: ignore[arg-type]
    assert losses[-1] < losses[0]

    final = _arm(trials, "sgd-2", "final")
    assert sorted(t.user_attrs["seed"] for t in final) == [1, 2]
    best = min(sweep, key=lambda t: float(t.value))  # type: ignore[arg-type]
    for t in final:
        assert t.state == TrialState.COMPLETE.name and t.outcome == "complete"
        assert t.user_attrs["schedule_of"] == best.number
        assert t.user_attrs["schedule"] == best.user_attrs["schedule"]
        assert [h["epoch"] for h in t.user_attrs["history"]] == [1, 2, 3]
        assert t.intermediate_values[3] == t.value
        assert "test_accuracy" in t.user_attrs and "test_loss" in t.user_attrs
    assert final[0].value != final[1].value  # each seed trained anew

    rows = {row.arm: row for row in result.arms}
    row = rows["sgd-2"]
    assert row.n_trials == row.n_complete == 3 and row.best_trial == best.number
    assert row.n_seeds == 2 and row.objective_std is not None
    assert row.objective_mean == pytest.approx(sum(float(t.value) for t in final) / 2)  # type: ignore[arg-type]
    assert row.best_lr == best.user_attrs["lr"] and row.band_low is None
    assert row.schedule == {"name": "learned"} and rows["sgd"].schedule is None
    assert row.train_time_s > 0 and row.train_steps > 0  # its runs' time, as any arm's
    assert rows["sgd"].n_seeds == 2  # the optuna arm ran beside it as always


@pytest.mark.ray
@pytest.mark.slow
def test_a_stopped_tuning_resumes_without_counting_the_budget_twice(
    ray_runtime: None, sqlite_url: str
) -> None:
    # 200 steps a meta-iteration (about a second), so the stop lands mid-tuning.
    options = {**HYPERGRADIENT, "steps": 200}
    arm = {"optimizer": "sgd", "tuner": "hypergradient", "hypergradient": options}
    spec = StudySpec.model_validate(
        _data(arms=[arm], budget={"trials_per_arm": 4, "epochs": 1, "final_seeds": 1})
    )
    state: dict[str, float] = {}

    def on_progress(progress: Progress) -> None:
        if progress.arms[0].complete >= 1:
            state.setdefault("asked", time.monotonic())

    stopped = run_study(
        spec, sqlite_url, "hg", on_progress=on_progress, should_stop=lambda: "asked" in state
    )
    assert stopped.stopped and time.monotonic() - state["asked"] < 3.0
    before = _arm(load_trials(sqlite_url, "hg", spec), "sgd", "sweep")
    metas = [t for t in before if t.state == "COMPLETE"]
    assert 1 <= len(metas) < 4
    [interrupted] = [t for t in before if t.state == "FAIL"]
    assert interrupted.user_attrs["interrupted"] is True
    assert interrupted.user_attrs["meta_iterations_stored"] == len(metas)

    resumed = run_study(spec, sqlite_url, "hg")
    assert not resumed.stopped
    trials = load_trials(sqlite_url, "hg", spec)
    after = _arm(trials, "sgd", "sweep")
    done = [t for t in after if t.state == "COMPLETE"]
    assert sorted(t.user_attrs["meta_iteration"] for t in done) == [0, 1, 2, 3]
    assert [(t.number, t.value) for t in done[: len(metas)]] == [(t.number, t.value) for t in metas]
    assert all(t.user_attrs["attempt"] == 1 for t in done)  # a stop uses up no attempt
    assert len(_arm(trials, "sgd", "final")) == 1
    [row] = resumed.arms
    assert row.n_complete + row.n_diverged == 4 and row.n_failed == 1 and row.n_seeds == 1


@pytest.mark.ray
def test_a_tuning_run_that_keeps_failing_is_retried_then_the_arm_ends(
    ray_runtime: None, sqlite_url: str
) -> None:
    # digits trains on 1150 examples; a batch of 2000 makes every tuning run raise.
    options = {**HYPERGRADIENT, "batch_size": 2000}
    spec = StudySpec.model_validate(
        _data(
            task="digits-mlp",
            data={"batch_size": 64},
            arms=[{"optimizer": "sgd", "tuner": "hypergradient", "hypergradient": options}],
            resources={"cpus_per_trial": 1, "max_retries": 1, "device": "cpu"},
        )
    )
    progress: list[Progress] = []
    result = run_study(spec, sqlite_url, "hg", on_progress=progress.append)
    assert not result.stopped and progress[-1].finished
    assert progress[-1].trials_done == progress[-1].trials_total  # the budget is written off
    failed = _arm(load_trials(sqlite_url, "hg", spec), "sgd", "sweep")
    assert [(t.state, t.user_attrs["attempt"]) for t in failed] == [("FAIL", 1), ("FAIL", 2)]
    assert "batch_size" in failed[0].user_attrs["error"]
    [row] = result.arms
    assert row.n_failed == 2 and row.n_complete == 0 and row.objective_mean is None
