"""Learning-rate schedules: the multiplier of a scheme's global rate at each optimizer step.

One set of formulas for every scheme. With `T` the optimizer steps of the whole training, `W`
the warm-up steps (`0 ≤ W ≤ T`) and `s` the number of steps already taken (the step about to
be taken is step `s`, counted from 0), step `s` runs at `lr · m(s)`:

    m(s) = w(s) · d(s)
    w(s) = min(1, (s + 1) / W)                 linear warm-up (w = 1 when W = 0)
    p(s) = clip((s − W) / (T − W), 0, 1)       progress of the decay (p = 1 when W = T)

    constant:  d(s) = 1
    cosine:    d(s) = f + (1 − f) · (1 + cos(π · p(s))) / 2
    linear:    d(s) = 1 − (1 − f) · p(s)
    step:      d(s) = γ^k(s),  k(s) = #{i : s ≥ μ_i · T}

with the floor `f ∈ [0, 1]` (a fraction of the peak rate), the milestones `0 < μ_1 < μ_2 < …
< 1` (fractions of the whole training) and the factor `γ ∈ (0, 1]`.

Choices, and why:
- The warm-up's first step runs at `lr / W`, not 0 (a step at rate 0 would be a wasted step),
  and its last step (`s = W − 1`) at the full rate: the warm-up reaches 1 at its end.
- Cosine and linear decay over the steps after the warm-up, as AlgoPerf's baselines do
  (Dahl et al. 2023, arXiv 2306.07179: linear warm-up, then cosine decay). `m(T) = f`: the
  value after the last step is the floor, so the last step taken runs one step short of it,
  as `torch.optim.lr_scheduler.CosineAnnealingLR` with `T_max = T`.
- Step milestones count the whole training, warm-up included (Goyal et al. 2017, arXiv
  1706.02677, warm up for 5 epochs and still divide the rate at epochs 30, 60 and 80 of 90);
  a milestone inside the warm-up multiplies the ramp.
- The schedule multiplies `lr`, the scheme's *global* rate: the step size of sgd, adam and
  adamw, and for the layer-wise schemes (lars, lamb, bmp) the rate before their per-layer
  factor, so every layer's rate `lr · m(s) · factor_l(s)` follows the schedule. Weight decay
  follows the rate as each scheme couples it (`docs/design.md`, "Schedules").

A `Schedule` is a callable `s → m(s)`, so `torch.optim.lr_scheduler.LambdaLR(optimizer,
schedule)` applies it to any optimizer (every scheme keeps `lr` in its parameter groups);
`LambdaLR` sets `lr = base · m(s)` before step `s`, the product the batched optimizers of
`optim.batched` compute per member.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["SCHEDULES", "Schedule", "ScheduleName"]

ScheduleName = Literal["constant", "cosine", "linear", "step"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


@dataclass(frozen=True)
class Schedule:
    """`m(s)` of the module docstring over `total_steps` optimizer steps."""

    total_steps: int
    name: ScheduleName = "constant"
    warmup_steps: int = 0
    floor: float = 0.0
    milestones: tuple[float, ...] = ()
    factor: float = 0.1

    def __post_init__(self) -> None:
        def refuse(field: str, detail: str) -> ValueError:
            return ValueError(f"schedule.{field}: {detail}")

        if self.name not in SCHEDULES:
            raise refuse("name", f"unknown schedule {self.name!r}; known: {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise refuse("total_steps", f"must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            detail = f"must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            raise refuse("warmup_steps", detail)
        if not 0.0 <= self.floor <= 1.0:
            raise refuse("floor", f"must be in [0, 1], got {self.floor!r}")
        if not 0.0 < self.factor <= 1.0:
            raise refuse("factor", f"must be in (0, 1], got {self.factor!r}")
        points = (0.0, *self.milestones, 1.0)
        if any(not a < b for a, b in itertools.pairwise(points)):
            detail = f"must increase strictly within (0, 1), got {list(self.milestones)}"
            raise refuse("milestones", detail)

    @property
    def is_constant(self) -> bool:
        """`m(s) = 1` at every step: nothing to apply."""
        return self.warmup_steps == 0 and (
            self.name == "constant"
            or (self.name in ("cosine", "linear") and self.floor == 1.0)
            or (self.name == "step" and (self.factor == 1.0 or not self.milestones))
        )

    def warmup(self, step: int) -> float:
        """`w(s)`: the linear warm-up ramp, 1 from step `W − 1` on."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def decay(self, step: int) -> float:
        """`d(s)`: the decay's own multiplier."""
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            drops = sum(step >= mu * self.total_steps for mu in self.milestones)
            return float(self.factor**drops)
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span == 0 else min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.name == "cosine":
            return self.floor + (1.0 - self.floor) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return 1.0 - (1.0 - self.floor) * progress  # linear

    def __call__(self, step: int) -> float:
        """`m(s)`, the multiplier of the rate of step `s` (0-based; `s = T` is the end)."""
        return self.warmup(step) * self.decay(step)
