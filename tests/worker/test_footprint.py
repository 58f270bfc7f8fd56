"""A step's memory and FLOPs estimated on the meta device (`worker.footprint`), checked against
what PyTorch counts on real tensors; and what a trial gets when it runs out of memory or runs
too long without a timeout of its own, on a real local Ray runtime."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.worker.helpers import digits_spec
from worker import footprint, sweep
from worker.failures import OUT_OF_MEMORY
from worker.footprint import arm_footprints, default_trial_timeout_s, model_footprint
from worker.results import load_trials
from worker.spec import StudySpec
from worker.sweep import run_study
from worker.tasks import build_model

OPTIONS = (8, 2, "relu", False)  # width, depth, activation, transformed


def _real_counts(name: str, shape: tuple[int, ...], batch: int) -> tuple[int, int]:
    """Leaf outputs of a real forward pass, and PyTorch's own FLOP count of a real step."""
    torch.manual_seed(0)
    net = build_model(name, shape, 10, width=8, depth=2)
    outputs = [0]

    def hook(_module: Any, _inputs: Any, out: Any) -> None:
        outputs[0] += out.numel()

    for module in net.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(hook)
    x = torch.randn(batch, *shape)
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(batch, dtype=torch.long))
        loss.backward()
    return outputs[0], counter.get_total_flops()


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cnn", (3, 16, 16)), ("vgg", (3, 16, 16)), ("resnet", (3, 16, 16))],
)
def test_the_meta_trace_counts_what_a_real_step_computes(
    one_thread: None, name: str, shape: tuple[int, ...]
) -> None:
    estimate = model_footprint(name, shape, 10, OPTIONS, 4, False)
    activations, flops = _real_counts(name, shape, 4)
    assert estimate.activations == activations  # the same shapes, without allocating them
    # 3 × forward counts every layer's input gradient, which PyTorch skips for the first one,
    # and the elementwise work PyTorch's counter leaves out: a little above, never below
    assert flops <= estimate.flops <= 1.3 * flops, (estimate.flops, flops)


def test_a_huge_image_costs_hundreds_of_gigabytes_with_few_parameters() -> None:
    small = model_footprint("vgg", (1, 32, 32), 10, (64, None, "relu", False), 8, False)
    huge = model_footprint("vgg", (1, 4096, 4096), 10, (64, None, "relu", False), 8, False)
    assert huge.parameters == small.parameters  # global pooling: the image size is free
    assert huge.memory_bytes > 100 * 2**30 > 2**30 > small.memory_bytes
    assert huge.flops > 1e14


def test_a_cohort_multiplies_a_steps_memory() -> None:
    spec = digits_spec(resources={"cohort_size": 8})
    [arm] = arm_footprints(spec)
    assert arm.cohort == 8 and arm.task_memory_bytes == 8 * arm.footprint.memory_bytes
    bmp = digits_spec(arms=[{"optimizer": "bmp"}], resources={"cohort_size": 8})
    assert arm_footprints(bmp)[0].cohort == 8  # bmp trains in cohorts too (`optim.batched`)


def test_the_default_timeout_grows_with_the_budget_and_is_bounded() -> None:
    short = default_trial_timeout_s(digits_spec(budget={"epochs": 1, "steps_per_epoch": 10}))
    long = default_trial_timeout_s(digits_spec(budget={"epochs": 100, "steps_per_epoch": 10_000}))
    assert footprint.DEFAULT_TIMEOUT_BASE_S < short < long
    assert long == pytest.approx(footprint.DEFAULT_TIMEOUT_BASE_S + 10 * 1_000_000 * 0.002)
    vgg = StudySpec.model_validate(
        {
            "name": "big",
            "task": "synthetic-vgg",
            "data": {"input_shape": [3, 512, 512], "n_examples": 100, "batch_size": 64},
            "arms": [{"optimizer": "sgd"}],
            "budget": {"epochs": 1000, "steps_per_epoch": 100_000},
        }
    )
    assert default_trial_timeout_s(vgg) == 86_400  # at most a day (MAX_TRIAL_TIMEOUT_S)


@pytest.mark.ray
def test_a_trial_out_of_memory_is_tried_once_and_shown_as_such(
    ray_runtime: None, sqlite_url: str
) -> None:
    """A first convolution of 4096 channels on 1024×1024 images in batches of 8 asks the
    allocator for 128 GiB at once: refused on this machine without touching memory, as every
    retry would be."""
    spec = StudySpec.model_validate(
        {
            "name": "oom",
            "task": "synthetic-cnn",
            "data": {"input_shape": [1, 1024, 1024], "n_examples": 20, "batch_size": 8},
            "model": {"width": 4096, "depth": 1},
            "arms": [{"optimizer": "sgd"}],
            "budget": {"trials_per_arm": 1, "epochs": 1, "steps_per_epoch": 1, "final_seeds": 1},
            "sampler": "random",
            "resources": {"max_retries": 2, "cohort_size": 1, "device": "cpu"},
        }
    )
    result = run_study(spec, sqlite_url, "oom")
    [trial] = load_trials(sqlite_url, "oom", spec)  # tried once, not 1 + max_retries times
    assert trial.state == "FAIL" and trial.user_attrs["deterministic"]
    assert trial.user_attrs["error"].startswith(OUT_OF_MEMORY)
    [row] = result.arms
    assert row.status == "failed" and row.error is not None
    assert row.error.startswith(OUT_OF_MEMORY)


@pytest.mark.ray
def test_a_trial_without_a_timeout_gets_the_default_one(
    ray_runtime: None, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default is `DEFAULT_TIMEOUT_BASE_S` + ten times the budget's time; both are made
    small here (the driver reads them in this process) so that a long trial runs past it."""
    monkeypatch.setattr(sweep, "DEFAULT_TIMEOUT_BASE_S", 2.0)
    monkeypatch.setattr(footprint, "DEFAULT_TIMEOUT_BASE_S", 2.0)
    monkeypatch.setattr(footprint, "TIMEOUT_FACTOR", 0)
    spec = digits_spec(
        {"resources": {"cohort_size": 1, "max_retries": 0, "max_concurrent_trials": 1}},
        budget={"trials_per_arm": 1, "epochs": 1000, "steps_per_epoch": 1000, "final_seeds": 1},
    )
    assert spec.resources.trial_timeout_s is None
    run_study(spec, sqlite_url, "slow")
    [trial] = load_trials(sqlite_url, "slow", spec)
    assert trial.state == "FAIL"
    assert trial.user_attrs["error"] == "timed out after 2 s"
