"""Readable names for the per-layer factors a layer-wise scheme records.

The runner stores each factor under the parameter's name from `model.named_parameters()`
(`worker.runner`, via `optim.build`, which gives layer-wise schemes the named parameters). The
task models are plain `nn.Sequential` stacks, so those names *are* the models' own attribute
paths (`0.weight`, `3.branch.0.weight`): there is no `features.`-style path to recover, and
the index alone does not say which layer it is. `parameter_labels` rebuilds the arm's model on
PyTorch's meta device (no memory, no data) and adds to each name its module's type and the
tensor's shape: `0.weight (Linear, 32×40)`. Factors stored by a parameter group's position
(`<group>.<position>`, what `optim._layerwise.param_labels` writes for unnamed parameters) are
matched to the trainable parameters in order.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.spec import StudySpec

__all__ = ["parameter_labels"]

_POSITION = re.compile(r"^0\.(\d+)$")


def parameter_labels(spec: StudySpec, arm_label: str, names: list[str]) -> dict[str, str]:
    """`{stored name: label}` for the arm's model; names the model does not have keep their
    own text (an arm missing from the spec, or a model that cannot be built here, gives {})."""
    import torch

    from worker.spec_base import given_options
    from worker.tasks import get_task

    arm = next((a for a in spec.arms if a.label == arm_label), None)
    if arm is None:
        return {}
    options = given_options(spec.arm_model(arm))
    try:
        task = get_task(spec.task)  # a task not installed here (a plugin, an inline one): {}
        with torch.device("meta"):
            model = task.build(spec.data.model_dump(), options)
    except (ValueError, KeyError, RuntimeError, TypeError, OSError):
        return {}
    modules = dict(model.named_modules())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    described = {}
    for name, param in params:
        owner = modules.get(name.rpartition(".")[0])
        kind = type(owner).__name__ if owner is not None else "?"
        shape = "×".join(str(d) for d in param.shape) or "scalar"
        described[name] = f"{name} ({kind}, {shape})"
    labels = {}
    for name in names:
        if name in described:
            labels[name] = described[name]
        elif (match := _POSITION.match(name)) and int(match[1]) < len(params):
            labels[name] = described[params[int(match[1])][0]]
    return labels
