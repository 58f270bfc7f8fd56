"""What the layer-wise optimizers share: the closure, the trust-ratio bookkeeping of LARS and
LAMB (which tensors are adapted, their labels, their norms, the factors of the last step)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

__all__ = ["TrustRatioOptimizer", "evaluate_closure", "norm_pairs", "param_labels"]


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss of `closure` computed with gradients on (steps run under `no_grad`)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def param_labels(group: dict[str, Any], index: int) -> list[str]:
    """The group's parameter names, or `"<group>.<position>"` when it has none."""
    names = group.get("param_names")
    if names is not None:
        return list(names)
    return [f"{index}.{i}" for i in range(len(group["params"]))]


def norm_pairs(weights: list[Tensor], updates: list[Tensor]) -> list[tuple[float, float]]:
    """`(‖w‖, ‖u‖)` per tensor: two multi-tensor reductions, one device synchronisation."""
    norms = torch.stack([*torch._foreach_norm(weights), *torch._foreach_norm(updates)]).tolist()
    n = len(weights)
    return list(zip(norms[:n], norms[n:], strict=True))


class TrustRatioOptimizer(torch.optim.Optimizer):
    """Base of LARS and LAMB: each step records the trust ratio it applied per parameter."""

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._factors: dict[str, float] = {}

    def layer_factors(self) -> dict[str, float]:
        """The trust ratio applied to each named parameter at the last step."""
        return dict(self._factors)

    @staticmethod
    def adapted(group: dict[str, Any], p: Tensor) -> bool:
        """Whether `p` gets the trust ratio and weight decay: with `exclude_bias_and_norm`,
        tensors of at most one dimension (biases, normalisation parameters) do not."""
        return not (group["exclude_bias_and_norm"] and p.dim() <= 1)
