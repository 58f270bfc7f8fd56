"""The hypergradient tuner's arm in a spec (`tuner: "hypergradient"`): `HypergradientArmSpec`,
its options (`HypergradientOptions`, the arm's `hypergradient` object), the length of its runs
(`hypergradient_steps`) and the MLP it trains (`mlp_layer_sizes`). Its checks are
`worker.arms.hypergradient.checks`.

This module imports only pydantic at load time: reading a spec imports neither Optuna nor
PyTorch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from worker.spec_base import (
    MAX_BATCH_SIZE,
    MAX_HYPERGRAD_BLOCKS,
    MAX_HYPERGRAD_STEPS,
    ArmSpecBase,
    Strict,
    given_options,
    spec_error,
)

if TYPE_CHECKING:
    from worker.spec import Budget
    from worker.spec_options import DataOptions, ModelOptions
    from worker.tasks import Task

__all__ = [
    "ARM_SPEC",
    "HypergradientArmSpec",
    "HypergradientOptions",
    "Learnable",
    "hypergradient_steps",
    "mlp_layer_sizes",
    "mlp_parameter_count",
]

Learnable = Literal["lr", "momentum", "init_scale", "l2"]


def _learn_rates() -> list[Learnable]:
    return ["lr"]


class HypergradientOptions(Strict):
    """How a `tuner: "hypergradient"` arm trains and learns (Maclaurin, Duvenaud, Adams 2015).

    Training is SGD with momentum in `optim.hypergrad`'s form, per parameter tensor and block:
    `v ← γ·v − (1 − γ)·g`, `w ← w + α·v`; `lr` is α (torch.optim.SGD's `lr` with momentum γ is
    α·(1 − γ)) and the starting values are constant schedules. `steps` (T) defaults to the
    other arms' training length, `budget.epochs × budget.steps_per_epoch`, so that every arm
    trains as long; without `budget.steps_per_epoch` it must be given.
    """

    steps: int | None = Field(
        None, ge=1, le=MAX_HYPERGRAD_STEPS, description="T; default epochs × steps_per_epoch"
    )
    blocks: int = Field(10, ge=1, le=MAX_HYPERGRAD_BLOCKS, description="schedule resolution")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="default: data's")
    meta_lr: float = Field(0.05, gt=0, le=1, description="Adam step on log rates, logit momenta")
    learn: list[Learnable] = Field(default_factory=_learn_rates, min_length=1, max_length=4)
    lr: float = Field(0.1, gt=0, le=100, description="starting α of every block and tensor")
    momentum: float = Field(0.9, gt=0, lt=1, description="starting γ")
    init_scale: float = Field(1.0, gt=0, le=100, description="× Gaussian N(0, 1/fan_in) init")
    l2: float = Field(0.0, ge=0, le=100, description="starting L2 penalty (> 0 to learn it)")

    @field_validator("learn")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise spec_error(f"each kind at most once, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> HypergradientOptions:
        if self.steps is not None and self.blocks > self.steps:
            message = f"blocks {self.blocks} > steps {self.steps}; at most one block per step"
            raise spec_error(message)
        if "l2" in self.learn and self.l2 <= 0:
            raise spec_error("learning l2 needs a starting l2 > 0 (it is learned on a log scale)")
        return self


class HypergradientArmSpec(ArmSpecBase):
    """An arm whose SGD schedule `optim.hypergrad` learns (`tuner: "hypergradient"`); its
    options are its `hypergradient` object (defaults when omitted). It fixes and searches
    nothing: its starting values are its options."""

    other_tuners_fields: ClassVar[dict[str, str]] = {
        "fixed": "a hypergradient arm takes its starting values from its hypergradient options "
        "(lr, momentum, init_scale, l2), not fixed",
        "search_space": "a hypergradient arm learns its schedule; it searches nothing (drop this)",
        "schedule": "a hypergradient arm learns its own per-step rate schedules; a fixed "
        "schedule does not apply to it (drop this, or use tuner 'optuna')",
    }

    tuner: Literal["hypergradient"]
    hypergradient: HypergradientOptions | None = Field(
        None, description="the tuner's options; default options when omitted"
    )

    @property
    def hypergradient_options(self) -> HypergradientOptions:
        """The tuner's options, defaults filled in."""
        return self.hypergradient or HypergradientOptions()

    def run_steps(self, budget: Any) -> int | None:
        """T: its own `steps`, else as long as the other arms train (`hypergradient_steps`)."""
        return hypergradient_steps(self.hypergradient_options, budget)


def hypergradient_steps(options: HypergradientOptions, budget: Budget) -> int | None:
    """T of a hypergradient arm: its own `steps`, else as long as the other arms train
    (`budget.epochs × budget.steps_per_epoch`); None when neither is given."""
    if options.steps is not None:
        return options.steps
    if budget.steps_per_epoch is None:
        return None
    return budget.epochs * budget.steps_per_epoch


def mlp_layer_sizes(task: str | Task, data: DataOptions, model: ModelOptions) -> list[int] | None:
    """Inputs, hidden widths, classes of the task's plain ReLU MLP (the spec's model options),
    or None when the task's model is not one."""
    from worker.tasks import get_task

    info = get_task(task) if isinstance(task, str) else task
    if info.model.layer_sizes is None:
        return None
    shape = info.shape(data.model_dump())
    options = info.model_options(given_options(model))
    return info.model.layer_sizes(shape.input_shape, shape.n_outputs, **options)


def mlp_parameter_count(sizes: Sequence[int]) -> int:
    """Weights and biases of the MLP with these layer sizes."""
    return sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(sizes))


ARM_SPEC = HypergradientArmSpec  # what the registry (`worker.arms`) reads
