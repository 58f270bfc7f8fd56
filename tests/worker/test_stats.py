"""Statistics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from worker.report.stats import (
    MIN_SEEDS_TO_TELL,
    mean_interval,
    metric_range,
    performance_profile,
    rank_arms,
)


def test_mean_interval_matches_the_hand_computed_t_interval() -> None:
    # values 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302652729911275, half = 4.3027 / sqrt(3)
    interval = mean_interval([1.0, 2.0, 3.0], 0.95)
    half = 4.302652729911275 / math.sqrt(3)
    assert interval.mean == pytest.approx(2.0)
    assert interval.std == pytest.approx(1.0)
    assert interval.low == pytest.approx(2.0 - half)
    assert interval.high == pytest.approx(2.0 + half)


def test_intervals_stay_inside_the_metric_range() -> None:
    # two seeds of digits sgd: t_{0.975, 1} = 12.706 makes mean ± half reach 1.187
    accuracy = mean_interval([0.83, 0.882], 0.95, metric_range("val_accuracy"))
    half = 12.706204736174707 * abs(0.83 - 0.882) / math.sqrt(2) / math.sqrt(2)
    assert accuracy.high == 1.0
    assert accuracy.low == pytest.approx(0.856 - half)
    loss = mean_interval([0.05, 0.3], 0.95, metric_range("val_loss"))
    assert loss.low == 0.0
    assert loss.high is not None and loss.high > 1.0  # a loss has no upper bound
    assert metric_range("val_loss") == (0.0, None)


def test_one_seed_has_no_interval_and_is_too_few_to_tell() -> None:
    assert mean_interval([0.5]).low is None
    ranked = rank_arms({"a": [0.9], "b": [0.1, 0.2]}, maximize=True)
    assert [r.arm for r in ranked] == ["a", "b"]
    assert ranked[0].too_few_seeds_to_tell == ["b"]
    assert ranked[0].not_distinguishable_from == []


def test_two_seeds_per_arm_are_too_few_to_call_a_clear_gap_a_tie() -> None:
    # quick.json: sgd 0.615 ± 0.012 vs bmp 0.533 ± 0.001 over 2 seeds: Welch's test has about
    # one degree of freedom and does not reject, which is no evidence of a tie
    ranked = rank_arms(
        {"sgd": [0.60625, 0.62375], "bmp": [0.53246, 0.53374]},
        maximize=True,
        bounds=metric_range("val_accuracy"),
    )
    assert [r.arm for r in ranked] == ["sgd", "bmp"]
    assert ranked[0].not_distinguishable_from == []
    assert ranked[0].too_few_seeds_to_tell == ["bmp"]
    assert ranked[1].too_few_seeds_to_tell == ["sgd"]


def test_ranking_flags_only_overlapping_arms_as_ties() -> None:
    assert MIN_SEEDS_TO_TELL == 5
    seeds = {
        "sgd": [0.90, 0.91, 0.92, 0.905, 0.915],
        "bmp": [0.905, 0.915, 0.925, 0.91, 0.92],  # within noise of sgd
        "adam": [0.50, 0.51, 0.52, 0.505, 0.515],  # clearly worse
    }
    ranked = rank_arms(seeds, maximize=True)
    assert [r.arm for r in ranked] == ["bmp", "sgd", "adam"]
    assert [r.rank for r in ranked] == [1, 2, 3]
    assert ranked[0].not_distinguishable_from == ["sgd"]
    assert ranked[2].not_distinguishable_from == []
    assert all(r.too_few_seeds_to_tell == [] for r in ranked)
    # minimising reverses the order
    assert [r.arm for r in rank_arms(seeds, maximize=False)] == ["adam", "sgd", "bmp"]


def test_performance_profile_by_hand() -> None:
    results: dict[str, dict[str, float | None]] = {
        "t1": {"a": 0.8, "b": 0.4},  # maximise: gaps a 0, b 0.5
        "t2": {"a": 2.0, "b": 1.0},  # minimise: gaps a 1, b 0 (Dolan-More's ratio 2 and 1)
        "t3": {"a": 0.5},  # b not run: left out of b's tasks
    }
    maximize = {"t1": True, "t2": False, "t3": True}
    profile = performance_profile(results, maximize, [1.0, 1.5, 2.0, 100.0])
    assert profile.rho["a"] == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert profile.rho["b"] == pytest.approx([1 / 2, 1.0, 1.0, 1.0])
    assert profile.ran == {"a": ["t1", "t2", "t3"], "b": ["t1", "t2"]}
    assert profile.not_run == {"a": [], "b": ["t3"]}


def test_performance_profile_takes_zero_negative_and_failed_scores() -> None:
    results: dict[str, dict[str, float | None]] = {
        "diverged": {"a": 0.0, "b": 0.0},  # every final seed diverged in both arms: a tie
        "zero-best": {"a": 0.5, "b": 0.0},  # b's accuracy 0: gap 1
        "negative": {"a": -2.0, "b": -1.0},  # maximise -loss: a's gap (−1 − −2) / 1 = 1
        "failed": {"a": 0.7, "b": None},  # b ran and produced nothing: never within τ
        "nan": {"a": math.nan, "b": 0.1},
    }
    maximize = dict.fromkeys(results, True)
    profile = performance_profile(results, maximize, [1.0, 2.0, 1e9])
    # a: gaps diverged 0, zero-best 0, negative 1, failed 0, nan ∞
    assert profile.rho["a"] == pytest.approx([3 / 5, 4 / 5, 4 / 5])
    # b: gaps diverged 0, zero-best 1, negative 0, failed ∞, nan 0
    assert profile.rho["b"] == pytest.approx([3 / 5, 4 / 5, 4 / 5])
    assert profile.not_run == {"a": [], "b": []}
    with pytest.raises(ValueError, match="maximize\\['t'\\]"):
        performance_profile({"t": {"a": 1.0}}, {}, [1.0])
