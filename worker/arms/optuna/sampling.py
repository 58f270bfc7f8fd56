"""The spec's sampler, pruner and search space as Optuna objects.

Choices:
- A sweep's proposals depend on the seed and on how many originals came before, never on how
  often the sweep was interrupted. Each *original* trial (one without `retry_of`: a retry
  repeats its parameters and asks no sampler) gets a draw index, its rank among the study's
  originals, and is proposed by a sampler seeded from `(spec.seed, draw index)`
  (`_PerDrawSampler`). So a resumed study proposes what an uninterrupted one would: exactly the
  same points for `random` and `grid`; for `tpe`, `cmaes` and `gp` the same points given the same
  history (the history of a resumed study also holds the trials its dead driver left behind).
  Every arm gets the same seed, so a random or grid sweep proposes the same rates to every arm:
  a like-for-like comparison.
- `grid`: a dimension given as `values` is used as is; a range becomes
  `round(trials_per_arm ** (1 / dims))` points (at least 2), evenly spaced on its scale. The
  points are shuffled once by the seed and the original with draw index `i` runs point
  `i mod points`: a sweep with as many trials as points runs every point exactly once, however
  often it is resumed (Optuna's own GridSampler picks by RNG among unvisited points, which a
  resume reseeds).
- TPE runs with `constant_liar` (Optuna's default since 5.0): with several trials in flight the
  running ones count as bad, so concurrent trials do not pile onto one rate.
- Pruners see one intermediate value per epoch (`step` = epoch, from 1). Hyperband and
  successive halving use epochs as the resource (`min_epochs` … `budget.epochs`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

import optim
from worker.spec_schedule import is_schedule_param

if TYPE_CHECKING:
    from worker.spec import SearchDimension, StudySpec

__all__ = ["draw_index", "draw_seed", "grid_values", "make_pruner", "make_sampler", "suggest"]


def _integer(scheme: str, name: str) -> bool:
    """Whether dimension `name` takes whole numbers: an int hyperparameter of the scheme (a
    schedule's fields, `schedule.*`, are all real numbers)."""
    if is_schedule_param(name):
        return False
    return optim.SCHEMES[scheme].hyperparameter(name).type == "int"


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
        if _integer(scheme, name):
            grid[name] = sorted({round(float(v)) for v in values})
        else:
            grid[name] = [float(v) for v in values]
    return grid


def draw_index(study: optuna.Study, trial: FrozenTrial) -> int:
    """How many originals (trials without `retry_of`) the study holds before `trial`, or before
    the original a retry repeats: a retry whose original died before its parameters were stored
    asks the sampler, and gets the proposal its original would have had."""
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    root = trial
    while root.user_attrs.get("retry_of") in by_number:
        root = by_number[root.user_attrs["retry_of"]]
    return sum(t.number < root.number and "retry_of" not in t.user_attrs for t in trials)


def draw_seed(seed: int, index: int) -> int:
    """The seed of draw `index` of a sweep seeded with `seed` (independent streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class _ByDraw(optuna.samplers.BaseSampler):
    """Remembers each trial's draw index while it runs (one storage read per trial)."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}

    def _draw(self, study: optuna.Study, trial: FrozenTrial) -> int:
        if trial.number not in self._index:
            self._index[trial.number] = draw_index(study, trial)
        return self._index[trial.number]

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._index.pop(trial.number, None)


class _PerDrawSampler(_ByDraw):
    """Proposes each trial with a fresh `make(draw_seed(seed, draw index))` sampler.

    Optuna's samplers keep one RNG for the life of the object, so their n-th proposal depends on
    how many proposals the object made before: a resumed driver would start the stream again.
    A sampler made per trial from (seed, draw index) makes the proposal a function of the seed,
    the index and the study's history only.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        super().__init__()
        self._make, self._seed = make, seed
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        sampler = self._samplers.get(trial.number)
        if sampler is None:
            sampler = self._make(draw_seed(self._seed, self._draw(study, trial)))
            self._samplers[trial.number] = sampler
        return sampler

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        sampler = self._for(study, trial)
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        sampler = self._samplers.pop(trial.number, None)
        if sampler is not None:
            sampler.after_trial(study, trial, state, values)
        super().after_trial(study, trial, state, values)


class _GridSampler(_ByDraw):
    """Every point of the grid, in one seeded order, by draw index (module docstring)."""

    def __init__(self, grid: dict[str, list[Any]], seed: int) -> None:
        super().__init__()
        self._names = list(grid)
        points = list(itertools.product(*grid.values()))
        order = np.random.RandomState(seed % 2**32).permutation(len(points))
        self._points = [points[i] for i in order]

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if param_name not in self._names:
            raise ValueError(f"search_space.{param_name}: not on the grid ({self._names})")
        point = self._points[self._draw(study, trial) % len(self._points)]
        return point[self._names.index(param_name)]


def make_sampler(
    spec: StudySpec, space: dict[str, SearchDimension], scheme: str, seed: int
) -> optuna.samplers.BaseSampler:
    """The spec's sampler for one arm; its proposals follow from `seed` and the draw index."""
    sampler = spec.sampler
    if sampler.name == "grid":
        return _GridSampler(grid_values(spec, space, scheme), seed)
    startup: dict[str, Any] = {}
    if sampler.n_startup_trials is not None:
        startup["n_startup_trials"] = sampler.n_startup_trials

    def make(s: int) -> optuna.samplers.BaseSampler:
        if sampler.name == "random":
            return optuna.samplers.RandomSampler(seed=s)
        if sampler.name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=s, **startup)
        if sampler.name == "gp":
            return optuna.samplers.GPSampler(seed=s, **startup)
        return optuna.samplers.TPESampler(seed=s, constant_liar=True, **startup)

    return _PerDrawSampler(make, seed)


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
        if _integer(scheme, name):
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params
