"""Every sampler a spec may name is a working Optuna sampler that keeps to the search space.

The sweep drives samplers by ask/tell (`worker.arms.optuna`); this drives them the same way on a
cheap objective, so a sampler that fails to import, ignores the bounds or the log scale, or
never moves off its start-up points is caught without training networks.
"""

from __future__ import annotations

import math

import optuna
import pytest

from worker.arms.optuna.sampling import make_sampler, suggest
from worker.spec import StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(sampler: str) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "samplers",
            "task": "mnist1d-mlp",
            "arms": [{"optimizer": "sgd"}],
            "search_space": {
                "lr": {"low": 1e-4, "high": 1.0, "log": True},
                "momentum": {"low": 0.0, "high": 0.99},
            },
            "budget": {"trials_per_arm": 24},
            "sampler": {"name": sampler, "n_startup_trials": 6}
            if sampler not in {"random", "grid"}
            else sampler,
        }
    )


# CMA-ES and the Gaussian process take seconds to fit their samples; the others a fraction.
@pytest.mark.parametrize(
    "name",
    ["random", "grid", "tpe"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("cmaes", "gp")],
)
def test_sampler_keeps_to_the_space_and_improves_on_its_start(name: str) -> None:
    spec = _spec(name)
    space = spec.arm_search_space(spec.arms[0])
    study = optuna.create_study(direction="minimize")
    study.sampler = make_sampler(spec, space, "sgd", seed=0)
    # Best at lr = 1e-2, momentum = 0.9; distance measured in log10(lr).
    for _ in range(spec.budget.trials_per_arm):
        trial = study.ask()
        params = suggest(trial, space, "sgd")
        assert 1e-4 <= params["lr"] <= 1.0
        assert 0.0 <= params["momentum"] <= 0.99
        value = (math.log10(params["lr"]) + 2) ** 2 + (params["momentum"] - 0.9) ** 2
        study.tell(trial, value)
    values = [t.value for t in study.trials if t.value is not None]
    assert len(values) == spec.budget.trials_per_arm
    assert min(values) < 0.25, (name, study.best_params)
    if name not in {"random", "grid"}:  # model-based: its own proposals reach the optimum
        assert min(values[6:]) < 0.1, (name, values)
