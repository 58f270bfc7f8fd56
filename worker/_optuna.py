"""The spec's sampler, pruner and search space as Optuna objects.

Choices:
- Every arm's sampler gets the same seed (`spec.seed` plus the number of trials the arm already
  has, so a resumed study does not replay the rates it has tried), so a random or grid sweep
  proposes the same rates to every arm: a like-for-like comparison.
- TPE runs with `constant_liar` (Optuna's default since 5.0): with several trials in flight the
  running ones count as bad, so concurrent trials do not pile onto one rate.
- `grid`: a dimension given as `values` is used as is; a range becomes
  `round(trials_per_arm ** (1 / dims))` points (at least 2), evenly spaced on its scale.
- Pruners see one intermediate value per epoch (`step` = epoch, from 1). Hyperband and
  successive halving use epochs as the resource (`min_epochs` … `budget.epochs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna

import optim

if TYPE_CHECKING:
    from worker.spec import SearchDimension, StudySpec

__all__ = ["grid_values", "make_pruner", "make_sampler", "suggest"]


def grid_values(spec: StudySpec, space: dict[str, SearchDimension], scheme: str) -> dict[str, Any]:
    """The grid sampler's points for each dimension of `space`."""
    points = max(2, round(spec.budget.trials_per_arm ** (1 / max(1, len(space)))))
    grid: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.values is not None:
            grid[name] = list(dim.values)
            continue
        assert dim.low is not None and dim.high is not None
        if dim.log:
            values = np.geomspace(dim.low, dim.high, points)
        else:
            values = np.linspace(dim.low, dim.high, points)
        if optim.SCHEMES[scheme].hyperparameter(name).type == "int":
            grid[name] = sorted({round(float(v)) for v in values})
        else:
            grid[name] = [float(v) for v in values]
    return grid


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its `study.stop()` once the grid is covered: that call only
    works inside `study.optimize`, and here the arm's budget ends the sweep."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def make_sampler(
    spec: StudySpec, space: dict[str, SearchDimension], scheme: str, seed: int
) -> optuna.samplers.BaseSampler:
    sampler = spec.sampler
    startup: dict[str, Any] = {}
    if sampler.n_startup_trials is not None:
        startup["n_startup_trials"] = sampler.n_startup_trials
    if sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sampler.name == "grid":
        return _GridSampler(grid_values(spec, space, scheme), seed=seed)
    if sampler.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    if sampler.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **startup)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    pruner = spec.pruner
    if pruner.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_epochs
        )
    if pruner.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruner.min_epochs, reduction_factor=pruner.reduction_factor
        )
    if pruner.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner.min_epochs,
            max_resource=spec.budget.epochs,
            reduction_factor=pruner.reduction_factor,
        )
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension], scheme: str) -> dict[str, Any]:
    """Ask `trial` for a value of every dimension (enqueued trials get their fixed values)."""
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.values is not None:
            params[name] = trial.suggest_categorical(name, list(dim.values))
            continue
        assert dim.low is not None and dim.high is not None
        if optim.SCHEMES[scheme].hyperparameter(name).type == "int":
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params
