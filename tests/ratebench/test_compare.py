"""`ratebench.compare`: a study of the caller's own model and data, run in this process on the
session's Ray runtime, recorded in the database so that the REST API, its leaderboards, exports
and pages show it, marked as coming from the Python API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import ratebench
from service.app import create_app
from service.config import Settings


def _data() -> tuple[np.ndarray, ...]:
    """A linearly separable two-class problem in 6 dimensions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 6)).astype(np.float32)
    y = (x @ rng.standard_normal(6) > 0).astype(np.int64)
    return x[:500], y[:500], x[500:], y[500:]


STUDY: dict[str, Any] = {
    "budget": {"trials_per_arm": 2, "epochs": 2, "final_seeds": 2},
    "search_space": {"lr": {"values": [0.01, 0.1]}},
    "sampler": "grid",
    "pruner": "none",
    "data_options": {"batch_size": 50},
    "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 2},
}


def test_a_spec_error_names_the_field_before_anything_runs() -> None:
    from torch import nn

    def net() -> nn.Module:
        return nn.Linear(6, 2)

    with pytest.raises(ValueError, match=r"not a valid study:\n  budget\.epochs: "):
        ratebench.compare(net, _data(), ["sgd"], budget={"epochs": 0}, progress=False)
    with pytest.raises(ValueError, match=r"arms\.0\.optimizer: unknown scheme 'sgdd'"):
        ratebench.compare(net, _data(), ["sgdd"], progress=False)
    x_train, y_train, x_test, y_test = _data()
    broken = (x_train, y_train, x_test, y_test - 1)
    with pytest.raises(ValueError, match=r"y_test holds labels outside 0 to 1 \(-1 to 0\)"):
        ratebench.compare(net, broken, ["sgd"], progress=False)


@pytest.mark.ray
def test_a_compare_run_is_recorded_and_shown_over_rest(
    ray_runtime: None, database_url: str, tmp_path: Path
) -> None:
    from torch import nn

    def small_net() -> nn.Module:  # defined here, as in a notebook: it travels by value
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

    result = ratebench.compare(
        model=small_net, data=_data(), arms=["sgd", {"optimizer": "adam"}], name="api-study",
        database_url=database_url, progress=False, **STUDY,
    )  # fmt: skip
    assert result.status == "completed", result.error
    assert result.task == "python-small_net" and set(result.best_rates) == {"sgd", "adam"}
    board = result.leaderboard
    assert [row["rank"] for row in board] == [1, 2]
    assert all(row["n_seeds"] == 2 and row["mean"] > 0.6 for row in board)
    assert all(row["interval"][0] <= row["mean"] <= row["interval"][1] for row in board)
    assert "1. " in str(result) and "best lr" in str(result)
    paths = result.plots(tmp_path / "plots")
    assert [p.name for p in paths] == [f"api-study-{k}.png" for k in ("sensitivity", "curves",
                                                                       "factors")]  # fmt: skip
    assert all(p.stat().st_size > 1000 for p in paths)

    settings = Settings(database_url=database_url, data_dir=tmp_path, run_scheduler=False)
    with TestClient(create_app(settings, start_ray=False)) as http:
        study = http.get(f"/api/v1/studies/{result.study_id}").json()
        assert (study["source"], study["status"], study["task"]) == (
            "python", "completed", "python-small_net"
        )  # fmt: skip
        assert study["environment"]["task"] == {
            "name": "python-small_net", "package": None, "version": None
        }  # fmt: skip
        rows = http.get(f"/api/v1/studies/{result.study_id}/leaderboard").json()["arms"]
        assert [(r["arm"], r["objective_mean"]) for r in rows] == [
            (row["arm"], pytest.approx(row["mean"])) for row in board
        ]
        task_board = http.get("/api/v1/leaderboard", params={"task": "python-small_net"})
        assert task_board.status_code == 200 and task_board.json()["groups"]
        export = http.get(f"/api/v1/studies/{result.study_id}/export").json()
        studies = export["trials"]  # the Optuna studies: each arm's sweep and final seeds
        assert len(studies) == 4 and sum(len(study["trials"]) for study in studies) == 8
        page = http.get(f"/studies/{result.study_id}").text
        assert "run from the Python API" in page

    again = ratebench.compare(
        model=small_net, data=_data(), arms=["sgd", {"optimizer": "adam"}], name="api-study",
        database_url=database_url, progress=False, **STUDY,
    )  # fmt: skip
    assert again.study_id == result.study_id  # the same model, data and spec: the same study
    assert [row["mean"] for row in again.leaderboard] == [row["mean"] for row in board]
