"""Leaderboard rows per arm, computed from the Optuna studies in storage.

`summarize_study(storage_url, study_key, spec) -> list[ArmSummary]`, ranked best first. Each row:

- **best configuration**: the sweep's best finished trial that did not diverge (`best_lr`,
  `best_params`, `best_sweep_value`);
- **objective mean ± std** over the final seeds (sample std, ddof = 1; None for one seed). A
  final seed that diverged counts with its diverged value (it is what the scheme did at that
  rate); failed seeds are left out. `final_values` lists the per-seed values for statistics,
  and `final_seeds` the seed of each, in the same order: a task board counts a re-run of the
  same configuration and seed once (`service.evidence`);
- **test metric mean ± std** over the final seeds that finished without diverging
  (`test_accuracy_*`, `test_loss_*`; `test_mean`/`test_std` are the one matching the objective);
- **steps and wall time to target**: the target is `objective.target` when the spec gives one,
  otherwise relative to the best arm: `target_fraction × best mean` for a metric to maximise,
  `best mean / target_fraction` to minimise, so every arm is timed to the same value. A seed
  reaches it at the first epoch whose validation metric meets it (epoch granularity; `step`
  and `wall_time` of that epoch); the row gives the median over the final seeds, where a seed
  that never reached counts as infinitely slow (None when more than half never did);
- **training time**: `train_time_s`, the seconds of training and evaluation of every trial of
  the arm (sweep and final seeds, pruned and diverged ones included), `train_steps` their
  optimizer steps, and `ms_per_step` the ratio: what the scheme's steps cost. A trial trained
  in a cohort of K (`worker.cohort`) shares its cohort's wall time and is charged 1/K of it,
  here and in `time_to_target_s`; batching makes that less than the trial would take alone,
  so `cohort_sizes` lists the sizes the arm's timed trials trained at (arms that batch
  differently, bmp never, are compared by time fairly only with `resources.cohort_size` 1);
- **schedule**: the arm's learning-rate schedule as its leaderboard setting names it
  (`worker.spec_schedule.setting_fields`; None for the constant rate, `{"name": "learned"}`
  for a hypergradient arm);
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
  (`worker.arms.hypergradient.arm`); `best_lr` is the best meta-iteration's SGD-equivalent rate.

- **status**: `failed` when every sweep trial failed, or every final seed (the arm has no
  result), with `error`, the first failed trial's (not one the driver interrupted); `ok`
  otherwise. `study_outcome` turns the rows into the study's status: `completed`,
  `completed_with_errors` (some arms failed, others have results) or `failed` (every arm);
- **rate range**: `lr_low`, `lr_high`, the range the sweep searched (its `values`' extremes for
  a list); `best_lr_at_edge` is `low` or `high` when the best rate lies in the outer tenth of the
  range (on its scale; an extreme value of a list) and no finished trial tried a rate beyond it:
  the optimum may lie outside the range;
- **statistics** of the final seeds (`worker.report.stats`, as the leaderboards show them):
  `interval_low`, `interval_high` (the mean's `confidence` Student-t interval, clipped to the
  metric's range), `ties` (arms Welch's test cannot separate from this one) and
  `too_few_seeds_to_tell` (arms it cannot separate because either has too few seeds).

Arms are ranked by the final mean; arms without one come next, then failed arms, in spec order.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from worker.arms.base import best_trial, final_study_name, sweep_study_name
from worker.arms.optuna.spec import OptunaArmSpec
from worker.spec_schedule import setting_fields, swept_fields
from worker.storage import open_storage, study_trials

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

    from worker.spec import SearchDimension, StudySpec

__all__ = [
    "ArmSummary",
    "edge_warnings",
    "lr_edge",
    "study_outcome",
    "summarize_arms",
    "summarize_study",
]

EDGE_FRACTION = 0.1  # of the searched range, on its scale: "at the edge"
CONFIDENCE = 0.95  # of the final seeds' interval and of Welch's test


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
    final_seeds: list[int] = field(default_factory=list)  # the seed of each final value
    n_seeds: int = 0
    test_metric: str = "test_accuracy"
    test_mean: float | None = None
    test_std: float | None = None
    test_accuracy_mean: float | None = None
    test_accuracy_std: float | None = None
    test_loss_mean: float | None = None
    test_loss_std: float | None = None
    schedule: dict[str, Any] | None = None
    target: float | None = None
    target_reached: int = 0
    steps_to_target: float | None = None
    time_to_target_s: float | None = None
    train_time_s: float = 0.0
    train_steps: int = 0
    ms_per_step: float | None = None
    cohort_sizes: list[int] = field(default_factory=list)
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
    status: str = "ok"  # or "failed": every sweep trial, or every final seed, failed
    error: str | None = None
    lr_low: float | None = None
    lr_high: float | None = None
    best_lr_at_edge: str | None = None  # "low" or "high"
    confidence: float = CONFIDENCE
    interval_low: float | None = None
    interval_high: float | None = None
    ties: list[str] = field(default_factory=list)
    too_few_seeds_to_tell: list[str] = field(default_factory=list)

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


def _first_error(trials: list[FrozenTrial]) -> str | None:
    for t in sorted(trials, key=lambda t: t.number):
        attrs = t.user_attrs
        if t.state == TrialState.FAIL and not attrs.get("interrupted") and attrs.get("error"):
            return str(attrs["error"])
    return None


def _all_failed(trials: list[FrozenTrial]) -> bool:
    """Some trials failed and none finished or waits to run."""
    states = {t.state for t in trials}
    return TrialState.FAIL in states and states == {TrialState.FAIL}


def _lr_range(dim: SearchDimension) -> tuple[float, float, bool]:
    if dim.values is not None:
        values = [float(v) for v in dim.values]
        return min(values), max(values), True
    assert dim.low is not None and dim.high is not None
    return dim.low, dim.high, dim.log


def lr_edge(dim: SearchDimension, best_lr: float, tried: list[float]) -> str | None:
    """`low` or `high` when `best_lr` lies at that edge of the range of `dim` (module
    docstring), else None."""
    low, high, log = _lr_range(dim)
    if dim.values is not None:
        position = 0.0 if best_lr <= low else 1.0 if best_lr >= high else 0.5
    else:
        scale = math.log10 if log else float
        position = (scale(best_lr) - scale(low)) / (scale(high) - scale(low))
    if position <= EDGE_FRACTION and best_lr <= min(tried, default=best_lr):
        return "low"
    if position >= 1 - EDGE_FRACTION and best_lr >= max(tried, default=best_lr):
        return "high"
    return None


def _share(t: FrozenTrial) -> int:
    """How many trials shared `t`'s wall time: its cohort's size, 1 when it trained alone."""
    cohort = t.user_attrs.get("cohort")
    return int(cohort.get("size", 1)) if isinstance(cohort, dict) else 1


def _reached(t: FrozenTrial, metric: str, target: float, maximize: bool) -> tuple[float, float]:
    for record in t.user_attrs.get("history", []):
        value = record.get(metric)
        if value is not None and (value >= target if maximize else value <= target):
            return float(record["step"]), float(record["wall_time"]) / _share(t)
    return math.inf, math.inf


def _add_training_time(row: ArmSummary, trials: list[FrozenTrial]) -> None:
    """The arm's charged seconds and steps over every trial that trained (module docstring)."""
    timed = [t for t in trials if isinstance(t.user_attrs.get("wall_time"), int | float)]
    row.train_time_s = sum(float(t.user_attrs["wall_time"]) / _share(t) for t in timed)
    row.train_steps = sum(int(t.user_attrs.get("steps") or 0) for t in timed)
    if row.train_steps:
        row.ms_per_step = 1000.0 * row.train_time_s / row.train_steps
    row.cohort_sizes = sorted({_share(t) for t in timed})


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
    if _all_failed(sweep) or _all_failed(final):
        row.status = "failed"
    row.error = _first_error(sweep) or _first_error(final)
    space = spec.arm_search_space(arm) if arm.tuner == "optuna" else {}
    if isinstance(arm, OptunaArmSpec):
        row.schedule = setting_fields(spec.arm_schedule(arm), swept_fields(spec, arm))
    else:  # the hypergradient tuner learns its per-step schedules
        row.schedule = {"name": "learned"}
    _add_training_time(row, sweep + final)
    if "lr" in space:
        row.lr_low, row.lr_high, _ = _lr_range(space["lr"])
    best = best_trial(sweep, objective.maximize)
    if best is None:
        return row
    row.best_trial, row.best_params, row.best_sweep_value = best.number, best.params, best.value
    row.best_lr = best.user_attrs.get("lr")
    if "lr" in space:
        band = rate_band(sweep, best, objective.maximize, objective.band_tolerance)
        if band is not None:
            row.band_low, row.band_high = band
            row.band_decades = math.log10(band[1] / band[0])
        tried = [
            float(t.user_attrs["lr"])
            for t in sweep
            if t.state == TrialState.COMPLETE and "lr" in t.user_attrs
        ]
        if row.best_lr is not None:
            row.best_lr_at_edge = lr_edge(space["lr"], float(row.best_lr), tried)
    seeds = [t for t in final if t.state == TrialState.COMPLETE and t.value is not None]
    row.final_values = [float(t.value) for t in seeds]  # type: ignore[arg-type]
    row.final_seeds = [int(t.user_attrs.get("seed", spec.seed)) for t in seeds]
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
            rows[i].status == "failed",
            rows[i].objective_mean is None,
            -(rows[i].objective_mean or 0.0) if maximize else (rows[i].objective_mean or 0.0),
            i,
        ),
    )
    ranked = [rows[i] for i in order]
    for rank, row in enumerate(ranked, start=1):
        row.rank = rank
    _add_statistics(ranked, spec)
    return ranked


def _add_statistics(rows: list[ArmSummary], spec: StudySpec) -> None:
    """Each arm's interval and the arms it cannot be told apart from (`worker.report.stats`),
    as the leaderboards show them."""
    from worker.report.stats import metric_range, rank_arms

    metric = spec.objective.metric
    seeds = {r.arm: r.final_values for r in rows if r.final_values}
    ranked = rank_arms(seeds, spec.objective.maximize, CONFIDENCE, metric_range(metric))
    by_arm = {r.arm: r for r in ranked}
    for row in rows:
        stats = by_arm.get(row.arm)
        if stats is None:
            continue
        row.interval_low, row.interval_high = stats.interval.low, stats.interval.high
        row.ties = list(stats.not_distinguishable_from)
        row.too_few_seeds_to_tell = list(stats.too_few_seeds_to_tell)


def study_outcome(rows: list[ArmSummary]) -> tuple[str, str | None]:
    """The finished study's status and error from its arms' rows: `completed`, or
    `completed_with_errors` when some arms failed and others have results, or `failed` when
    every arm failed; the error names each failed arm and its first error."""
    failed = [r for r in rows if r.status == "failed"]
    if not failed:
        return "completed", None
    error = "; ".join(f"arm {r.arm} failed: {r.error or 'no trial finished'}" for r in failed)
    status = "failed" if len(failed) == len(rows) else "completed_with_errors"
    return status, error[:4000]


def edge_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per arm (a row as `ArmSummary.to_dict()`) whose best rate lies at an edge of
    the range it searched: the optimum may lie outside it."""
    lines = []
    for row in rows:
        edge, best = row.get("best_lr_at_edge"), row.get("best_lr")
        if edge is None or best is None:
            continue
        low, high = row.get("lr_low"), row.get("lr_high")
        where = "" if low is None or high is None else f" [{low:.3g}, {high:.3g}]"
        lines.append(
            f"arm {row['arm']}: best lr {best:.3g} lies at the {edge} edge of its range{where}; "
            "the optimum may lie outside it (widen search_space.lr)"
        )
    return lines


def summarize_study(storage_url: str, study_key: str, spec: StudySpec) -> list[ArmSummary]:
    """The leaderboard rows of the study `study_key` in the storage at `storage_url`."""
    storage = open_storage(storage_url)
    try:
        return summarize_arms(storage, study_key, spec)
    finally:
        storage.engine.dispose()
