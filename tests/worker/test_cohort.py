"""Cohorts: K trials trained as one batched model give each member its separate run's result.

Every comparison trains the same configs twice, one by one with `run_trial` and together with
`run_cohort`, and compares everything but timings. Float64 runs must agree to 1e-10 (relative,
on losses; accuracies exactly); float32 runs only loosely — the batched kernels sum in another
order than the single-model ones, and rounding differences grow with training — to
`F32_RTOL` = 1e-4 on losses and `F32_ACC` = 0.02 on accuracies (measured worst relative loss
difference over two epochs: 2.3e-6, lars; 1.7e-7 or less for the others).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch

import optim
from optim.batched import BATCHED_SCHEMES
from worker.cohort import CohortError, auto_cohort_size, check_cohort, run_cohort
from worker.runner import TrialConfig, TrialResult, run_trial

F64_RTOL = 1e-10
F32_RTOL = 1e-4
F32_ACC = 0.02

BASE = TrialConfig(
    task="mnist1d-mlp",
    scheme="sgd",
    hyperparameters={},
    epochs=2,
    data={"batch_size": 32, "n_train": 320, "n_val": 200},
    model={"width": 32},
    device="cpu",
    dtype="float64",
)

# Three members per scheme: different rates, and other continuous knobs where they matter.
MEMBERS: dict[str, list[dict[str, Any]]] = {
    "sgd": [
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.2},
        {"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-3},
    ],
    "adam": [{"lr": 1e-3}, {"lr": 3e-3, "weight_decay": 1e-3}, {"lr": 1e-2, "beta1": 0.8}],
    "adamw": [{"lr": 1e-3}, {"lr": 3e-3, "weight_decay": 0.1}, {"lr": 1e-2, "beta2": 0.99}],
    "lars": [{"lr": 1.0}, {"lr": 3.0, "momentum": 0.5}, {"lr": 10.0, "weight_decay": 0.0}],
    "lamb": [{"lr": 1e-3}, {"lr": 1e-2, "weight_decay": 0.0}, {"lr": 3e-3, "beta1": 0.8}],
    "bmp": [
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        {"lr": 0.2, "ema": 0.5, "clamp": 10.0},
        {"lr": 0.01, "warmup_steps": 5},
    ],
    "bmp_exact": [
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.2, "damping": 0.5},
        {"lr": 0.1, "momentum": 0.5, "damping": 1.0},
    ],
}


class Recorder:
    """A reporter that keeps what it is told and prunes from `prune_at` on."""

    def __init__(self, prune_at: int | None = None) -> None:
        self.prune_at = prune_at
        self.seen: list[tuple[int, float]] = []

    def report(self, epoch: int, value: float) -> bool:
        self.seen.append((epoch, value))
        return self.prune_at is not None and epoch >= self.prune_at


def _close(a: float | None, b: float | None, rtol: float) -> bool:
    if a is None or b is None:
        return a is b
    if not (math.isfinite(a) and math.isfinite(b)):
        return repr(a) == repr(b)
    return abs(a - b) <= rtol * max(1.0, abs(a))


def assert_same_result(
    separate: TrialResult, member: TrialResult, rtol: float, acc_tol: float = 0.0
) -> None:
    """Everything a trial reports except timings, within `rtol` (losses), `acc_tol`
    (accuracies)."""
    assert member.outcome == separate.outcome
    assert member.steps == separate.steps
    assert member.diverged_at_step == separate.diverged_at_step
    assert member.n_parameters == separate.n_parameters
    assert len(member.history) == len(separate.history)
    for a, b in zip(separate.history, member.history, strict=True):
        assert (a.epoch, a.step) == (b.epoch, b.step)
        assert _close(a.train_loss, b.train_loss, rtol), (a, b)
        assert _close(a.val_loss, b.val_loss, rtol), (a, b)
        assert abs(a.val_accuracy - b.val_accuracy) <= acc_tol, (a, b)
    assert _close(separate.value, member.value, max(rtol, acc_tol))
    assert _close(separate.test_loss, member.test_loss, rtol)
    assert (separate.test_accuracy is None) == (member.test_accuracy is None)
    if separate.layer_factors is None:
        assert member.layer_factors is None
    else:
        assert member.layer_factors is not None
        assert member.layer_factors["names"] == separate.layer_factors["names"]
        for row_a, row_b in zip(
            separate.layer_factors["values"], member.layer_factors["values"], strict=True
        ):  # rounded to 4 significant digits by both
            assert all(_close(x, y, 1e-3) for x, y in zip(row_a, row_b, strict=True))


def _cohort(scheme: str, **changes: Any) -> list[TrialConfig]:
    base = replace(BASE, scheme=scheme, **changes)
    return [replace(base, hyperparameters=h) for h in MEMBERS[scheme]]


@pytest.mark.parametrize("scheme", list(MEMBERS))
def test_each_member_equals_its_separate_run_in_float64(scheme: str) -> None:
    configs = _cohort(scheme, evaluate_test=True)
    members = run_cohort(configs)
    for config, member in zip(configs, members, strict=True):
        separate = run_trial(config)
        assert separate.outcome == "complete" and separate.test_loss is not None
        assert_same_result(separate, member, F64_RTOL)


# One schedule per member: a cohort's members may differ in swept schedule fields.
SCHEDULES: list[dict[str, Any]] = [
    {"name": "cosine", "warmup": 0.2, "floor": 0.1},
    {"name": "step", "milestones": [0.5, 0.75], "factor": 0.3, "warmup_epochs": 0.5},
    {"name": "linear", "warmup_epochs": 1},
]


@pytest.mark.parametrize("scheme", list(MEMBERS))
def test_members_with_their_own_schedules_equal_their_separate_runs(scheme: str) -> None:
    """Each member's rate follows its own schedule, per optimizer step, as `run_trial`'s
    `LambdaLR` sets it: float64 histories agree to 1e-10. The schedules change the result (the
    same member at a constant rate differs)."""
    configs = [
        replace(BASE, scheme=scheme, hyperparameters=h, schedule=s, evaluate_test=True)
        for h, s in zip(MEMBERS[scheme], SCHEDULES, strict=True)
    ]
    members = run_cohort(configs)
    for config, member in zip(configs, members, strict=True):
        assert_same_result(run_trial(config), member, F64_RTOL)
    constant = run_cohort([replace(c, schedule={"name": "constant"}) for c in configs])
    for scheduled, plain in zip(members, constant, strict=True):
        assert not _close(scheduled.history[-1].val_loss, plain.history[-1].val_loss, 1e-6)


def test_a_scheduled_member_beside_constant_ones_and_different_seeds() -> None:
    """A schedule on one member only, members of two seeds, a transformed network (re-centred
    every 3 steps) and a divergence check at step 32 of a 40-step epoch."""
    base = replace(BASE, model={"width": 16, "transformed": True, "transform_every": 3})
    base = replace(base, steps_per_epoch=40)
    configs = [
        replace(base, hyperparameters={"lr": 0.05, "momentum": 0.9}, schedule="cosine"),
        replace(base, hyperparameters={"lr": 0.05, "momentum": 0.9}, seed=1),
        replace(base, hyperparameters={"lr": 0.1}, schedule={"name": "constant", "warmup": 0.5}),
    ]
    for config, member in zip(configs, run_cohort(configs), strict=True):
        assert_same_result(run_trial(config), member, F64_RTOL)


def test_digits_members_equal_their_separate_runs() -> None:
    configs = [
        replace(BASE, task="digits-mlp", scheme="adamw", hyperparameters=h)
        for h in MEMBERS["adamw"]
    ]
    for config, member in zip(configs, run_cohort(configs), strict=True):
        assert_same_result(run_trial(config), member, F64_RTOL)


@pytest.mark.parametrize("scheme", ["adam", "lars", "bmp"])
def test_float32_members_agree_loosely(scheme: str) -> None:
    configs = _cohort(scheme, dtype="float32")
    for config, member in zip(configs, run_cohort(configs), strict=True):
        assert_same_result(run_trial(config), member, F32_RTOL, F32_ACC)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_cohort_on_cuda_agrees_with_separate_cuda_runs() -> None:
    configs = _cohort("lamb", dtype="float32", device="cuda", evaluate_test=True)
    for config, member in zip(configs, run_cohort(configs), strict=True):
        assert member.device.startswith("cuda")
        assert_same_result(run_trial(config), member, F32_RTOL, F32_ACC)


@pytest.mark.parametrize("scheme", ["sgd", "bmp"])
def test_members_with_different_seeds_and_transformed_networks(scheme: str) -> None:
    """Mixed seeds: each member its own initial weights and batch order; transformed MLP:
    per-member running statistics and re-centring every 3 steps (bmp: its blocks' slopes
    and shortcut sums, per member)."""
    base = replace(
        BASE,
        scheme=scheme,
        data={"batch_size": 32, "n_train": 320, "n_val": 200},
        model={"width": 16, "transformed": True, "transform_every": 3},
    )
    configs = [
        replace(base, hyperparameters={"lr": 0.05, "momentum": 0.9}, seed=0),
        replace(base, hyperparameters={"lr": 0.1}, seed=1),
        replace(base, hyperparameters={"lr": 0.02}, seed=0),
        replace(base, hyperparameters={"lr": 0.05, "momentum": 0.9}, seed=2),
    ]
    members = run_cohort(configs)
    separate = [run_trial(c) for c in configs]
    for a, b in zip(separate, members, strict=True):
        assert_same_result(a, b, F64_RTOL)
    assert separate[0].history != separate[3].history  # the seeds did differ


def test_batchnorm_members_keep_their_own_running_statistics() -> None:
    """mnist1d-cnn: Conv1d + BatchNorm1d; evaluation uses each member's running statistics."""
    base = replace(
        BASE,
        task="mnist1d-cnn",
        scheme="sgd",
        model={"width": 4, "depth": 2},
        data={"batch_size": 32, "n_train": 256, "n_val": 100},
    )
    configs = [
        replace(base, hyperparameters={"lr": 0.05, "momentum": 0.9}),
        replace(base, hyperparameters={"lr": 0.2}, seed=1),
        replace(base, hyperparameters={"lr": 0.01}),
    ]
    for config, member in zip(configs, run_cohort(configs), strict=True):
        assert_same_result(run_trial(config), member, F64_RTOL)


# bmp on convolutional networks: the options every member shares (the cohort key), then each
# member's own; the last member has another seed (its own initial weights and batch order).
BMP_CONV = {
    "mnist1d-cnn local, mean over positions": (
        "mnist1d-cnn",
        {"width": 4, "depth": 2},
        {"propagate": False, "mean_over_positions": True},
        [{"lr": 0.05, "momentum": 0.9}, {"lr": 0.2, "weight_decay": 1e-3}, {"lr": 0.02}],
    ),
    "mnist1d-cnn propagating, no momentum": (
        "mnist1d-cnn",
        {"width": 4, "depth": 2},
        {},
        [{"lr": 0.05}, {"lr": 0.1, "ema": 0.9}, {"lr": 0.02, "weight_decay": 1e-2}],
    ),
    "digits-vgg (Conv2d+BatchNorm2d) nesterov, mean over positions": (
        "digits-vgg",
        {"width": 4},
        {"nesterov": True, "mean_over_positions": True},
        [
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.1, "momentum": 0.5, "clamp": 100.0},
            {"lr": 0.02, "momentum": 0.9, "warmup_steps": 8},
        ],
    ),
}


@pytest.mark.parametrize("case", list(BMP_CONV))
def test_bmp_members_on_convolutional_networks_equal_their_separate_runs(case: str) -> None:
    """bmp's factors come from each member's own forward statistics under vmap; BatchNorm
    gains, padded convolutions and pooling included, every option in the cohort's form."""
    task, model, shared, own = BMP_CONV[case]
    base = replace(
        BASE,
        task=task,
        scheme="bmp",
        model=model,
        data={"batch_size": 32, "n_train": 256, "n_val": 100},
        evaluate_test=True,
    )
    configs = [replace(base, hyperparameters={**shared, **h}) for h in own]
    configs[-1] = replace(configs[-1], seed=1)
    for config, member in zip(configs, run_cohort(configs), strict=True):
        separate = run_trial(config)
        assert separate.outcome == "complete" and separate.layer_factors is not None
        assert_same_result(separate, member, F64_RTOL)


def test_a_diverging_member_is_frozen_and_the_others_are_untouched() -> None:
    # 40 steps an epoch: the runner checks the batch loss at step 32, then the epoch's mean.
    # At lr 80 the loss is NaN from about step 10, so the member trains on NaN weights in its
    # own slice until the check at step 32 finds it; the others must not notice.
    base = replace(BASE, scheme="sgd", steps_per_epoch=40, epochs=2)
    configs = [
        replace(base, hyperparameters={"lr": 0.05, "momentum": 0.9}),
        replace(base, hyperparameters={"lr": 80.0, "momentum": 0.9}),
        replace(base, hyperparameters={"lr": 0.1}),
    ]
    members = run_cohort(configs, [Recorder() for _ in configs])
    separate = [run_trial(c, Recorder()) for c in configs]
    assert separate[1].outcome == "diverged" and separate[1].diverged_at_step == 32
    assert [m.outcome for m in members] == ["diverged" if i == 1 else "complete" for i in range(3)]
    for a, b in zip(separate, members, strict=True):
        assert_same_result(a, b, F64_RTOL)
    assert members[1].value == 0.0  # the worst accuracy, as the runner records
    assert all(math.isfinite(r.train_loss) for m in members for r in m.history)


def test_a_pruned_member_leaves_and_the_others_still_match() -> None:
    configs = replace(BASE, epochs=3), replace(BASE, epochs=3), replace(BASE, epochs=3)
    configs = tuple(
        replace(c, scheme="adam", hyperparameters=h)
        for c, h in zip(configs, MEMBERS["adam"], strict=True)
    )
    prune_at = [None, 1, 2]
    cohort_reporters = [Recorder(p) for p in prune_at]
    members = run_cohort(configs, cohort_reporters)
    assert [m.outcome for m in members] == ["complete", "pruned", "pruned"]
    assert [len(m.history) for m in members] == [3, 1, 2]
    for config, member, p, seen in zip(configs, members, prune_at, cohort_reporters, strict=True):
        reporter = Recorder(p)
        separate = run_trial(config, reporter)
        assert_same_result(separate, member, F64_RTOL)
        assert [e for e, _ in seen.seen] == [e for e, _ in reporter.seen]


def test_refusals_are_clear_errors() -> None:
    with pytest.raises(CohortError, match="no batched optimizer") as unknown:
        check_cohort([replace(BASE, scheme="nope")])
    assert "cohort size 1" in unknown.value.reason
    assert set(optim.SCHEMES) <= set(BATCHED_SCHEMES)  # every scheme batches
    local = replace(BASE, scheme="bmp", hyperparameters={"propagate": False})
    with pytest.raises(CohortError, match="propagate"):
        check_cohort([replace(BASE, scheme="bmp", hyperparameters={"propagate": True}), local])
    with pytest.raises(CohortError, match="epochs"):
        check_cohort([BASE, replace(BASE, epochs=3)])
    nesterov = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    with pytest.raises(CohortError, match="nesterov"):
        check_cohort([BASE, replace(BASE, hyperparameters=nesterov)])
    with pytest.raises(optim.HyperparameterError, match="nesterov"):
        check_cohort([replace(BASE, hyperparameters={"lr": 0.1, "nesterov": True})])
    with pytest.raises(CohortError, match="at least one"):
        check_cohort([])
    with pytest.raises(ValueError, match="reporters"):
        run_cohort([BASE, BASE], [None])


def test_members_may_differ_in_their_schedule_but_not_in_their_epochs() -> None:
    """The schedule is per member (`cohort_key` leaves it out); the budget it spans is not."""
    check_cohort([replace(BASE, schedule=s) for s in SCHEDULES])
    with pytest.raises(CohortError, match="epochs"):
        check_cohort([replace(BASE, schedule="cosine"), replace(BASE, epochs=3)])


def test_auto_cohort_size() -> None:
    assert auto_cohort_size(25_000, "cpu") == 16
    assert auto_cohort_size(25_000, "cuda") == 64
    assert auto_cohort_size(5_000_000, "cpu") == 4
    assert auto_cohort_size(200_000_000, "cuda") == auto_cohort_size(20_000_000, "cpu") == 1
    # A convolutional model trains slower in cohorts on the CPU (docs/bench/cohort_throughput_cnn
    # .json); on a GPU batching its small kernels is what cohorts are for.
    assert auto_cohort_size(25_000, "cpu", convolutions=True) == 1
    assert auto_cohort_size(25_000, "cuda", convolutions=True) == 64


def test_auto_trains_a_convolutional_model_one_trial_per_task_on_the_cpu() -> None:
    """`"auto"` asks the arm's real model: mnist1d-cnn has convolutions, so on the CPU its arms
    train one trial per task and say why; the MLP of the same dataset still batches."""
    from worker.arms.optuna.checks import largest_cohort, single_trial_reason
    from worker.spec import StudySpec

    def spec(task: str) -> StudySpec:
        return StudySpec.model_validate(
            {"name": "auto", "task": task, "arms": [{"optimizer": "sgd"}],
             "resources": {"cohort_size": "auto"}}
        )  # fmt: skip

    cnn, mlp = spec("mnist1d-cnn"), spec("mnist1d-mlp")
    assert largest_cohort(cnn, cnn.arms[0]) == 1  # type: ignore[arg-type]
    assert "convolutional" in single_trial_reason(cnn, cnn.arms[0])  # type: ignore[arg-type]
    assert largest_cohort(mlp, mlp.arms[0]) == 16  # type: ignore[arg-type]
