"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017, arXiv 1708.03888).

Algorithm 1 of the paper, per parameter tensor `w` with gradient `g`, global rate `γ = lr`,
trust coefficient `η`, weight decay `β`, momentum `m`:

    λ = η · ‖w‖ / (‖g‖ + β·‖w‖)          (the local rate, "trust ratio")
    v ← m·v + γ·λ·(g + β·w)
    w ← w − v

Choices where the paper is silent:
- when `‖w‖ = 0` or `‖g‖ = 0` the ratio is 1 (a zero-initialised or unused tensor falls back
  to SGD with momentum, as common implementations do);
- with `exclude_bias_and_norm` (default), tensors with at most one dimension (biases,
  normalisation gains and shifts) get neither the trust ratio nor weight decay: plain SGD with
  momentum at the global rate (the usual practice, e.g. Goyal et al. 2017 for decay);
- the rate sits inside the momentum buffer, as in the paper's algorithm (a learning-rate
  schedule changes the rate of new gradients only);
- the first momentum buffer is `v = γ·λ·(g + β·w)` (i.e. `v₀ = 0`).

`layer_factors()` returns the trust ratio `λ` applied to each named parameter at the last
step (1 for excluded ones). Built from `model.named_parameters()`, names are the model's;
from plain parameters they are `"<group>.<index>"`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.optimizer import ParamsT

from optim._checks import require, require_momentum, require_rate
from optim._layerwise import TrustRatioOptimizer, evaluate_closure, norm_pairs, param_labels

__all__ = ["LARS"]


class LARS(TrustRatioOptimizer):
    """Layer-wise adaptive rate scaling; formulas in the module docstring."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        trust_coefficient: float = 1e-3,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        require_rate("lars", lr)
        require_momentum("lars", momentum)
        require("lars", "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0")
        require("lars", "trust_coefficient", trust_coefficient, trust_coefficient > 0.0, "> 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "exclude_bias_and_norm": exclude_bias_and_norm,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        self._factors = {}
        for index, group in enumerate(self.param_groups):
            labels = param_labels(group, index)
            live = [
                (p, label)
                for p, label in zip(group["params"], labels, strict=True)
                if p.grad is not None
            ]
            if not live:
                continue
            params = [p for p, _ in live]
            grads = [p.grad for p in params]
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            adapt = [self.adapted(group, p) for p in params]
            norms = norm_pairs(params, grads)
            for (p, label), g, (w_norm, g_norm), adapted in zip(
                live, grads, norms, adapt, strict=True
            ):
                ratio = 1.0
                if adapted and w_norm > 0.0 and g_norm > 0.0:
                    ratio = eta * w_norm / (g_norm + wd * w_norm)
                self._factors[label] = ratio
                d = g.add(p, alpha=wd) if adapted and wd != 0.0 else g
                rate = group["lr"] * ratio
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.mul(rate)
                else:
                    buf.mul_(group["momentum"]).add_(d, alpha=rate)
                p.sub_(buf)
        return loss
