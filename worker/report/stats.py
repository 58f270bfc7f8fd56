"""Fair-comparison statistics: confidence intervals over seeds, ties, performance profiles.

- Each arm's score is the mean of its final seeds, with a two-sided Student-t confidence
  interval `mean ± t_{1-α/2, n-1} · s / √n` (s: sample standard deviation), clipped to the
  metric's range (`metric_range`: an accuracy lies in [0, 1], a loss is ≥ 0). With few seeds
  the t quantile is large (12.7 for two seeds) and the unclipped interval leaves the range,
  which says nothing about the metric. One seed gives no interval.
- Two arms are *not distinguishable* when Welch's t-test (unequal variances) does not reject
  equal means at level α. That is a tie only when the test had the power to see a difference:
  with fewer than `MIN_SEEDS_TO_TELL` seeds in either arm, a non-rejection says nothing (two
  seeds per arm leave Welch's test about one degree of freedom, so 0.614 vs 0.533 with
  spreads of 0.01 does not reject), and the pair is flagged *too few seeds to tell* instead.
- A performance profile (after Dolan, Moré 2002, "Benchmarking optimization software with
  performance profiles") over tasks, on the *normalised gap* to the best scheme of each task:
  `gap_{t,s} = (best_t − value_{t,s}) / (|best_t| + ε)` for a metric to maximise and
  `(value_{t,s} − best_t) / (|best_t| + ε)` for one to minimise, and `τ = 1 + gap`.
  Dolan–Moré's ratio `value / best` needs positive scores; the gap is defined for zero and
  negative ones (an accuracy of 0 when every seed diverged) and, for a positive loss, equals
  that ratio. ρ_s(τ) is the fraction of the tasks *s was run on* with `1 + gap ≤ τ`; ρ_s(1)
  is the fraction it wins. A scheme absent from a task was not run there: the task is left
  out of its denominator (and reported as not run), not counted as a loss. A scheme that ran
  but has no finite score (None, NaN, ±∞) failed there: its gap is ∞, it counts as run and
  never lies within any τ. Times to a target (AlgoPerf's measure) are scores to minimise: their
  `1 + gap` is Dolan–Moré's ratio `time / fastest time`, and a target never reached (None) is
  an infinite time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "MIN_SEEDS_TO_TELL",
    "Interval",
    "Profile",
    "RankedArm",
    "mean_interval",
    "metric_range",
    "performance_profile",
    "rank_arms",
    "seed_warning",
]

MIN_SEEDS_TO_TELL = 5
PROFILE_EPS = 1e-9


def metric_range(metric: str) -> tuple[float | None, float | None]:
    """The values `metric` can take: [0, 1] for an accuracy, [0, ∞) for a loss, else
    unbounded (None)."""
    if metric.endswith("accuracy"):
        return 0.0, 1.0
    if metric.endswith("loss"):
        return 0.0, None
    return None, None


def seed_warning(final_seeds: int) -> str | None:
    """What a spec with `final_seeds` seeds per arm will not be able to tell (None if enough)."""
    if final_seeds >= MIN_SEEDS_TO_TELL:
        return None
    return (
        f"budget.final_seeds: {final_seeds} seed{'s' if final_seeds != 1 else ''} per arm are "
        f"too few for Welch's test to tell arms apart or call them tied (needs "
        f"{MIN_SEEDS_TO_TELL}); the leaderboard will say 'too few seeds to tell' and the "
        f"intervals will be wide"
    )


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None
    high: float | None
    n: int
    std: float | None


def _clip(value: float, bounds: tuple[float | None, float | None]) -> float:
    low, high = bounds
    if low is not None:
        value = max(low, value)
    if high is not None:
        value = min(high, value)
    return value


def mean_interval(
    values: Sequence[float],
    confidence: float = 0.95,
    bounds: tuple[float | None, float | None] = (None, None),
) -> Interval:
    """Mean with a Student-t confidence interval clipped to `bounds` (None bounds for fewer
    than two values)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("values: need at least one value")
    mean = float(data.mean())
    if data.size < 2:
        return Interval(mean, None, None, 1, None)
    std = float(data.std(ddof=1))
    from scipy import stats as _stats  # here: importing SciPy costs a second or two

    half = float(_stats.t.ppf(0.5 + confidence / 2, data.size - 1)) * std / math.sqrt(data.size)
    low, high = _clip(mean - half, bounds), _clip(mean + half, bounds)
    return Interval(mean, low, high, int(data.size), std)


@dataclass(frozen=True)
class RankedArm:
    arm: str
    rank: int
    interval: Interval
    not_distinguishable_from: list[str] = field(default_factory=list)
    too_few_seeds_to_tell: list[str] = field(default_factory=list)


def _distinguishable(a: Sequence[float], b: Sequence[float], alpha: float) -> bool:
    if len(a) < 2 or len(b) < 2:
        return False  # one seed cannot separate two arms
    if np.std(a, ddof=1) == 0 and np.std(b, ddof=1) == 0:
        return bool(np.mean(a) != np.mean(b))
    from scipy import stats as _stats

    result = _stats.ttest_ind(a, b, equal_var=False)
    return bool(result.pvalue < alpha)


def rank_arms(
    seeds: Mapping[str, Sequence[float]],
    maximize: bool,
    confidence: float = 0.95,
    bounds: tuple[float | None, float | None] = (None, None),
) -> list[RankedArm]:
    """Arms ordered best first by their seed mean. For each, the arms Welch's t-test (level
    1 - confidence) cannot separate it from: ties when both have `MIN_SEEDS_TO_TELL` seeds or
    more, otherwise "too few seeds to tell"."""
    alpha = 1 - confidence
    intervals = {arm: mean_interval(values, confidence, bounds) for arm, values in seeds.items()}
    order = sorted(intervals, key=lambda arm: intervals[arm].mean, reverse=maximize)
    ranked = []
    for rank, arm in enumerate(order, start=1):
        ties: list[str] = []
        unknown: list[str] = []
        for other in order:
            if other == arm or _distinguishable(seeds[arm], seeds[other], alpha):
                continue
            enough = min(len(seeds[arm]), len(seeds[other])) >= MIN_SEEDS_TO_TELL
            (ties if enough else unknown).append(other)
        ranked.append(RankedArm(arm, rank, intervals[arm], ties, unknown))
    return ranked


@dataclass(frozen=True)
class Profile:
    """ρ_s(τ) per scheme, with the tasks each scheme was and was not run on."""

    taus: list[float]
    rho: dict[str, list[float]]
    ran: dict[str, list[str]]
    not_run: dict[str, list[str]]


def _gap(value: float | None, best: float, maximize: bool) -> float:
    if value is None or not math.isfinite(value):
        return math.inf
    shortfall = best - value if maximize else value - best
    return max(0.0, shortfall) / (abs(best) + PROFILE_EPS)


def performance_profile(
    results: Mapping[str, Mapping[str, float | None]],
    maximize: Mapping[str, bool],
    taus: Sequence[float],
) -> Profile:
    """ρ_s(τ) for every scheme s and every τ in `taus`; `results[task][scheme]` is the score
    (None or non-finite: ran and failed; absent: not run)."""
    schemes = sorted({s for per_task in results.values() for s in per_task})
    ratios: dict[str, list[float]] = {s: [] for s in schemes}
    ran: dict[str, list[str]] = {s: [] for s in schemes}
    not_run: dict[str, list[str]] = {s: [] for s in schemes}
    for task in sorted(results):
        per_task = results[task]
        if task not in maximize:
            raise ValueError(f"maximize[{task!r}]: missing, needed for the task's scores")
        finite = [v for v in per_task.values() if v is not None and math.isfinite(v)]
        best = (max(finite) if maximize[task] else min(finite)) if finite else 0.0
        for scheme in schemes:
            if scheme not in per_task:
                not_run[scheme].append(task)
                continue
            ran[scheme].append(task)
            ratios[scheme].append(1.0 + _gap(per_task[scheme], best, maximize[task]))
    rho = {s: [sum(r <= tau for r in ratios[s]) / len(ratios[s]) for tau in taus] for s in schemes}
    return Profile(list(taus), rho, ran, not_run)
