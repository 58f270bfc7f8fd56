"""What a failure means, decided here and nowhere else: the trial's own fault (not retried),
the machine's (retried, counting an attempt), or the infrastructure's (retried freely).

Trials. A trial is deterministic on its configuration and seed (`worker.runner`), so an
exception raised by the training code itself (missing data, a model or optimizer that cannot be
built, a bad configuration: ValueError, TypeError, FileNotFoundError, RuntimeError, ...) would
be raised again by every retry: it is recorded once, with `deterministic` set, and not retried;
so is a worker without the trial's task package, or with another version of it
(`worker.tasks.TaskMismatchError`, a ValueError: every retry would land on such a worker
again). What the trial's code did not cause is retried (up to `resources.max_retries`): the
worker process dying, Ray losing an object, a timeout, and errors of the machine rather than
the configuration (CUDA errors, I/O and connection errors other than a missing file).

Out of memory is the configuration's: a trial's memory is set by its model, input shape, batch
and cohort size, so a retry on a node of the same kind runs out again (and, meanwhile, starves
the trials beside it). PyTorch's `OutOfMemoryError` (CUDA), its CPU allocator's "can't allocate
memory", Python's `MemoryError` and Ray's `OutOfMemoryError` (its memory monitor killed the
task's worker) are recorded once, `deterministic`, with an error that starts `out of memory`
(`OUT_OF_MEMORY`), and not retried. Ray's monitor may kill a task that another task's growth
pushed over: that trial is then recorded as out of memory too, a price we accept against
retrying every real one. Two ends are not the trial's at all and use up no attempt
(`Failure.infrastructure`): its node died with it (a raylet or its agent killed, a machine
lost), or the driver's mailbox actor, the only actor a trial talks to, died under it.

Studies. When the sweep itself stops with an error (`study_fault`), the error is either
transient (Ray's runtime or one of its actors died, an object was lost, the GCS could not be
reached, the cluster has not yet reported its nodes' resources: `worker.fit`'s
`ClusterNotReadyError`, a ConnectionError) and the study is resumed from
its storage, or deterministic (the spec does not fit the cluster, a setting can never work, a
fault of our own code) and the study fails. The scheduler bounds the transient resumes
(`RATEBENCH_MAX_ATTEMPTS`) and names every attempt's cause when it gives up.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

__all__ = ["OUT_OF_MEMORY", "Failure", "classify", "classify_cause", "study_fault"]

# OSErrors that say the configuration names something that is not there.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
_MACHINE_WORDS = ("cuda", "cudnn", "nccl")
# What PyTorch's allocators say when they run out (CUDA: "CUDA out of memory"; the CPU
# allocator: "DefaultCPUAllocator: can't allocate memory"); MPS and XLA say "out of memory" too.
_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")
OUT_OF_MEMORY = "out of memory (deterministic for this configuration, not retried)"
# Ray errors that say a node (not one worker process) went away under the trial.
_NODE_LOST = (ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError)


@dataclass(frozen=True)
class Failure:
    error: str  # "<ExceptionType>: <message>", for people
    retry: bool  # False: the same configuration fails the same way
    infrastructure: bool = False  # not the trial's doing: retried without using an attempt


def _out_of_memory(error: BaseException) -> bool:
    """The one rule for out of memory, inside a task or as Ray's end of one."""
    if isinstance(error, MemoryError | ray.exceptions.OutOfMemoryError):
        return True
    if isinstance(error, RuntimeError):  # torch.OutOfMemoryError is a RuntimeError
        text = f"{type(error).__name__}: {error}".lower()
        return type(error).__name__ == "OutOfMemoryError" or any(w in text for w in _MEMORY_WORDS)
    return False


def _machine_error(cause: BaseException) -> bool:
    if isinstance(cause, ray.exceptions.RayError | TimeoutError | ConnectionError):
        return True
    if isinstance(cause, OSError) and not isinstance(cause, _MISSING):
        return True
    if isinstance(cause, RuntimeError):  # CUDA errors
        text = f"{type(cause).__name__}: {cause}".lower()
        return any(word in text for word in _MACHINE_WORDS)
    return False


def classify_cause(cause: BaseException) -> Failure:
    """An exception the trial's own code raised (inside the task): its description and whether
    to retry. A cohort's task (`worker.cohort_task`) uses it for one member's error. An actor
    error inside a trial is its mailbox's death (the driver's infrastructure)."""
    text = f"{type(cause).__name__}: {cause}"
    if isinstance(cause, ray.exceptions.RayActorError):
        return Failure(text, retry=True, infrastructure=True)
    if _out_of_memory(cause):
        return Failure(f"{OUT_OF_MEMORY}: {text}", retry=False)
    return Failure(text, retry=_machine_error(cause))


def classify(exc: Exception, *, node_alive: bool = True) -> Failure:
    """What `ray.get` of a trial's task raised: its description and whether to retry.
    `node_alive` False: the node the trial ran on is gone, so its end was not the trial's."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return classify_cause(exc.cause)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if _out_of_memory(exc):  # Ray's memory monitor killed the trial's worker
        return Failure(f"{OUT_OF_MEMORY}: {type(exc).__name__}: {first}", retry=False)
    lost_node = isinstance(exc, _NODE_LOST) or not node_alive
    where = "node" if lost_node else "worker process"
    return Failure(
        f"{type(exc).__name__}: the trial's {where} ended: {first}",
        retry=True,
        infrastructure=lost_node,
    )


def study_fault(exc: BaseException) -> Failure:
    """What an error that stopped a whole sweep means for its study: `retry` True (transient:
    resume it from storage) or False (deterministic: the study fails with it)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, ray.exceptions.RayTaskError):  # a remote error of our own code
        return Failure(first, retry=False)
    if isinstance(exc, ray.exceptions.AuthenticationError):  # the token is wrong: it stays so
        return Failure(first, retry=False)
    transient = isinstance(exc, ray.exceptions.RayError | ConnectionError | TimeoutError) or (
        "timed out during startup" in text  # Ray's own bare Exception for a slow node start
    )
    return Failure(first, retry=transient, infrastructure=transient)
