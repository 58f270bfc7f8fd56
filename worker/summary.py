"""Leaderboard rows per arm, computed from the Optuna studies in storage.

`summarize_study(storage_url, study_key, spec) -> list[ArmSummary]`, ranked best first. Each row:

- **best configuration**: the sweep's best finished trial that did not diverge (`best_lr`,
  `best_params`, `best_sweep_value`);
- **objective mean ± std** over the final seeds (sample std, ddof = 1; None for one seed). A
  final seed that diverged counts with its diverged value (it is what the scheme did at that
  rate); failed seeds are left out. `final_values` lists the per-seed values for statistics;
- **test metric mean ± std** over the final seeds that finished without diverging
  (`test_accuracy_*`, `test_loss_*`; `test_mean`/`test_std` are the one matching the objective);
- **steps and wall time to target**: the target is `objective.target` when the spec gives one,
  otherwise relative to the best arm: `target_fraction × best mean` for a metric to maximise,
  `best mean / target_fraction` to minimise, so every arm is timed to the same value. A seed
  reaches it at the first epoch whose validation metric meets it (epoch granularity; `step`
  and `wall_time` of that epoch); the row gives the median over the final seeds, where a seed
  that never reached counts as infinitely slow (None when more than half never did);
- **rate band**: sweep trials (diverged ones included, pruned ones left out) sorted by rate;
  starting at the best trial, the band extends over neighbouring rates while their objective is
  within `band_tolerance` (relative) of the best: `value ≥ best − tol·|best|` (maximise) or
  `value ≤ best + tol·|best|` (minimise). `band_decades = log10(high / low)`: how far the rate
  may be off and still do nearly as well. Its resolution is the sweep's spacing of rates.
  Hypergradient arms have no band: their trials are the tuner's path, not a sweep of rates;
- **counts** of sweep trials: `n_trials` (every finished sweep trial, retries included),
  `n_complete` (finished, not diverged), `n_pruned`, `n_diverged`, `n_failed`, `n_running`,
  and `n_seeds` (final seeds with a value). For a hypergradient arm a sweep trial is a
  meta-iteration, and a failed or stopped tuning run is a failed trial
  (`worker._hypergrad_arm`); `best_lr` is the best meta-iteration's SGD-equivalent rate.

Arms are ranked by the final mean; arms without one come last in spec order.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from worker._arms import best_trial, final_study_name, sweep_study_name
from worker.storage import open_storage, study_trials

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

    from worker.spec import StudySpec

__all__ = ["ArmSummary", "summarize_arms", "summarize_study"]


@dataclass
class ArmSummary:
    arm: str
    scheme: str
    metric: str
    direction: str
    rank: int = 0
    best_trial: int | None = None
    best_lr: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_sweep_value: float | None = None
    objective_mean: float | None = None
    objective_std: float | None = None
    final_values: list[float] = field(default_factory=list)
    n_seeds: int = 0
    test_metric: str = "test_accuracy"
    test_mean: float | None = None
    test_std: float | None = None
    test_accuracy_mean: float | None = None
    test_accuracy_std: float | None = None
    test_loss_mean: float | None = None
    test_loss_std: float | None = None
    target: float | None = None
    target_reached: int = 0
    steps_to_target: float | None = None
    time_to_target_s: float | None = None
    band_tolerance: float = 0.0
    band_low: float | None = None
    band_high: float | None = None
    band_decades: float | None = None
    n_trials: int = 0
    n_complete: int = 0
    n_pruned: int = 0
    n_diverged: int = 0
    n_failed: int = 0
    n_running: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _diverged(t: FrozenTrial) -> bool:
    return t.user_attrs.get("outcome") == "diverged"


def rate_band(
    trials: list[FrozenTrial], best: FrozenTrial, maximize: bool, tolerance: float
) -> tuple[float, float] | None:
    """The contiguous band of rates around `best` within `tolerance` of its value."""
    points = sorted(
        (float(t.user_attrs["lr"]), float(t.value), t.number)
        for t in trials
        if t.state == TrialState.COMPLETE and "lr" in t.user_attrs and t.value is not None
    )
    assert best.value is not None
    best_value = float(best.value)
    slack = tolerance * abs(best_value)

    def near(value: float) -> bool:
        return value >= best_value - slack if maximize else value <= best_value + slack

    index = next((i for i, p in enumerate(points) if p[2] == best.number), None)
    if index is None:
        return None
    low = high = index
    while low > 0 and near(points[low - 1][1]):
        low -= 1
    while high < len(points) - 1 and near(points[high + 1][1]):
        high += 1
    return points[low][0], points[high][0]


def _reached(t: FrozenTrial, metric: str, target: float, maximize: bool) -> tuple[float, float]:
    for record in t.user_attrs.get("history", []):
        value = record.get(metric)
        if value is not None and (value >= target if maximize else value <= target):
            return float(record["step"]), float(record["wall_time"])
    return math.inf, math.inf


def _median_or_none(values: list[float]) -> float | None:
    if not values:
        return None
    middle = statistics.median(values)
    return None if math.isinf(middle) else middle


def _summarize_arm(
    spec: StudySpec, index: int, sweep: list[FrozenTrial], final: list[FrozenTrial]
) -> ArmSummary:
    arm, objective = spec.arms[index], spec.objective
    row = ArmSummary(str(arm.label), arm.optimizer, objective.metric, str(objective.direction))
    row.test_metric = "test_accuracy" if objective.metric == "val_accuracy" else "test_loss"
    row.band_tolerance = objective.band_tolerance
    row.n_complete = sum(t.state == TrialState.COMPLETE and not _diverged(t) for t in sweep)
    row.n_diverged = sum(t.state == TrialState.COMPLETE and _diverged(t) for t in sweep)
    row.n_pruned = sum(t.state == TrialState.PRUNED for t in sweep)
    row.n_failed = sum(t.state == TrialState.FAIL for t in sweep)
    row.n_running = sum(t.state == TrialState.RUNNING for t in sweep)
    row.n_trials = row.n_complete + row.n_diverged + row.n_pruned + row.n_failed
    best = best_trial(sweep, objective.maximize)
    if best is None:
        return row
    row.best_trial, row.best_params, row.best_sweep_value = best.number, best.params, best.value
    row.best_lr = best.user_attrs.get("lr")
    if arm.tuner == "optuna" and "lr" in spec.arm_search_space(arm):
        band = rate_band(sweep, best, objective.maximize, objective.band_tolerance)
        if band is not None:
            row.band_low, row.band_high = band
            row.band_decades = math.log10(band[1] / band[0])
    seeds = [t for t in final if t.state == TrialState.COMPLETE and t.value is not None]
    row.final_values = [float(t.value) for t in seeds]  # type: ignore[arg-type]
    row.n_seeds = len(seeds)
    row.objective_mean, row.objective_std = _mean_std(row.final_values)
    for name in ("test_accuracy", "test_loss"):
        values = [float(t.user_attrs[name]) for t in seeds if name in t.user_attrs]
        mean, std = _mean_std(values)
        setattr(row, f"{name}_mean", mean)
        setattr(row, f"{name}_std", std)
    row.test_mean = getattr(row, f"{row.test_metric}_mean")
    row.test_std = getattr(row, f"{row.test_metric}_std")
    return row


def _target(spec: StudySpec, rows: list[ArmSummary]) -> float | None:
    objective = spec.objective
    if objective.target is not None:
        return objective.target
    means = [r.objective_mean for r in rows if r.objective_mean is not None]
    if not means:
        return None
    if objective.maximize:
        return objective.target_fraction * max(means)
    return min(means) / objective.target_fraction


def summarize_arms(storage: RDBStorage, study_key: str, spec: StudySpec) -> list[ArmSummary]:
    """The leaderboard rows of `study_key` from an open storage, ranked best first."""
    rows, finals = [], []
    for index, arm in enumerate(spec.arms):
        label = str(arm.label)
        sweep = study_trials(storage, sweep_study_name(study_key, label))
        final = study_trials(storage, final_study_name(study_key, label))
        rows.append(_summarize_arm(spec, index, sweep, final))
        timed = [t for t in final if t.state == TrialState.COMPLETE]
        if not timed:  # no final seeds yet: time the best sweep trial
            timed = [t for t in sweep if t.number == rows[-1].best_trial]
        finals.append(timed)
    target = _target(spec, rows)
    maximize = spec.objective.maximize
    for row, timed in zip(rows, finals, strict=True):
        row.target = target
        if target is None or not timed:
            continue
        reached = [_reached(t, spec.objective.metric, target, maximize) for t in timed]
        row.target_reached = sum(math.isfinite(steps) for steps, _ in reached)
        row.steps_to_target = _median_or_none([steps for steps, _ in reached])
        row.time_to_target_s = _median_or_none([seconds for _, seconds in reached])
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            rows[i].objective_mean is None,
            -(rows[i].objective_mean or 0.0) if maximize else (rows[i].objective_mean or 0.0),
            i,
        ),
    )
    ranked = [rows[i] for i in order]
    for rank, row in enumerate(ranked, start=1):
        row.rank = rank
    return ranked


def summarize_study(storage_url: str, study_key: str, spec: StudySpec) -> list[ArmSummary]:
    """The leaderboard rows of the study `study_key` in the storage at `storage_url`."""
    storage = open_storage(storage_url)
    try:
        return summarize_arms(storage, study_key, spec)
    finally:
        storage.engine.dispose()
