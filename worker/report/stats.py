"""Fair-comparison statistics: confidence intervals over seeds, ties, performance profiles.

- Each arm's score is the mean of its final seeds, with a two-sided Student-t confidence
  interval `mean ± t_{1-α/2, n-1} · s / √n` (s: sample standard deviation). One seed gives no
  interval.
- Two arms are *not distinguishable* when Welch's t-test (unequal variances) does not reject
  equal means at level α; the ranking flags such pairs instead of pretending an order.
- A performance profile (Dolan, Moré 2002, "Benchmarking optimization software with
  performance profiles") over tasks: for task t and scheme s the ratio r_{t,s} is
  best_t / value_{t,s} for a metric to maximise and value_{t,s} / best_t for one to minimise
  (values must be positive), ∞ when s did not run on t; ρ_s(τ) is the fraction of tasks with
  r_{t,s} ≤ τ. ρ_s(1) is the fraction of tasks s wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _stats

__all__ = ["RankedArm", "mean_interval", "performance_profile", "rank_arms"]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None
    high: float | None
    n: int
    std: float | None


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean with a Student-t confidence interval (None bounds for fewer than two values)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("values: need at least one value")
    mean = float(data.mean())
    if data.size < 2:
        return Interval(mean, None, None, 1, None)
    std = float(data.std(ddof=1))
    half = float(_stats.t.ppf(0.5 + confidence / 2, data.size - 1)) * std / math.sqrt(data.size)
    return Interval(mean, mean - half, mean + half, int(data.size), std)


@dataclass(frozen=True)
class RankedArm:
    arm: str
    rank: int
    interval: Interval
    not_distinguishable_from: list[str] = field(default_factory=list)


def _distinguishable(a: Sequence[float], b: Sequence[float], alpha: float) -> bool:
    if len(a) < 2 or len(b) < 2:
        return False  # one seed cannot separate two arms
    if np.std(a, ddof=1) == 0 and np.std(b, ddof=1) == 0:
        return bool(np.mean(a) != np.mean(b))
    result = _stats.ttest_ind(a, b, equal_var=False)
    return bool(result.pvalue < alpha)


def rank_arms(
    seeds: Mapping[str, Sequence[float]], maximize: bool, confidence: float = 0.95
) -> list[RankedArm]:
    """Arms ordered best first by their seed mean, each with the arms it is not
    distinguishable from (Welch's t-test at level 1 - confidence)."""
    alpha = 1 - confidence
    intervals = {arm: mean_interval(values, confidence) for arm, values in seeds.items()}
    order = sorted(intervals, key=lambda arm: intervals[arm].mean, reverse=maximize)
    return [
        RankedArm(
            arm,
            rank,
            intervals[arm],
            [o for o in order if o != arm and not _distinguishable(seeds[arm], seeds[o], alpha)],
        )
        for rank, arm in enumerate(order, start=1)
    ]


def performance_profile(
    results: Mapping[str, Mapping[str, float]],
    maximize: Mapping[str, bool],
    taus: Sequence[float],
) -> dict[str, list[float]]:
    """ρ_s(τ) for every scheme s and every τ in `taus`; `results[task][scheme]` is the score."""
    schemes = sorted({s for per_task in results.values() for s in per_task})
    if not results:
        return {}
    ratios: dict[str, list[float]] = {s: [] for s in schemes}
    for task, per_task in results.items():
        if any(v <= 0 or not math.isfinite(v) for v in per_task.values()):
            raise ValueError(f"results[{task!r}]: performance ratios need positive finite scores")
        best = max(per_task.values()) if maximize[task] else min(per_task.values())
        for scheme in schemes:
            value = per_task.get(scheme)
            if value is None:
                ratios[scheme].append(math.inf)
            else:
                ratios[scheme].append(best / value if maximize[task] else value / best)
    n_tasks = len(results)
    return {s: [sum(r <= tau for r in ratios[s]) / n_tasks for tau in taus] for s in schemes}
