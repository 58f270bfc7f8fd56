"""Which failures are retried, and whether they use up an attempt (`worker.failures`)."""

from __future__ import annotations

import pytest
import ray

from worker.failures import OUT_OF_MEMORY, classify, classify_cause, study_fault
from worker.fit import ClusterNotReadyError, NodeFitError


def test_a_trials_own_error_is_deterministic_and_a_machine_error_is_retried() -> None:
    own = classify_cause(ValueError("bad configuration"))
    assert not own.retry and not own.infrastructure
    machine = classify_cause(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert machine.retry and not machine.infrastructure
    assert classify_cause(OSError(5, "Input/output error")).retry


def _allocation_error() -> RuntimeError:
    """What PyTorch's CPU allocator really raises for more memory than the machine has (an
    allocation the kernel refuses at once: nothing is touched)."""
    import torch

    try:
        torch.empty(1 << 60, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("allocating 2**60 bytes succeeded")


@pytest.mark.parametrize(
    "error",
    [
        _allocation_error(),
        MemoryError(),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
    ids=["cpu-allocator", "MemoryError", "cuda"],
)
def test_out_of_memory_is_deterministic_for_the_configuration(error: Exception) -> None:
    failure = classify_cause(error)
    assert not failure.retry and not failure.infrastructure
    assert failure.error.startswith(OUT_OF_MEMORY)
    # the same end reported by Ray around the task's own error
    wrapped = ray.exceptions.RayTaskError("trial_task", "traceback", error)
    assert classify(wrapped).error == failure.error and not classify(wrapped).retry


def test_a_worker_rays_memory_monitor_killed_is_out_of_memory_not_a_worker_death() -> None:
    killed = ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory."
    )
    failure = classify(killed)
    assert not failure.retry and not failure.infrastructure
    assert failure.error.startswith(f"{OUT_OF_MEMORY}: OutOfMemoryError: Task was killed")


def test_a_trial_whose_mailbox_died_is_retried_without_using_an_attempt() -> None:
    failure = classify_cause(ray.exceptions.ActorDiedError())
    assert failure.retry and failure.infrastructure


def test_a_dead_worker_counts_an_attempt_unless_its_node_died_with_it() -> None:
    crashed = ray.exceptions.WorkerCrashedError()
    assert classify(crashed).retry and not classify(crashed).infrastructure
    lost = classify(crashed, node_alive=False)
    assert lost.retry and lost.infrastructure
    assert "the trial's node ended" in lost.error
    assert classify(ray.exceptions.NodeDiedError("n")).infrastructure


@pytest.mark.parametrize(
    "error",
    [
        ray.exceptions.ActorDiedError(),
        ray.exceptions.RaySystemError("lost the raylet"),
        ray.exceptions.ObjectLostError("00" * 28, "", ""),
        ClusterNotReadyError("nodes did not report"),
        ConnectionError("GCS unreachable"),
        Exception("The current node timed out during startup. This could happen because ..."),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_lost_runtime_actor_or_cluster_is_a_transient_study_fault(error: Exception) -> None:
    assert study_fault(error).retry


@pytest.mark.parametrize(
    "error",
    [
        NodeFitError("cpus_per_trial", "resources.cpus_per_trial: 4 but the largest node has 2"),
        ValueError("arms.0.optimizer: unknown scheme"),
        KeyError("a bug of ours"),
        ray.exceptions.AuthenticationError("wrong token"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_refusal_of_the_spec_or_a_bug_is_a_deterministic_study_fault(error: Exception) -> None:
    fault = study_fault(error)
    assert not fault.retry
    assert fault.error.startswith(type(error).__name__)
