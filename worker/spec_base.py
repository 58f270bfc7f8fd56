"""What the study spec is built from: its hard limits, the strict base model, its errors.

Kept apart from `worker.spec` so that the tuners' option models (`worker.arms.hypergradient`)
and the cross-field checks (`worker.spec_checks`) can use them without importing the spec,
which imports them: no module here imports `worker.spec`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_ARMS",
    "MAX_BATCH_SIZE",
    "MAX_CONCURRENT_TRIALS",
    "MAX_DEPTH",
    "MAX_EPOCHS",
    "MAX_FINAL_SEEDS",
    "MAX_HYPERGRAD_BLOCKS",
    "MAX_HYPERGRAD_DEPTH",
    "MAX_HYPERGRAD_PARAMETERS",
    "MAX_HYPERGRAD_STEPS",
    "MAX_HYPERGRAD_WIDTH",
    "MAX_PARAMETERS",
    "MAX_RETRIES",
    "MAX_STEPS_PER_EPOCH",
    "MAX_SYNTHETIC_VALUES",
    "MAX_TRIALS_PER_ARM",
    "MAX_TRIAL_TIMEOUT_S",
    "MAX_WIDTH",
    "MODEL_CONFIG",
    "Problem",
    "Strict",
    "spec_error",
    "trusted",
]

MAX_ARMS = 16
MAX_TRIALS_PER_ARM = 1000
MAX_EPOCHS = 1000
MAX_STEPS_PER_EPOCH = 100_000
MAX_FINAL_SEEDS = 20
MAX_CONCURRENT_TRIALS = 256
MAX_WIDTH = 4096
MAX_DEPTH = 64
MAX_PARAMETERS = 50_000_000
MAX_BATCH_SIZE = 8192
MAX_RETRIES = 5
MAX_TRIAL_TIMEOUT_S = 86_400.0
MAX_SYNTHETIC_VALUES = 200_000_000  # n_examples × input size of a synthetic dataset
# The hypergradient tuner trains in exact fixed point on the CPU; its information buffer grows by
# log2(1/momentum) bits per parameter per step (0.15 at momentum 0.9, at most 16), so at these
# limits a run holds ~10 MB of buffer typically and 1 GB at worst (steps × parameters × 2 bytes).
# Every meta-iteration's trial stores its schedule (2 × blocks × tensors values), hence the block
# limit.
MAX_HYPERGRAD_STEPS = 5000
MAX_HYPERGRAD_BLOCKS = 100
MAX_HYPERGRAD_WIDTH = 512
MAX_HYPERGRAD_DEPTH = 4
MAX_HYPERGRAD_PARAMETERS = 100_000

# A cross-field problem: the field path, the message, the offending value (or None).
Problem = tuple[tuple[str | int, ...], str, Any]


def spec_error(message: str) -> PydanticCustomError:
    """A validation error whose message is shown unchanged (no "Value error, " prefix)."""
    return PydanticCustomError("spec", "{message}", {"message": message})


def trusted(info: ValidationInfo) -> bool:
    """Validating a stored spec (`StudySpec.from_stored`): the checks that depend on this
    machine (installed packages, registries, data, models built on the meta device) are
    skipped; the spec passed them when it was submitted."""
    return bool(info.context and info.context.get("stored"))


MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Strict(BaseModel):
    """Unknown fields refused, no coercion, no NaN or infinity (see `worker.spec`)."""

    model_config = MODEL_CONFIG
