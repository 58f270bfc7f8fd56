"""bmp's factors for K stacked models (a cohort), each member's from its own statistics.

A cohort (`optim.batched`) trains K copies of one network as stacked parameters `[K, ...]`
through `torch.func.vmap` over `functional_call(template, member_parameters, x)`. bmp's factors
come from statistics its forward hooks record on the layers (`.plan`); under `vmap` those hooks
run once, on tensors that stand for every member (a hook sees one member's logical tensor), so
the statistics are per member without any change to the blocks. `MemberFactors` adds:

1. The `Plan` is built on the template, whose layers the hooks stay on. One more forward hook,
   on the template itself, runs after every layer's and still inside `functional_call` (so a
   block's weight is the member's): it calls `Plan.gather(fused=False)`, every 0-d tensor the
   scalars are made of. `forward_statistics()` hands those out of the vmapped function, which
   stacks each into `[K]`; `record()` keeps them for the step.
2. `factors(step)` reads them with one synchronisation as K lists of floats and runs, for each
   member, the single optimizer's own Python arithmetic: `Plan.combine` (the scalars, position
   sums or means), `step_factors` (EMA, propagation, clamp, warm-up). A member's factors are
   therefore what `BackMatching` computes from the same statistics, to the rounding of the
   vmapped reductions (float64 cohorts match separate runs to 1e-10).

The update that applies them, per member, is `optim.batched.BatchedBackMatching`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from optim.backmatching.optimizer import step_factors
from optim.backmatching.plan import Plan

__all__ = ["MemberFactors"]


class MemberFactors:
    """The factors of every member of a stack built on `model` (the template), for the members'
    options (`ema`, `clamp`, `warmup_steps` each; `propagate` and `mean_over_positions` shared)."""

    def __init__(
        self,
        model: nn.Module,
        options: Sequence[Mapping[str, Any]],
        propagate: bool,
        mean_over_positions: bool,
    ) -> None:
        self.plan = Plan(model, "bmp")
        self.names = self.plan.names  # the parameters, in the order of the factors' rows
        names = ("ema", "clamp", "warmup_steps")
        self._options = [{"propagate": propagate, **{k: o[k] for k in names}} for o in options]
        self._mean = mean_over_positions
        self._running: list[list[float] | None] = [None] * len(options)  # EMA of the scalars
        self._handle: RemovableHandle | None = model.register_forward_hook(self._gather)
        self._gathered: tuple[Tensor, ...] | None = None  # inside vmap: one member's
        self._statistics: list[Tensor] | None = None  # [K] each, for the next step

    def remove_hooks(self) -> None:
        """Detach from the template (its forward passes are no longer recorded)."""
        self.plan.remove_hooks()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _gather(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            self._gathered = tuple(self.plan.gather(fused=False))

    def forward_statistics(self) -> tuple[Tensor, ...]:
        """Inside the vmapped training forward pass, after the template: this member's."""
        gathered, self._gathered = self._gathered, None
        if gathered is None:
            raise RuntimeError("bmp: the template's forward pass recorded no statistics")
        return gathered

    def record(self, statistics: Sequence[Tensor]) -> None:
        """`forward_statistics()` of every member, stacked (`[K]` each)."""
        self._statistics = list(statistics)

    def factors(self, step: int) -> Tensor:
        """The factors of step `step` (from 1), float64 `[parameters, K]`."""
        statistics, self._statistics = self._statistics, None
        if statistics is None:
            raise RuntimeError(
                "bmp: no training forward pass since the last step; run forward and backward "
                "before step()"
            )
        members = len(self._options)
        rows: list[list[float]] = (
            torch.stack(statistics, dim=1).tolist() if statistics else [[]] * members
        )
        plan, table = self.plan, []
        for k, (values, options) in enumerate(zip(rows, self._options, strict=True)):
            s = plan.combine(values, self._mean)
            self._running[k], member = step_factors(plan, s, self._running[k], step, options)
            table.append(member)
        plan.reset()
        device = statistics[0].device if statistics else None
        return torch.tensor(table, dtype=torch.float64, device=device).T.contiguous()

    def select(self, index: Sequence[int]) -> None:
        """Keep members `index` (in that order): their options and running scalars."""
        self._options = [self._options[i] for i in index]
        self._running = [self._running[i] for i in index]
