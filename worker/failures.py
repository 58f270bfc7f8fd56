"""Which failed trials are worth running again.

A trial is deterministic on its configuration and seed (`worker.runner`), so an exception raised
by the training code itself (missing data, a model or optimizer that cannot be built, a bad
configuration: ValueError, TypeError, FileNotFoundError, RuntimeError, ...) would be raised
again by every retry: it is recorded once, with `deterministic` set, and not retried. What the
trial's code did not cause is retried (up to `resources.max_retries`): the worker process or
its node dying, Ray losing an object or an actor, a timeout, and errors of the machine rather
than the configuration (out of memory, CUDA errors, I/O and connection errors other than a
missing file).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

__all__ = ["Failure", "classify", "classify_cause"]

# OSErrors that say the configuration names something that is not there.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
_MACHINE_WORDS = ("out of memory", "cuda", "cudnn", "nccl")


@dataclass(frozen=True)
class Failure:
    error: str  # "<ExceptionType>: <message>", for people
    retry: bool  # False: the same configuration fails the same way


def _machine_error(cause: BaseException) -> bool:
    if isinstance(cause, ray.exceptions.RayError | MemoryError | TimeoutError | ConnectionError):
        return True
    if isinstance(cause, OSError) and not isinstance(cause, _MISSING):
        return True
    if isinstance(cause, RuntimeError):  # torch.OutOfMemoryError and CUDA errors among them
        text = f"{type(cause).__name__}: {cause}".lower()
        return any(word in text for word in _MACHINE_WORDS)
    return False


def classify_cause(cause: BaseException) -> Failure:
    """An exception the trial's own code raised (inside the task): its description and whether
    to retry. A cohort's task (`worker.cohort_task`) uses it for one member's error."""
    return Failure(f"{type(cause).__name__}: {cause}", retry=_machine_error(cause))


def classify(exc: Exception) -> Failure:
    """What `ray.get` of a trial's task raised: its description and whether to retry."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return classify_cause(exc.cause)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Failure(f"{type(exc).__name__}: the trial's worker process ended: {first}", retry=True)
