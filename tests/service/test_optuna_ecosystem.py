"""ratebench's Optuna studies stay standard: Optuna's own API (what `optuna-dashboard` and
`optuna.visualization` use) opens the service's database and finds every trial with its scheme,
rate, metrics and state, without any ratebench code in between.
"""

from __future__ import annotations

import math
import warnings

import matplotlib
import optuna
import pytest
from optuna.trial import TrialState

from tests.service.helpers import FinishedStudy

matplotlib.use("Agg")

pytestmark = pytest.mark.slow


def _storage_url(finished: FinishedStudy) -> str:
    return f"sqlite:///{finished.service.data_dir / 'ratebench.db'}"


def test_every_trial_carries_scheme_rate_metrics_and_state(finished: FinishedStudy) -> None:
    url = _storage_url(finished)
    names = sorted(
        s.study_name
        for s in optuna.get_all_study_summaries(storage=url)
        if s.study_name.startswith(finished.study_id)
    )
    key = finished.study_id
    assert names == [f"{key}/adam", f"{key}/adam/final", f"{key}/sgd", f"{key}/sgd/final"]

    for name in names:
        study = optuna.load_study(study_name=name, storage=url)
        arm = name.split("/")[1]
        role = "final" if name.endswith("/final") else "sweep"
        assert study.user_attrs["arm"] == arm
        assert study.user_attrs["scheme"] == arm
        assert study.direction == optuna.study.StudyDirection.MAXIMIZE
        trials = study.get_trials()
        assert len(trials) == (3 if role == "sweep" else 2)
        for t in trials:
            assert t.state in {TrialState.COMPLETE, TrialState.PRUNED}, t
            attrs = t.user_attrs
            assert attrs["scheme"] == arm and attrs["arm"] == arm and attrs["role"] == role
            assert attrs["lr"] == pytest.approx(t.params["lr"])
            assert 1e-3 <= t.params["lr"] <= 1.0
            assert attrs["outcome"] in {"complete", "diverged"}
            history = attrs["history"]
            if attrs["outcome"] == "diverged":  # a result: recorded where it diverged
                assert attrs["diverged_at_step"] >= 1
                assert [epoch["epoch"] for epoch in history] in ([], [1])
                continue
            assert [epoch["epoch"] for epoch in history] == [1]
            for metric in ("train_loss", "val_loss", "val_accuracy", "examples_per_sec"):
                assert math.isfinite(history[-1][metric]), (metric, history[-1])
            assert t.value == pytest.approx(history[-1]["val_accuracy"])
            if role == "sweep":
                assert set(t.intermediate_values) == {1}  # reported for the pruner, per epoch
            else:
                assert attrs["test_accuracy"] is not None


def test_optuna_visualization_draws_a_sweep(finished: FinishedStudy) -> None:
    study = optuna.load_study(study_name=f"{finished.study_id}/sgd", storage=_storage_url(finished))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_slice(study, params=["lr"])
    points = axes.collections[0].get_offsets()
    assert len(points) == 3
