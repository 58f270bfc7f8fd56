"""What the queue refuses, the compute-budget check and a spec's hash, without the queue's
database imports: `service.admission` (which `ratebench validate` runs) checks a spec's budget
with them, and `ratebench run` compares a stored study's spec hash before it decides whether
anything is left to run; importing `service.queue` for these small definitions cost each of
them SQLAlchemy's ORM, Alembic and Optuna. `service.queue` re-exports every name here."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = [
    "BudgetExceededError",
    "IdempotencyConflictError",
    "NotOwnerError",
    "QueueRefusalError",
    "StudyBusyError",
    "TooManyStudiesError",
    "check_budget",
    "spec_hash",
]


class QueueRefusalError(Exception):
    """A request the queue refuses; the message says why, for the client."""


class NotOwnerError(QueueRefusalError):
    """The key is neither the study's submitter nor an admin key."""


class IdempotencyConflictError(QueueRefusalError):
    """The idempotency key was used before, by the same API key, with a different body."""


class BudgetExceededError(QueueRefusalError):
    """The study's estimated optimizer steps exceed the configured maximum."""

    loc = ("budget",)


class TooManyStudiesError(QueueRefusalError):
    """The key already has as many queued studies as it may."""


class StudyBusyError(QueueRefusalError):
    """`ratebench run` found its study key taken: running elsewhere, or not a study of its own."""


def check_budget(estimated_steps: int, max_steps: int) -> None:
    """Refuse a study whose estimated optimizer steps exceed `max_steps`."""
    if estimated_steps > max_steps:
        raise BudgetExceededError(
            f"the study needs an estimated {estimated_steps:,} optimizer steps (arms × (trials "
            f"+ final seeds) × epochs × steps per epoch); this service allows at most "
            f"{max_steps:,} per study: lower budget.trials_per_arm, budget.epochs, "
            "budget.steps_per_epoch or the number of arms"
        )


def spec_hash(spec: dict[str, Any]) -> str:
    """SHA-256 of the spec's canonical JSON (sorted keys, no spaces): equal bodies, equal hash."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
