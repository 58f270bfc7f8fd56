"""Leaderboard rows from Optuna studies written by hand, checked against hand-computed values."""

from __future__ import annotations

import math
from typing import Any, Literal

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from worker.spec import StudySpec
from worker.storage import open_storage
from worker.summary import edge_warnings, study_outcome, summarize_study

LR = FloatDistribution(1e-4, 100.0, log=True)


def _history(values: list[float]) -> list[dict[str, Any]]:
    return [
        {
            "epoch": i + 1,
            "step": 10 * (i + 1),
            "val_accuracy": v,
            "val_loss": 1 - v,
            "wall_time": float(i + 1),
        }
        for i, v in enumerate(values)
    ]


def _trial(
    lr: float,
    value: float | None,
    outcome: str,
    state: TrialState = TrialState.COMPLETE,
    **attrs: Any,
) -> optuna.trial.FrozenTrial:
    intermediate: dict[int, float] = {}
    if state == TrialState.PRUNED:
        assert value is not None
        intermediate, value = {1: value}, None
    return create_trial(
        params={"lr": lr},
        distributions={"lr": LR},
        value=value,
        state=state,
        intermediate_values=intermediate,
        user_attrs={"lr": lr, "outcome": outcome, **attrs},
    )


def _study(
    storage: Any,
    name: str,
    direction: Literal["maximize", "minimize"],
    trials: list[optuna.trial.FrozenTrial],
) -> None:
    study = optuna.create_study(storage=storage, study_name=name, direction=direction)
    for t in trials:
        study.add_trial(t)


def _spec(**objective: Any) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "hand",
            "task": "mnist1d-mlp",
            "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}, {"optimizer": "adamw"}],
            "budget": {"trials_per_arm": 7, "final_seeds": 2},
            "objective": {"band_tolerance": 0.1, "target_fraction": 0.9, **objective},
        }
    )


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One storage for the module's tests (they only read it)."""
    sqlite_url = f"sqlite:///{tmp_path_factory.mktemp('summary') / 'optuna.db'}"
    storage = open_storage(sqlite_url)
    _study(
        storage,
        "k/sgd",
        "maximize",
        [
            _trial(0.001, 0.5, "complete"),
            _trial(0.01, 0.85, "complete"),
            _trial(0.03, 0.3, "pruned", TrialState.PRUNED),
            _trial(0.1, 0.9, "complete"),
            _trial(1.0, 0.82, "complete"),
            _trial(10.0, 0.0, "diverged"),
            _trial(3.0, None, "failed", TrialState.FAIL),
        ],
    )
    _study(
        storage,
        "k/sgd/final",
        "maximize",
        [
            _trial(
                0.1,
                0.88,
                "complete",
                seed=1,
                test_accuracy=0.87,
                history=_history([0.5, 0.8, 0.88]),
            ),
            _trial(
                0.1,
                0.92,
                "complete",
                seed=2,
                test_accuracy=0.89,
                history=_history([0.7, 0.85, 0.92]),
            ),
        ],
    )
    _study(
        storage,
        "k/adam",
        "maximize",
        [
            _trial(0.001, 0.95, "complete"),
            _trial(0.01, 0.6, "complete"),
        ],
    )
    _study(
        storage,
        "k/adam/final",
        "maximize",
        [
            _trial(0.001, 0.94, "complete", seed=1, history=_history([0.86, 0.9, 0.94])),
            _trial(0.001, 0.96, "complete", seed=2, history=_history([0.8, 0.9, 0.96])),
        ],
    )
    storage.engine.dispose()
    return sqlite_url


def test_rows_are_ranked_by_the_final_mean_and_missing_arms_come_last(url: str) -> None:
    rows = summarize_study(url, "k", _spec())
    assert [(r.rank, r.arm) for r in rows] == [(1, "adam"), (2, "sgd"), (3, "adamw")]
    assert rows[2].objective_mean is None and rows[2].n_trials == 0


def test_best_configuration_mean_std_and_test_metric(url: str) -> None:
    sgd = {r.arm: r for r in summarize_study(url, "k", _spec())}["sgd"]
    assert (sgd.best_lr, sgd.best_sweep_value, sgd.best_params) == (0.1, 0.9, {"lr": 0.1})
    assert sgd.objective_mean == pytest.approx(0.9)
    assert sgd.objective_std == pytest.approx(math.sqrt(2 * 0.02**2))
    assert sgd.final_values == [0.88, 0.92] and sgd.n_seeds == 2
    assert sgd.test_mean == pytest.approx(0.88) and sgd.test_metric == "test_accuracy"


def test_trial_counts(url: str) -> None:
    sgd = {r.arm: r for r in summarize_study(url, "k", _spec())}["sgd"]
    counts = (sgd.n_trials, sgd.n_complete, sgd.n_pruned, sgd.n_diverged, sgd.n_failed)
    assert counts == (7, 4, 1, 1, 1)


def test_rate_band_is_contiguous_around_the_best_and_skips_pruned_trials(url: str) -> None:
    # within 10% of 0.9 (>= 0.81): lr 0.01 (0.85) and 1.0 (0.82); 0.001 (0.5) and the diverged
    # 10.0 end the band; the pruned 0.03 is left out.
    sgd = {r.arm: r for r in summarize_study(url, "k", _spec())}["sgd"]
    assert (sgd.band_low, sgd.band_high) == (0.01, 1.0)
    assert sgd.band_decades == pytest.approx(2.0)


def test_steps_and_time_to_the_relative_target(url: str) -> None:
    # target = 0.9 × best mean 0.95 = 0.855; adam's seeds reach it at epochs 1 and 2, sgd's at 3.
    rows = {r.arm: r for r in summarize_study(url, "k", _spec())}
    assert rows["adam"].target == pytest.approx(0.855)
    assert (rows["adam"].steps_to_target, rows["adam"].time_to_target_s) == (15.0, 1.5)
    assert (rows["sgd"].steps_to_target, rows["sgd"].target_reached) == (30.0, 2)


def test_an_absolute_target_nobody_reaches_gives_no_time(url: str) -> None:
    rows = {r.arm: r for r in summarize_study(url, "k", _spec(target=0.99))}
    assert rows["adam"].target == 0.99
    assert rows["adam"].steps_to_target is None and rows["adam"].target_reached == 0


def test_a_diverged_trial_never_wins_even_with_the_best_value(sqlite_url: str) -> None:
    spec = StudySpec.model_validate(
        {
            "name": "d",
            "task": "mnist1d-mlp",
            "arms": [{"optimizer": "sgd"}],
            "objective": {"metric": "val_loss"},
        }
    )
    storage = open_storage(sqlite_url)
    _study(
        storage,
        "d/sgd",
        "minimize",
        [
            _trial(0.1, 0.7, "complete"),
            _trial(9.0, 0.0, "diverged"),
        ],
    )
    storage.engine.dispose()
    (row,) = summarize_study(sqlite_url, "d", spec)
    assert row.best_lr == 0.1 and row.n_diverged == 1
    assert row.to_dict()["best_sweep_value"] == 0.7


def test_the_final_seeds_interval_and_what_they_cannot_tell_apart(url: str) -> None:
    rows = {r.arm: r.to_dict() for r in summarize_study(url, "k", _spec())}
    sgd = rows["sgd"]
    # 0.9 ± t(0.975, 1 dof) · s/√2 = 0.9 ± 12.706 · 0.02, clipped to an accuracy's range
    assert sgd["interval_low"] == pytest.approx(0.9 - 12.706 * 0.02, abs=1e-3)
    assert sgd["interval_high"] == 1.0 and sgd["confidence"] == 0.95
    assert sgd["ties"] == [] and sgd["too_few_seeds_to_tell"] == ["adam"]
    assert rows["adamw"]["interval_low"] is None and rows["adamw"]["too_few_seeds_to_tell"] == []


def _failed(lr: float, error: str) -> optuna.trial.FrozenTrial:
    return _trial(lr, None, "failed", TrialState.FAIL, error=error, deterministic=True)


def test_an_arm_whose_trials_all_failed_is_failed_with_its_first_error_and_ranked_last(
    sqlite_url: str,
) -> None:
    spec = StudySpec.model_validate(
        {"name": "f", "task": "mnist1d-mlp", "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}]}
    )
    storage = open_storage(sqlite_url)
    _study(storage, "f/sgd", "maximize", [_failed(0.1, "ValueError: first"), _failed(1, "later")])
    _study(storage, "f/adam", "maximize", [_trial(0.01, 0.7, "complete")])
    _study(storage, "f/adam/final", "maximize", [_trial(0.01, 0.6, "complete", seed=1)])
    storage.engine.dispose()

    rows = summarize_study(sqlite_url, "f", spec)
    assert [(r.rank, r.arm, r.status) for r in rows] == [(1, "adam", "ok"), (2, "sgd", "failed")]
    assert rows[1].error == "ValueError: first" and rows[1].objective_mean is None
    assert study_outcome(rows) == ("completed_with_errors", "arm sgd failed: ValueError: first")
    assert study_outcome(rows[1:]) == ("failed", "arm sgd failed: ValueError: first")
    assert study_outcome(rows[:1]) == ("completed", None)


def _edge_spec(**lr: Any) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "e",
            "task": "mnist1d-mlp",
            "arms": [{"optimizer": "sgd"}],
            "search_space": {"lr": {"log": True, **lr}},
        }
    )


@pytest.mark.parametrize(
    ("values", "edge"),
    [((0.5, 0.7, 0.9), "high"), ((0.9, 0.7, 0.5), "low"), ((0.5, 0.9, 0.7), None)],
)
def test_a_best_rate_at_an_edge_of_its_range_is_flagged(
    sqlite_url: str, values: tuple[float, float, float], edge: str | None
) -> None:
    storage = open_storage(sqlite_url)
    rates = (0.01, 0.03, 0.1)
    trials = [_trial(lr, v, "complete") for lr, v in zip(rates, values, strict=True)]
    _study(storage, "e/sgd", "maximize", trials)
    storage.engine.dispose()

    (row,) = summarize_study(sqlite_url, "e", _edge_spec(low=0.01, high=0.1))
    assert (row.lr_low, row.lr_high, row.best_lr_at_edge) == (0.01, 0.1, edge)
    warnings = edge_warnings([row.to_dict()])
    if edge is None:
        assert warnings == []
    else:
        best = rates[values.index(0.9)]
        assert warnings[0].startswith(f"arm sgd: best lr {best:.3g} lies at the {edge} edge")


def test_a_best_rate_inside_a_wide_range_is_not_at_its_edge(sqlite_url: str) -> None:
    """The best rate tried is the highest, but far from the range's top: no warning."""
    storage = open_storage(sqlite_url)
    trials = [_trial(0.01, 0.5, "complete"), _trial(0.1, 0.9, "complete")]
    _study(storage, "e/sgd", "maximize", trials)
    storage.engine.dispose()
    (row,) = summarize_study(sqlite_url, "e", _edge_spec(low=0.001, high=100.0))
    assert row.best_lr == 0.1 and row.best_lr_at_edge is None


def test_lr_auto_gives_each_arm_its_schemes_registered_range(sqlite_url: str) -> None:
    import optim

    data = {
        "name": "auto",
        "task": "mnist1d-mlp",
        "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}, {"optimizer": "lars"}],
        "search_space": {"lr": "auto"},
    }
    spec = StudySpec.model_validate(data)
    stored = StudySpec.model_validate(spec.model_dump(mode="json"))  # as the service stores it
    assert stored == spec
    rows = {r.arm: r for r in summarize_study(sqlite_url, "auto", stored)}
    ranges = set()
    for arm in stored.arms:
        hp = optim.SCHEMES[arm.optimizer].hyperparameter("lr")
        assert hp.search is not None
        dim = stored.arm_search_space(arm)["lr"]
        assert (dim.low, dim.high, dim.log) == (*hp.search, hp.log)
        assert (rows[arm.optimizer].lr_low, rows[arm.optimizer].lr_high) == hp.search
        ranges.add(hp.search)
    assert len(ranges) == 3  # a range per scheme, not one shared


def test_training_time_charges_a_cohort_member_its_share_and_names_the_schedule(
    sqlite_url: str,
) -> None:
    """Every trial that trained counts (pruned and diverged ones too, failed ones have no
    time); a member of a cohort of K is charged 1/K of the cohort's wall time, in the total
    and in the time to target."""
    spec = StudySpec.model_validate(
        {
            "name": "t",
            "task": "mnist1d-mlp",
            "arms": [{"optimizer": "sgd", "schedule": {"name": "cosine", "warmup": 0.1}}],
            "budget": {"trials_per_arm": 3, "final_seeds": 2},
            "objective": {"target": 0.8},
        }
    )
    cohort = {"key": "sgd+warmup-cosine/sweep/cohort/0", "size": 2}
    storage = open_storage(sqlite_url)
    _study(
        storage,
        "t/sgd+warmup-cosine",
        "maximize",
        [
            _trial(0.1, 0.9, "complete", wall_time=8.0, steps=30, cohort=cohort),
            _trial(0.2, 0.5, "pruned", TrialState.PRUNED, wall_time=8.0, steps=10, cohort=cohort),
            _trial(9.0, 0.0, "diverged", wall_time=1.0, steps=5),
            _trial(3.0, None, "failed", TrialState.FAIL),
        ],
    )
    final = [
        _trial(0.1, 0.9, "complete", wall_time=3.0, steps=30, history=_history([0.5, 0.85, 0.9]))
        for _ in range(2)
    ]
    _study(storage, "t/sgd+warmup-cosine/final", "maximize", final)
    storage.engine.dispose()
    (row,) = summarize_study(sqlite_url, "t", spec)
    assert row.train_time_s == pytest.approx(8.0 / 2 + 8.0 / 2 + 1.0 + 3.0 + 3.0)
    assert row.train_steps == 30 + 10 + 5 + 30 + 30
    assert row.ms_per_step == pytest.approx(1000 * 15.0 / 105)
    assert row.cohort_sizes == [1, 2]
    assert (row.steps_to_target, row.time_to_target_s) == (20.0, 2.0)  # epoch 2, alone
    assert row.schedule == {"name": "cosine", "warmup": 0.1, "floor": 0.0}


def test_a_cohort_members_time_to_target_is_its_share(sqlite_url: str) -> None:
    spec = StudySpec.model_validate(
        {"name": "c", "task": "mnist1d-mlp", "arms": [{"optimizer": "sgd"}],
         "objective": {"target": 0.8}}
    )  # fmt: skip
    cohort = {"key": "sgd/final/cohort/0", "size": 4}
    storage = open_storage(sqlite_url)
    _study(storage, "c/sgd", "maximize", [_trial(0.1, 0.9, "complete")])
    seeds = [
        _trial(0.1, 0.9, "complete", cohort=cohort, wall_time=12.0, steps=30,
               history=_history([0.5, 0.85, 0.9]))
        for _ in range(4)
    ]  # fmt: skip
    _study(storage, "c/sgd/final", "maximize", seeds)
    storage.engine.dispose()
    (row,) = summarize_study(sqlite_url, "c", spec)
    assert row.time_to_target_s == 2.0 / 4  # the history's 2 s were the cohort's
    assert row.train_time_s == pytest.approx(4 * 12.0 / 4)
    assert row.schedule is None  # the constant rate
