"""`Block`: what every `bmp` layer type implements — hooks, recorded statistics, scalars.

A block records, in forward hooks, 0-d tensors (`values`, each divided by its `count`) or one
tensor whose norm is taken at step time (`pending`); at step time `finish()` may add values
computed from the current weights (`extra`), and `scalars()` turns everything, as Python
floats, into `(s_z, [s_W of each parameter])`. Nothing is read back to Python in a hook: the
plan gathers every block's tensors and synchronises once per step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from optim.backmatching.structure import describe

__all__ = ["Block"]

_FOLD = 32  # recorded values kept per layer before they are folded into one


class Block:
    """One leaf layer: records forward statistics and turns them into its scalars."""

    hooked: ClassVar[bool] = True  # records statistics in forward hooks

    def __init__(self, path: str, module: nn.Module) -> None:
        self.path = path
        self.module = module
        self.values: list[Tensor] = []  # 0-d tensors recorded since the last step
        self.counts: list[int] = []  # what each value is divided by; non-empty once seen
        self.pending: Tensor | None = None  # a tensor whose norm is taken at step time
        self.n_params = len(self.params())

    def params(self) -> list[tuple[str, nn.Parameter]]:
        """The block's own parameters, in the order `scalars` returns their `s_W`."""
        return list(self.module.named_parameters(recurse=False))

    def modules(self) -> list[nn.Module]:
        """The layers this block reads (more than one when a normalisation is folded in)."""
        return [self.module]

    def weight(self) -> Tensor | None:
        """The tensor whose squared Frobenius norm `scalars` receives (taken at step time)."""
        return None

    def register(self) -> list[RemovableHandle]:
        """Attach the forward hooks; the default records `(input, output)` after the layer."""
        return [self.module.register_forward_hook(self.hook)]

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            self.record(args[0].detach(), output)

    def record(self, x: Tensor, y: Tensor) -> None:
        """Append this forward pass's statistics to `values` and `counts` (`y`: the output,
        not detached)."""

    def finish(self) -> list[Tensor]:
        """0-d tensors computed at step time from the weights and the recorded statistics;
        they reach `scalars` as `extra`, after one synchronisation for every block."""
        return []

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        """`(s_z, [s_W of each parameter])` from the recorded values (the pending tensor's
        norm last), the `finish()` values and `‖weight‖²`; with `mean`, a block with spatial
        positions gives means over its output positions instead of sums
        (`mean_over_positions`, `.affine`)."""
        raise NotImplementedError

    def defer(self, x: Tensor) -> None:
        """Record `‖x‖` with count `x.numel()`, the norm taken at step time together with every
        other layer's (one multi-tensor reduction instead of one per layer and pass). At most
        one tensor waits: an earlier one (gradient accumulation) is reduced now."""
        if self.pending is not None:
            self.add(torch.linalg.vector_norm(self.pending), self.pending.numel())
        self.pending = x

    def add(self, value: Tensor, count: int) -> None:
        """Record one forward pass's value. A model copied with its hooks (an EMA or "best
        model" copy) records without ever stepping, so long histories are folded into one."""
        self.values.append(value)
        self.counts.append(count)
        if len(self.values) > _FOLD:
            self.values[:] = [self.fold(torch.stack(self.values))]
            self.counts[:] = [sum(self.counts)]

    def fold(self, values: Tensor) -> Tensor:
        """One value standing for `values`: root-sum-square of norms (overridden for sums)."""
        return torch.linalg.vector_norm(values)

    def reset(self) -> None:
        self.values.clear()
        self.counts.clear()
        self.pending = None

    def missing(self) -> str | None:
        """The block's layer that recorded no training forward pass since the last step (as
        errors name it), or None."""
        if self.pending is None and not self.counts:
            return describe(self.path, self.module)
        return None

    def _mean_square(self, values: list[float]) -> float:
        if len(values) == 1 and len(self.counts) == 1:
            return values[0] * values[0] / self.counts[0]
        return sum(v * v for v in values) / sum(self.counts)
