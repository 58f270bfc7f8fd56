"""Statistics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from worker.report.stats import mean_interval, performance_profile, rank_arms


def test_mean_interval_matches_the_hand_computed_t_interval() -> None:
    # values 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302652729911275, half = 4.3027 / sqrt(3)
    interval = mean_interval([1.0, 2.0, 3.0], 0.95)
    half = 4.302652729911275 / math.sqrt(3)
    assert interval.mean == pytest.approx(2.0)
    assert interval.std == pytest.approx(1.0)
    assert interval.low == pytest.approx(2.0 - half)
    assert interval.high == pytest.approx(2.0 + half)


def test_one_seed_has_no_interval_and_ties_with_everything() -> None:
    assert mean_interval([0.5]).low is None
    ranked = rank_arms({"a": [0.9], "b": [0.1, 0.2]}, maximize=True)
    assert [r.arm for r in ranked] == ["a", "b"]
    assert ranked[0].not_distinguishable_from == ["b"]


def test_ranking_flags_only_overlapping_arms() -> None:
    seeds = {
        "sgd": [0.90, 0.91, 0.92],
        "bmp": [0.905, 0.915, 0.925],  # within noise of sgd
        "adam": [0.50, 0.51, 0.52],  # clearly worse
    }
    ranked = rank_arms(seeds, maximize=True)
    assert [r.arm for r in ranked] == ["bmp", "sgd", "adam"]
    assert [r.rank for r in ranked] == [1, 2, 3]
    assert ranked[0].not_distinguishable_from == ["sgd"]
    assert ranked[2].not_distinguishable_from == []
    # minimising reverses the order
    assert [r.arm for r in rank_arms(seeds, maximize=False)] == ["adam", "sgd", "bmp"]


def test_performance_profile_by_hand() -> None:
    results = {
        "t1": {"a": 0.8, "b": 0.4},  # maximise: ratios a 1, b 2
        "t2": {"a": 2.0, "b": 1.0},  # minimise: ratios a 2, b 1
        "t3": {"a": 0.5},  # b missing: ratio inf
    }
    maximize = {"t1": True, "t2": False, "t3": True}
    profile = performance_profile(results, maximize, [1.0, 1.5, 2.0, 100.0])
    assert profile["a"] == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert profile["b"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_performance_profile_rejects_non_positive_scores() -> None:
    with pytest.raises(ValueError, match="t1"):
        performance_profile({"t1": {"a": -1.0}}, {"t1": False}, [1.0])
