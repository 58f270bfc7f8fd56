"""The hypergradient tuner (`tuner: "hypergradient"`): what a spec may ask of it.

Its arm (`HypergradientArmSpec`), its options (`HypergradientOptions`, the arm's
`hypergradient` object), the length of its runs
(`hypergradient_steps`) and its cross-field checks (`check_arm`): it needs the `sgd` scheme,
optim.hypergrad's ReLU `mlp` on feature vectors, the `val_loss` objective (what the tuner
minimises) and a model within the `MAX_HYPERGRAD_*` limits, so that a run's memory stays
bounded. How the arm runs: `worker.arms.hypergradient_arm` (the driver's side) and
`worker.arms.hypergradient_jobs` (what runs in its Ray tasks).

This module imports only pydantic at load time: `worker.spec` takes the arm from here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from worker.spec_base import (
    MAX_BATCH_SIZE,
    MAX_HYPERGRAD_BLOCKS,
    MAX_HYPERGRAD_DEPTH,
    MAX_HYPERGRAD_PARAMETERS,
    MAX_HYPERGRAD_STEPS,
    MAX_HYPERGRAD_WIDTH,
    ArmSpecBase,
    Problem,
    Strict,
    spec_error,
)

if TYPE_CHECKING:
    from worker.spec import Budget, DataOptions, ModelOptions, StudySpec

__all__ = [
    "HypergradientArmSpec",
    "HypergradientOptions",
    "Learnable",
    "check_arm",
    "check_build",
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
    }

    tuner: Literal["hypergradient"]
    hypergradient: HypergradientOptions | None = Field(
        None, description="the tuner's options; default options when omitted"
    )

    @property
    def hypergradient_options(self) -> HypergradientOptions:
        """The tuner's options, defaults filled in."""
        return self.hypergradient or HypergradientOptions()


def hypergradient_steps(options: HypergradientOptions, budget: Budget) -> int | None:
    """T of a hypergradient arm: its own `steps`, else as long as the other arms train
    (`budget.epochs × budget.steps_per_epoch`); None when neither is given."""
    if options.steps is not None:
        return options.steps
    if budget.steps_per_epoch is None:
        return None
    return budget.epochs * budget.steps_per_epoch


def mlp_layer_sizes(task: str, data: DataOptions, model: ModelOptions) -> list[int]:
    """Inputs, hidden widths, classes of the task's MLP (the spec's model options)."""
    from worker.tasks import MODELS, get_task

    info, options = get_task(task), data.model_dump()
    width = model.width or MODELS["mlp"].default_width
    depth = model.depth or MODELS["mlp"].default_depth or 0
    return [math.prod(info.input_shape(options)), *[width] * depth, info.n_classes(options)]


def mlp_parameter_count(sizes: Sequence[int]) -> int:
    """Weights and biases of the MLP with these layer sizes."""
    return sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(sizes))


_DATASETS = ("mnist1d", "digits", "synthetic")


def _check_model(spec: StudySpec, index: int, arm: HypergradientArmSpec) -> Problem | None:
    """The model and data a hypergradient arm needs: optim.hypergrad's ReLU MLP on vectors."""
    from worker.tasks import get_task

    task, model = get_task(spec.task), spec.arm_model(arm)
    tuner: tuple[str | int, ...] = ("arms", index, "tuner")
    dataset = task.dataset.name
    vectors = dataset in _DATASETS and (
        dataset != "synthetic" or len(task.input_shape(spec.data.model_dump())) == 1
    )
    if task.model.name != "mlp" or not vectors:
        got = spec.task
        if dataset == "synthetic":
            got += f" with input_shape {list(task.input_shape(spec.data.model_dump()))}"
        message = (
            "the hypergradient tuner trains an mlp on feature vectors (tasks mnist1d-mlp, "
            f"digits-mlp, synthetic-mlp with a one-dimensional data.input_shape); got {got}"
        )
        return (tuner, message, arm.tuner)
    if model.transformed or model.activation != "relu":
        message = (
            "the hypergradient tuner's mlp is ReLU and not transformed; got activation "
            f"{model.activation!r}, transformed {str(model.transformed).lower()}"
        )
        return (("arms", index, "model"), message, None)
    sizes = mlp_layer_sizes(spec.task, spec.data, model)
    width, depth = max(sizes[1:-1]), len(sizes) - 2
    n = mlp_parameter_count(sizes)
    if width > MAX_HYPERGRAD_WIDTH or depth > MAX_HYPERGRAD_DEPTH or n > MAX_HYPERGRAD_PARAMETERS:
        message = (
            f"width {width}, depth {depth}, {n:,} parameters; the hypergradient tuner takes "
            f"width <= {MAX_HYPERGRAD_WIDTH}, depth <= {MAX_HYPERGRAD_DEPTH} and at most "
            f"{MAX_HYPERGRAD_PARAMETERS:,} parameters (set the model's width and depth)"
        )
        return (("arms", index, "model"), message, None)
    return None


def check_arm(spec: StudySpec, index: int, arm: HypergradientArmSpec) -> list[Problem]:
    """A hypergradient arm: sgd on optim.hypergrad's MLP, judged by val_loss, bounded size."""
    where: tuple[str | int, ...] = ("arms", index)
    problems: list[Problem] = []
    if arm.optimizer != "sgd":
        message = (
            "the hypergradient tuner trains with SGD with momentum (reversibly); "
            f"set optimizer 'sgd', got {arm.optimizer!r}"
        )
        problems.append(((*where, "optimizer"), message, arm.optimizer))
    if spec.objective.metric != "val_loss":
        message = (
            "the hypergradient tuner minimises the validation cross-entropy and measures no "
            "accuracy of its reversible runs; set objective.metric 'val_loss' "
            f"(got {spec.objective.metric!r})"
        )
        problems.append(((*where, "tuner"), message, arm.tuner))
    if (problem := _check_model(spec, index, arm)) is not None:
        problems.append(problem)
    options = arm.hypergradient_options
    steps = hypergradient_steps(options, spec.budget)
    at = (*where, "hypergradient", "steps")
    if steps is None:
        message = (
            "give steps (T, the SGD steps of one training run), or budget.steps_per_epoch so "
            "that it defaults to budget.epochs × steps_per_epoch like the other arms"
        )
        problems.append((at, message, None))
    elif steps > MAX_HYPERGRAD_STEPS:
        message = (
            f"budget.epochs × budget.steps_per_epoch = {steps}; at most "
            f"{MAX_HYPERGRAD_STEPS}: give a smaller steps"
        )
        problems.append((at, message, None))
    elif options.blocks > steps:
        message = f"blocks {options.blocks} > steps {steps}; at most one block per step"
        problems.append(((*where, "hypergradient", "blocks"), message, options.blocks))
    batch = options.batch_size or spec.data.batch_size
    if spec.data.n_train is not None and batch > spec.data.n_train:
        message = f"batch_size {batch} is larger than data.n_train {spec.data.n_train}"
        problems.append(((*where, "hypergradient", "batch_size"), message, batch))
    return problems


def check_build(spec: StudySpec, index: int, arm: HypergradientArmSpec) -> Problem | None:
    """Nothing to probe: `check_arm` already pinned the model and the scheme."""
    return None
