"""LAMB: layer-wise adaptive moments for batch training (You et al. 2019, arXiv 1904.00962).

Algorithm 2 of the paper, per parameter tensor `w` with gradient `g` at step t:

    m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
    m̂ = m / (1 − β1^t)                v̂ = v / (1 − β2^t)
    r = m̂ / (√v̂ + ε) + λ·w           (λ = weight_decay)
    w ← w − lr · (‖w‖ / ‖r‖) · r

Choices where the paper is silent or offers options:
- the scaling function φ of the paper is the identity, `φ(‖w‖) = ‖w‖` (no clipping);
- when `‖w‖ = 0` or `‖r‖ = 0` the ratio is 1 (an Adam step);
- with `exclude_bias_and_norm` (default), tensors with at most one dimension (biases,
  normalisation parameters) get neither weight decay nor the trust ratio — the reference BERT
  setup excludes them from decay, and layer adaptation follows the same exclusion list.

`layer_factors()` returns the trust ratio `‖w‖/‖r‖` applied to each named parameter at the
last step (1 for excluded ones).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.optimizer import ParamsT

from optim._checks import require, require_rate
from optim._layerwise import TrustRatioOptimizer, evaluate_closure, norm_pairs, param_labels

__all__ = ["LAMB"]


class LAMB(TrustRatioOptimizer):
    """Layer-wise adaptive moments; formulas in the module docstring."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        require_rate("lamb", lr)
        require("lamb", "beta1", beta1, 0.0 <= beta1 < 1.0, "in [0, 1)")
        require("lamb", "beta2", beta2, 0.0 <= beta2 < 1.0, "in [0, 1)")
        require("lamb", "eps", eps, eps > 0.0, "> 0")
        require("lamb", "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0")
        defaults = {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "eps": eps,
            "weight_decay": weight_decay,
            "exclude_bias_and_norm": exclude_bias_and_norm,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        self._factors = {}
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["beta1"], group["beta2"]
            eps, wd = group["eps"], group["weight_decay"]
            labels = param_labels(group, index)
            params, updates, adapt, names = [], [], [], []
            for p, label in zip(group["params"], labels, strict=True):
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = v.div(1.0 - beta2**t).sqrt_().add_(eps)
                r = m.div(1.0 - beta1**t).div_(denom)
                adapted = self.adapted(group, p)
                if adapted and wd != 0.0:
                    r.add_(p, alpha=wd)
                params.append(p)
                updates.append(r)
                adapt.append(adapted)
                names.append(label)
            if not params:
                continue
            norms = norm_pairs(params, updates)
            for p, r, (w_norm, r_norm), adapted, label in zip(
                params, updates, norms, adapt, names, strict=True
            ):
                ratio = w_norm / r_norm if adapted and w_norm > 0.0 and r_norm > 0.0 else 1.0
                self._factors[label] = ratio
                p.add_(r, alpha=-group["lr"] * ratio)
        return loss
