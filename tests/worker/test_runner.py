"""The trial runner: deterministic, measures each epoch, detects divergence, obeys pruning."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

import optim
from worker.runner import TrialConfig, diverged_value, run_trial
from worker.spec import DataOptions, ModelOptions

DIGITS = TrialConfig(
    task="digits-mlp",
    scheme="sgd",
    hyperparameters={"lr": 0.1, "momentum": 0.9},
    epochs=3,
    data={"batch_size": 32, "n_train": 320, "n_val": 200},
    model={"width": 16, "depth": 1},
    device="cpu",
)


class Recorder:
    """A reporter that keeps what it is told and prunes from `prune_at` on."""

    def __init__(self, prune_at: int | None = None) -> None:
        self.prune_at = prune_at
        self.seen: list[tuple[int, float]] = []

    def report(self, epoch: int, value: float) -> bool:
        self.seen.append((epoch, value))
        return self.prune_at is not None and epoch >= self.prune_at


def _losses(config: TrialConfig) -> list[tuple[float, float]]:
    return [(r.train_loss, r.val_loss) for r in run_trial(config).history]


def test_same_config_same_history_other_seed_other_history() -> None:
    assert _losses(DIGITS) == _losses(DIGITS)
    assert _losses(DIGITS) != _losses(replace(DIGITS, seed=1))


def test_every_epoch_is_measured_and_reported() -> None:
    recorder = Recorder()
    result = run_trial(DIGITS, recorder)
    assert result.outcome == "complete"
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert [r.step for r in result.history] == [10, 20, 30]  # 320 examples / 32 per batch
    assert recorder.seen == [(r.epoch, r.val_accuracy) for r in result.history]
    assert result.value == result.history[-1].val_accuracy
    walls = [r.wall_time for r in result.history]
    assert walls == sorted(walls) and all(r.examples_per_sec > 0 for r in result.history)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.test_accuracy is None  # the test split is for final seeds only


def test_val_loss_objective_is_reported_when_chosen() -> None:
    recorder = Recorder()
    result = run_trial(replace(DIGITS, objective="val_loss"), recorder)
    assert (
        recorder.seen[-1] == (3, result.history[-1].val_loss)
        and result.value == recorder.seen[-1][1]
    )


def test_pruning_stops_the_trial_after_the_reported_epoch() -> None:
    result = run_trial(DIGITS, Recorder(prune_at=2))
    assert result.outcome == "pruned"
    assert len(result.history) == 2 and result.value == result.history[-1].val_accuracy


def test_a_huge_rate_diverges_and_records_the_worst_value() -> None:
    config = replace(DIGITS, hyperparameters={"lr": 80.0, "momentum": 0.9}, epochs=3)
    result = run_trial(config, Recorder())
    assert result.outcome == "diverged"
    assert result.diverged_at_step is not None and result.diverged_at_step <= 30
    chance = math.log(10)  # the cross-entropy of knowing nothing of 10 classes
    assert result.value == diverged_value("val_accuracy", chance, config.divergence_factor) == 0.0
    bound = diverged_value("val_loss", chance, 10.0)
    assert bound == pytest.approx(10 * math.log(10))
    json.dumps(result.user_attrs(), allow_nan=False)  # NaN never reaches storage


def test_steps_per_epoch_and_test_metrics_of_final_seeds() -> None:
    config = replace(DIGITS, steps_per_epoch=7, evaluate_test=True, epochs=2)
    result = run_trial(config)
    assert result.steps == 14 and [r.step for r in result.history] == [7, 14]
    assert result.test_accuracy is not None and 0 <= result.test_accuracy <= 1
    attrs = result.user_attrs()
    assert attrs["test_loss"] == result.test_loss and attrs["outcome"] == "complete"
    json.dumps(attrs, allow_nan=False)


def test_batch_larger_than_the_training_split_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        run_trial(replace(DIGITS, data={"batch_size": 512, "n_train": 100}))


@pytest.mark.parametrize("scheme", ["bmp", "lars", "lamb"])
def test_layerwise_schemes_record_their_factors_every_epoch(scheme: str) -> None:
    assert optim.SCHEMES[scheme].layerwise
    result = run_trial(replace(DIGITS, scheme=scheme, hyperparameters={"lr": 0.01}, epochs=2))
    factors = result.layer_factors
    assert factors is not None and len(factors["values"]) == 2
    assert all(len(row) == len(factors["names"]) > 0 for row in factors["values"])
    assert run_trial(DIGITS).layer_factors is None


def test_transformed_mlp_trains_with_periodic_updates() -> None:
    config = replace(
        DIGITS, model={"width": 16, "depth": 2, "transformed": True, "transform_every": 5}
    )
    result = run_trial(config)
    assert result.outcome == "complete" and result.history[-1].val_accuracy > 0.2


def test_mnist1d_resnet_and_a_cifar_cnn_train(
    cifar10_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resnet = TrialConfig(
        "mnist1d-resnet",
        "adam",
        {"lr": 0.003},
        epochs=1,
        data={"n_train": 256},
        model={"width": 16, "depth": 1},
        device="cpu",
    )
    assert run_trial(resnet).outcome == "complete"
    monkeypatch.setenv("RATEBENCH_CIFAR_DIR", str(cifar10_dir))
    cnn = TrialConfig(
        "cifar10-cnn",
        "sgd",
        {"lr": 0.01},
        epochs=1,
        data={"batch_size": 4, "n_val": 4},
        model={"width": 4, "depth": 1},
        device="cpu",
        evaluate_test=True,
    )
    result = run_trial(cnn)
    assert result.steps == 4 and result.test_accuracy is not None


def test_a_configs_options_are_the_specs_validated_when_it_is_made() -> None:
    assert isinstance(DIGITS.data, DataOptions) and isinstance(DIGITS.model, ModelOptions)
    assert DIGITS.data.val_fraction == 0.2 and DIGITS.model.transform_every == 100  # spec defaults
    with pytest.raises(ValidationError, match="batch_size"):
        replace(DIGITS, data={"batch_size": 0})


def test_a_step_schedule_drops_the_rate_at_its_milestone_step() -> None:
    """Steps are optimizer steps over the whole budget: a milestone at 0.5 of 2 × 10 steps
    drops the rate before step 11, so with a factor of 1e-9 the second epoch barely moves the
    weights, where at a constant rate it does."""
    config = replace(DIGITS, epochs=2, hyperparameters={"lr": 0.1})
    frozen = run_trial(
        replace(config, schedule={"name": "step", "milestones": [0.5], "factor": 1e-9})
    )
    plain = run_trial(config)
    assert frozen.history[0].val_loss == plain.history[0].val_loss  # the same first epoch
    assert frozen.history[1].val_loss == pytest.approx(frozen.history[0].val_loss, rel=1e-6)
    assert plain.history[1].val_loss != pytest.approx(plain.history[0].val_loss, rel=1e-3)


def test_the_schedule_spans_the_budget_even_when_the_trial_is_pruned() -> None:
    """A trial pruned after epoch 1 trained epoch 1 exactly as the unpruned trial did: the
    cosine runs over all epochs' steps, not over the steps a trial happens to train."""
    config = replace(DIGITS, schedule={"name": "cosine", "warmup": 0.1})
    pruned, whole = run_trial(config, Recorder(prune_at=1)), run_trial(config)
    assert pruned.outcome == "pruned" and len(pruned.history) == 1
    assert pruned.history[0].val_loss == whole.history[0].val_loss
    assert whole.history[0].val_loss != run_trial(DIGITS).history[0].val_loss


def test_a_bad_schedule_given_by_hand_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="milestones"):
        replace(DIGITS, schedule={"name": "step"})
