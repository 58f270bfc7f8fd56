"""Task plugins: the example plugin (examples/plugins/ratebench-friedman) installed with
`pip install --target` into a temporary folder (not into the test venv: `plugin_site` in
tests/conftest.py), found through its entry points, checked at validation, trained by the runner
and the cohort engine, and refused by a worker that lacks it or has another version."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from worker.cohort import batching_problem, run_cohort
from worker.failures import classify
from worker.runner import TrialConfig, run_trial
from worker.spec import StudySpec, format_errors
from worker.tasks import (
    Dataset,
    DataShape,
    Model,
    Splits,
    Task,
    TaskMismatchError,
    get_task,
    load_task_data,
    register,
    registry,
    require,
    tasks,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = {
    "name": "friedman",
    "task": "friedman-gmlp",
    "data": {"batch_size": 100, "n_train": 1000},
    "model": {"hidden": 16, "blocks": 1},
    "arms": [{"optimizer": "adam"}],
    "budget": {"trials_per_arm": 2, "epochs": 2, "final_seeds": 1},
}


def _config(**changes: Any) -> TrialConfig:
    """A trial of the plugin's plain MLP (made once the plugin is on the path: a config names
    its task's package and version as this process has them)."""
    base: dict[str, Any] = {
        "task": "friedman-mlp",
        "scheme": "sgd",
        "hyperparameters": {"lr": 0.01, "momentum": 0.9},
        "epochs": 3,
        "data": {"batch_size": 100, "n_train": 1000},
        "model": {"width": 16},
        "objective": "val_loss",
    }
    return TrialConfig(**{**base, **changes})


def _errors(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as refused:
        StudySpec.model_validate(spec)
    return format_errors(refused.value)


def test_a_fresh_interpreter_finds_the_plugin_through_its_entry_points(plugin_site: Path) -> None:
    probe = (
        "import json; from worker.tasks import describe_tasks; "
        "print(json.dumps([t for t in describe_tasks() if t['name'].startswith('friedman')]))"
    )
    env = {**os.environ, "PYTHONPATH": f"{plugin_site}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    found = {t["name"]: t for t in json.loads(done.stdout)}
    assert set(found) == {"friedman-gmlp", "friedman-mlp"}
    gmlp = found["friedman-gmlp"]
    assert (gmlp["package"], gmlp["version"]) == ("ratebench-friedman", "0.1.0")
    assert (gmlp["kind"], gmlp["loss"], gmlp["metrics"]) == (
        "regression",
        "mean squared error",
        ["val_loss"],
    )
    assert (gmlp["input_shape"], gmlp["n_outputs"]) == ([10], 1)
    assert [o["name"] for o in gmlp["options"]] == ["hidden", "blocks", "gate"]
    assert gmlp["options"][2]["choices"] == ["silu", "sigmoid"]


def test_the_built_in_tasks_are_ratebench_s_own_entry_point() -> None:
    """One path: ratebench's tasks are found as a plugin's are, and carry its version."""
    (own,) = [ep for ep in importlib.metadata.entry_points(group="ratebench.tasks")
              if ep.dist is not None and ep.dist.metadata["Name"] == "ratebench"]  # fmt: skip
    assert own.value == "worker.tasks.builtin:tasks"
    version = importlib.metadata.version("ratebench")
    # inline tasks (the Python API's, registered by other tests in this process) have no package
    installed = [t for t in tasks().values() if t.package is not None]
    assert {(t.package, t.version) for t in installed} == {("ratebench", version)}
    assert "mnist1d-mlp" in tasks() and "files-regression-mlp" in tasks()


def test_tasks_are_read_once_per_process(plugin_site: Path) -> None:
    before = set(tasks())
    sys.path.insert(0, str(plugin_site))
    try:
        assert set(tasks()) == before  # the entry points were read already
        registry._installed.cache_clear()  # a new process would read them again
        assert {"friedman-gmlp", "friedman-mlp"} <= set(tasks())
    finally:
        sys.path.remove(str(plugin_site))
        sys.modules.pop("ratebench_friedman", None)
        registry._installed.cache_clear()


def test_a_broken_entry_point_is_logged_and_the_others_still_load(
    tmp_path: Path, plugin_site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ratebench.tasks]\nbroken = no_such_module:tasks\n")
    sys.path[:0] = [str(tmp_path), str(plugin_site)]
    registry._installed.cache_clear()
    try:
        with caplog.at_level(logging.ERROR, logger="worker.tasks.registry"):
            found = tasks()
        assert "friedman-gmlp" in found and "mnist1d-mlp" in found
        assert "entry point 'broken' (no_such_module:tasks) of broken-plugin" in caplog.text
        assert "No module named 'no_such_module'" in caplog.text
    finally:
        del sys.path[:2]
        sys.modules.pop("ratebench_friedman", None)
        registry._installed.cache_clear()


def test_a_spec_is_checked_against_the_plugin_s_option_schema(plugin_installed: Path) -> None:
    errors = _errors({**SPEC, "model": {"hidden": 2, "gate": "relu", "width": 8}})
    assert errors == [
        "model.width: the gmlp model of friedman-gmlp has no option 'width'; its options: "
        "hidden, blocks, gate",
        "model.hidden: must be >= 4, got 2",
        "model.gate: must be one of silu, sigmoid, got 'relu'",
    ]
    errors = _errors({**SPEC, "arms": [{"optimizer": "sgd", "model": {"blocks": 9}}]})
    assert errors == ["arms.0.model.blocks: must be <= 8, got 9"]
    errors = _errors({**SPEC, "objective": {"metric": "val_accuracy"}})
    assert errors == [
        "objective.metric: friedman-gmlp is a regression task (mean squared error); its "
        "metrics: val_loss"
    ]
    spec = StudySpec.model_validate(SPEC)
    assert (spec.objective.metric, spec.objective.direction) == ("val_loss", "minimize")
    assert spec.steps_per_epoch() == 10  # n_train 1000 / batch 100, from the plugin's shape


def test_bmp_refuses_the_gated_block_by_name_and_trains_the_plain_mlp(
    plugin_installed: Path,
) -> None:
    (error,) = _errors({**SPEC, "arms": [{"optimizer": "bmp"}]})
    assert error.startswith("arms.0.optimizer: bmp cannot train the gmlp of friedman-gmlp: ")
    assert "1 (GatedBlock): unsupported layer type" in error
    StudySpec.model_validate({**SPEC, "task": "friedman-mlp", "model": {}, "arms": [
        {"optimizer": "bmp"}, {"optimizer": "lars"}, {"optimizer": "lamb"}]})  # fmt: skip
    result = run_trial(_config(scheme="bmp", hyperparameters={"lr": 0.01}, epochs=1))
    assert result.layer_factors is not None and result.layer_factors["names"]


def test_the_plugin_s_regression_trains_with_its_loss(plugin_installed: Path) -> None:
    result = run_trial(_config(evaluate_test=True))
    assert result.outcome == "complete"
    losses = [r.val_loss for r in result.history]
    chance = load_task_data(get_task("friedman-mlp"), _config().data.model_dump()).chance_loss
    assert losses[-1] < losses[0] and losses[-1] < chance / 1.5  # well below predicting the mean
    assert all(r.val_accuracy is None for r in result.history)
    assert result.test_accuracy is None and result.test_loss is not None
    attrs = result.user_attrs()
    assert "test_accuracy" not in attrs and attrs["history"][0]["val_accuracy"] is None


def test_a_regression_diverges_at_factor_times_the_targets_mean_square(
    plugin_installed: Path,
) -> None:
    """The chance level of a regression is the loss of predicting zero, what an untrained
    network does: the targets' mean square (234 here), not their variance (25)."""
    data = load_task_data(get_task("friedman-mlp"), _config().data.model_dump())
    square = float(data.y_train.double().pow(2).mean())
    assert data.chance_loss == pytest.approx(square) and 200 < square < 260
    first = run_trial(_config(epochs=1, hyperparameters={"lr": 1e-3, "momentum": 0.9}))
    assert first.outcome == "complete"  # its first losses lie near the chance level
    result = run_trial(_config(hyperparameters={"lr": 5.0, "momentum": 0.9}))
    assert result.outcome == "diverged"
    assert result.value == pytest.approx(10.0 * square)  # the default divergence_factor


def test_a_cohort_of_plugin_models_matches_separate_runs(plugin_installed: Path) -> None:
    configs = [
        _config(
            task="friedman-gmlp",
            model={"hidden": 8, "blocks": 1},
            scheme="adam",
            hyperparameters={"lr": lr},
            seed=seed,
            epochs=2,
            dtype="float64",
        )
        for lr, seed in ((1e-3, 0), (3e-3, 1))
    ]
    together = run_cohort(configs)
    for config, member in zip(configs, together, strict=True):
        alone = run_trial(config)
        assert member.value == pytest.approx(alone.value, rel=1e-9)
        assert [r.val_loss for r in member.history] == pytest.approx(
            [r.val_loss for r in alone.history], rel=1e-9
        )


class _Branchy(nn.Module):
    """A model `vmap` cannot batch: it branches on its input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x) if x.sum() > 0 else -self.linear(x)
        return out


def test_a_model_that_cannot_batch_says_why(sqlite_url: str) -> None:
    from worker.arms.optuna.arm import OptunaArmRun
    from worker.storage import open_storage

    task = register(
        Task(
            "test-branchy",
            Dataset(
                "test-branchy",
                "",
                "regression",
                lambda _: Splits(0, 0, 0, 0),
                DataShape((4,), 1, 100),
            ),
            Model("branchy", "", lambda shape, n: _Branchy()),
        )
    )
    problem = batching_problem(task, {}, {})
    assert problem is not None and "data-dependent control flow" in problem
    assert batching_problem(get_task("mnist1d-mlp"), {}, {"transformed": True}) is None
    assert batching_problem(get_task("digits-vgg"), {}, {"width": 4}) is None
    spec = StudySpec.model_validate(
        {"name": "branchy", "task": task.name, "arms": [{"optimizer": "sgd"}]}
    )
    run = OptunaArmRun.open(spec, 0, open_storage(sqlite_url), "branchy")
    assert run.cohort_size == 1  # "auto" would batch a model this small
    assert run.sweep.user_attrs["cohort_note"] == (
        "the branchy model of test-branchy does not train as a batched cohort (torch.func.vmap): "
        f"{problem}; its trials run one per task"
    )


def test_require_names_the_package_and_both_versions(plugin_installed: Path) -> None:
    assert require("friedman-gmlp", "ratebench-friedman", "0.1.0").package == "ratebench-friedman"
    with pytest.raises(TaskMismatchError) as other:
        require("friedman-gmlp", "ratebench-friedman", "0.2.0")
    assert str(other.value) == (
        "task 'friedman-gmlp' comes from ratebench-friedman 0.1.0 on this worker, but the study "
        "was validated with ratebench-friedman 0.2.0; install ratebench-friedman==0.2.0 on "
        "every Ray node"
    )


def _on_ray(config: TrialConfig, site: Path | None) -> Any:
    """`config` trained in a Ray task whose worker has `site` on its path (None: no plugin)."""
    import ray

    from worker.runner import run_trial as train

    remote = ray.remote(max_retries=0)(train)
    if site is not None:
        remote = remote.options(runtime_env={"env_vars": {"PYTHONPATH": str(site)}})
    return ray.get(remote.remote(config))


@pytest.mark.ray
def test_workers_without_the_plugin_or_with_another_version_fail_without_retry(
    ray_runtime: None, plugin_installed: Path, old_plugin_site: Path
) -> None:
    """The driver (this process) has ratebench-friedman 0.1.0; the session's Ray workers have no
    plugin, and a worker given the 0.0.9 install has another version."""
    config = _config(epochs=1)
    assert (config.task_package, config.task_version) == ("ratebench-friedman", "0.1.0")
    for site, expected in (
        (None, "TaskMismatchError: task 'friedman-mlp' needs the package ratebench-friedman "
               "0.1.0, which is not installed on this worker; install "
               "ratebench-friedman==0.1.0 on every Ray node"),
        (old_plugin_site, "TaskMismatchError: task 'friedman-mlp' comes from ratebench-friedman "
                          "0.0.9 on this worker, but the study was validated with "
                          "ratebench-friedman 0.1.0; install ratebench-friedman==0.1.0 on "
                          "every Ray node"),
    ):  # fmt: skip
        with pytest.raises(Exception, match="TaskMismatchError") as failed:
            _on_ray(config, site)
        failure = classify(failed.value)  # type: ignore[arg-type]
        assert failure.error == expected and failure.retry is False
    result = _on_ray(config, plugin_installed)  # the same version: it trains
    assert result.outcome == "complete" and math.isfinite(result.value)
