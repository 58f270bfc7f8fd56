"""The hypergradient tuner's checks of a spec (`check_arm`): it needs the `sgd` scheme, a
classification task whose model is a plain ReLU MLP (one that declares its `layer_sizes`,
`worker.tasks.contract.Model`: optim.hypergrad trains exactly that network on the flattened
inputs), the `val_loss` objective (what the tuner minimises) and a model within the
`MAX_HYPERGRAD_*` limits, so that a run's memory stays bounded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.arms.hypergradient.spec import (
    HypergradientArmSpec,
    hypergradient_steps,
    mlp_layer_sizes,
    mlp_parameter_count,
)
from worker.spec_base import (
    MAX_HYPERGRAD_DEPTH,
    MAX_HYPERGRAD_PARAMETERS,
    MAX_HYPERGRAD_STEPS,
    MAX_HYPERGRAD_WIDTH,
    Problem,
)

if TYPE_CHECKING:
    from worker.spec import StudySpec

__all__ = ["check_arm", "check_build"]


def _check_model(spec: StudySpec, index: int, arm: HypergradientArmSpec) -> Problem | None:
    """The model and data a hypergradient arm needs: a classifier that is a plain ReLU MLP."""
    from worker.tasks import get_task

    task, model = get_task(spec.task), spec.arm_model(arm)
    tuner: tuple[str | int, ...] = ("arms", index, "tuner")
    if task.kind != "classification" or task.model.layer_sizes is None:
        message = (
            "the hypergradient tuner trains a classifier that is a plain ReLU MLP "
            f"(optim.hypergrad's network, with cross-entropy); {spec.task} is a {task.kind} "
            f"task whose {task.model.name} model "
            + ("is one" if task.model.layer_sizes is not None else "does not declare one")
            + " (the tasks <dataset>-mlp of classification data do)"
        )
        return (tuner, message, arm.tuner)
    try:
        sizes = mlp_layer_sizes(task, spec.data, model)
    except (OSError, ValueError):
        return None  # the data's own problem, reported under data
    if sizes is None:
        message = (
            "the hypergradient tuner's mlp is ReLU and not transformed; got activation "
            f"{model.activation!r}, transformed {str(model.transformed).lower()}"
        )
        return (("arms", index, "model"), message, None)
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
