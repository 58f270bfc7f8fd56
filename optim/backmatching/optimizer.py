"""`BackMatching` (`bmp`): SGD whose rate for each parameter is `lr × factor`.

The factor is the scalar back-matching rate of docs/design.md (Zhang, Chen, Liu 2018, arXiv
1802.09750, "On the Local Hessian in Back-propagation"):

    propagate=True:            factor(l) = (1 / s_W(l)) · Π_{blocks k above l} (1 / s_z(k))
    propagate=False (default): factor(l) = 1 / s_W(l)

with the per-layer scalars of `optim.backmatching.layers` (revision 2: a BatchNorm is folded
into the Linear/Conv block before it, padding taps are not input), recomputed every step from
the statistics the forward hooks recorded and the current weights. `mean_over_positions`
(default true) takes a convolution block's traces as means over its output positions instead
of sums, its positions read as samples like the batch (`optim.backmatching.affine`): its
factors then no longer shrink with the spatial size of its input. `propagate=True` is the
scalar approximation of the back-matching recursion; `propagate=False` keeps each block's own
weight curvature only, the form in which a normalised network's blocks are treated as already
well-conditioned (the product over upper blocks is what spreads the factors over many decades
on deep networks). The defaults (local, means over positions) are the variant that trained
normalised networks best under a warm-up and cosine schedule (docs/benchmarks.md, bmp
revision 3); the other three remain options. Then, in this order:

1. EMA (`ema = β > 0`): each scalar is replaced by its running average
   `ŝ_t = β·ŝ_{t−1} + (1 − β)·s_t`, started at `ŝ_1 = s_1` (so no bias correction is needed);
2. clamp: `factor ← min(max(factor, 1/clamp), clamp)` (NaN passes through, so a diverging run
   still shows as diverged);
3. warm-up (`warmup_steps = N > 0`): at step t ≤ N the factor is `factor^(t/N)`, a geometric
   ramp from plain SGD (factor 1) to the back-matching rate;
4. the update is torch.optim.SGD's on the scaled gradient `g' = factor·g`: weight decay
   `d = g' + wd·w` (added after the scaling, so decay is not rescaled by the factor),
   momentum `b ← μ·b + d` (b = d at the first step), Nesterov `d ← d + μ·b` else `d ← b`,
   `w ← w − lr·d`. With every factor 1 it is torch.optim.SGD (dampening 0), up to rounding.

The momentum is kept divided by the factor of the step that last updated it,
`c = b / f` (`state["scaled_momentum"]`, with that factor in `state["momentum_factor"]`):
then `c ← g + (μ·f_prev/f)·c` is one in-place operation and `w ← w − lr·f·c` another, two per
parameter where SGD's `b ← μ·b + f·g; w ← w − lr·b` takes three. On a small network, where a
step is a few dozen tiny kernels, that pays for much of the statistics' cost. It needs finite,
non-zero factors, which is why `clamp` must be finite.

The optimizer holds one parameter group (the model's trainable parameters, with their names);
`lr` and the other options live in it, so learning-rate schedulers work as usual.
`layer_factors()` returns the factors applied at the last step, by parameter name.
`state_dict()` carries the step count, the scalars' running averages and the last factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from optim._checks import require, require_momentum, require_rate
from optim._layerwise import evaluate_closure
from optim.backmatching.plan import Plan

__all__ = ["BackMatching", "step_factors"]


def step_factors(
    plan: Plan, s: list[float], running: list[float] | None, step: int, options: Mapping[str, Any]
) -> tuple[list[float], list[float]]:
    """Steps 1-3 above for one model: `(running scalars, factors)` at step `step` (from 1) from
    this step's scalars `s` and the running averages before it (None at the first step), with
    the options `ema`, `propagate`, `clamp`, `warmup_steps` (a parameter group, or one member's
    values in `optim.backmatching.batched`)."""
    beta = options["ema"]
    if beta > 0.0 and running is not None:
        s = [beta * old + (1.0 - beta) * new for old, new in zip(running, s, strict=True)]
    factors = plan.factors(s, options["propagate"])
    lo, hi = 1.0 / options["clamp"], options["clamp"]
    factors = [min(max(f, lo), hi) for f in factors]
    warmup = options["warmup_steps"]
    if warmup > 0 and step < warmup:
        power = step / warmup
        factors = [f**power for f in factors]
    return s, factors


class BackMatching(torch.optim.Optimizer):
    """Back-matching layer-wise rates (`bmp`); see the module docstring for the formulas."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        ema: float = 0.0,
        clamp: float = 1e12,
        warmup_steps: int = 0,
        propagate: bool = False,
        mean_over_positions: bool = True,
    ) -> None:
        require_rate("bmp", lr)
        require_momentum("bmp", momentum)
        require(
            "bmp", "nesterov", nesterov, not nesterov or momentum > 0, "false when momentum is 0"
        )
        require("bmp", "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0")
        require("bmp", "ema", ema, 0.0 <= ema < 1.0, "in [0, 1)")
        require("bmp", "clamp", clamp, 1.0 <= clamp < math.inf, "finite and >= 1")
        require(
            "bmp",
            "warmup_steps",
            warmup_steps,
            int(warmup_steps) == warmup_steps >= 0,
            "an int >= 0",
        )
        require("bmp", "propagate", propagate, isinstance(propagate, bool), "true or false")
        mean = mean_over_positions
        require("bmp", "mean_over_positions", mean, isinstance(mean, bool), "true or false")
        self._plan = Plan(model, "bmp")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ema": ema,
            "clamp": clamp,
            "warmup_steps": int(warmup_steps),
            "propagate": propagate,
            "mean_over_positions": mean_over_positions,
        }
        named = list(zip(self._plan.names, self._plan.params, strict=True))
        super().__init__([{"params": named}], defaults)
        self._steps = 0
        self._scalars: list[float] | None = None  # running averages when ema > 0
        self._factors: list[float] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("bmp: param_groups: the model's parameters form the only group")
        super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its forward passes are no longer recorded)."""
        self._plan.remove_hooks()

    def layer_factors(self) -> dict[str, float]:
        """The factor applied to each named parameter at the last step ({} before the first)."""
        if self._factors is None:
            return {}
        return dict(zip(self._plan.names, self._factors, strict=True))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        group = self.param_groups[0]
        s = self._plan.scalars(group["mean_over_positions"])
        self._steps += 1
        self._scalars, factors = step_factors(self._plan, s, self._scalars, self._steps, group)
        self._factors = factors
        self._update(group, factors)
        return loss

    def _update(self, group: dict[str, Any], factors: list[float]) -> None:
        """SGD on `f·g` (see the module docstring), with the momentum kept as `c = b / f`.

        Every factor is finite and positive (the clamp) or NaN (a diverged run, which then
        stays NaN), so the divisions below are defined."""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        nesterov = group["nesterov"]
        state = self.state
        for p, f in zip(group["params"], factors, strict=True):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError("bmp: sparse gradients are not supported")
            if mu == 0.0:
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(g, alpha=-lr * f)
                continue
            slot = state[p]
            c = slot.get("scaled_momentum")
            if c is None:
                c = slot["scaled_momentum"] = g.clone()
            else:  # b = μ·b_prev + f·g, divided by f
                torch.add(g, c, alpha=mu * slot["momentum_factor"] / f, out=c)
            slot["momentum_factor"] = f
            if wd != 0.0:
                c.add_(p, alpha=wd / f)
            if nesterov:  # w − lr·(f·g + wd·w + μ·b)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(g, alpha=-lr * f).add_(c, alpha=-lr * mu * f)
            else:
                p.add_(c, alpha=-lr * f)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["backmatching"] = {
            "steps": self._steps,
            "scalars": None if self._scalars is None else list(self._scalars),
            "factors": None if self._factors is None else list(self._factors),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("backmatching", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        scalars, factors = extra["scalars"], extra["factors"]
        if scalars is not None and len(scalars) != self._plan.size:
            raise ValueError(
                f"bmp: state_dict: {len(scalars)} scalars saved, this model has {self._plan.size}"
            )
        self._steps = int(extra["steps"])
        self._scalars = None if scalars is None else [float(v) for v in scalars]
        self._factors = None if factors is None else [float(v) for v in factors]
