"""The back-matching scalars of each supported layer, and which block reads which layer.

Rule (docs/design.md): replace a block's batch-averaged local Hessian by the mean of its spectrum
over the directions the block can move, `s_z = trace(J_zᵀJ_z) / min(dim_in, dim_out)` for the
input and `s_W = trace(J_Wᵀ J_W) / fan_in` per output unit for the weights (the weight Hessian
is block diagonal with one block per output unit / channel). The batch is a sample of the data,
so a small batch's rank limit is ignored. `P` counts spatial positions; `B` is the batch size;
all leading dimensions of a Linear input count as batch.

- Linear, Conv1d, Conv2d, each with the BatchNorm1d/2d that directly follows it in a chain
  folded into the same block (revision 2): `optim.backmatching.affine`, which states the
  formulas (padding taps are not input; a BatchNorm weights each output channel by
  `γ_c²/σ_c²`). A BatchNorm that follows anything else is its own block,
  `s_z = mean_c(γ_c²/(σ_c² + eps))`, `s_W(γ) = s_W(β) = P`. With `mean_over_positions`
  the position sums of convolution and BatchNorm blocks become means (`.affine`); the other
  scalars below are already means per direction and do not change.
- ReLU: `s_z = 1` (the identity on the active set).
- Tanh, Sigmoid, GELU, SiLU, modules declaring `backmatching_slope(u)`: `s_z = mean(f'(u)²)`.
- Dropout(p) in train mode: `s_z = 1 / (1 − p)²`; in eval mode 1.
- MaxPool1d/2d, AdaptiveMaxPool1d/2d, Identity, Flatten, Unflatten: `s_z = 1`.
- AvgPool1d/2d (kernel of k taps, divisor d): `s_z = P_out·(k / d²) / min(P_in, P_out)`.
- AdaptiveAvgPool1d/2d: `s_z = Σ_p (1 / |window_p|) / min(P_in, P_out)`.

Choices where docs/design.md or the paper is silent, and why:
- Dropout keeps a subset of units scaled by `1/(1 − p)`; like ReLU it moves only the kept units,
  so the mean of the spectrum over those directions is `1/(1 − p)²`.
- Average pooling ignores border effects (`count_include_pad=False`, `ceil_mode`): interior
  windows. Max pooling selects one input per output: `s_z = 1`.
- Statistics are pooled over every forward pass made with gradients enabled since the last
  step (gradient accumulation), as sums of squares over counts; BatchNorm gains are averaged
  over those passes. Forward passes without gradients (evaluation) are ignored.
- Hooks reduce each layer's input once, on detached tensors, and keep a 0-d tensor (no extra
  forward or backward pass, nothing kept alive past the step). A Linear layer's input is not
  reduced in the hook: it is kept (autograd keeps it for the weight's gradient anyway) and its
  norm is taken at step time in the same multi-tensor reduction as the weights' norms, which
  on a small network costs less than one reduction per layer and pass. All scalars reach
  Python together.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from optim._checks import UnsupportedModelError
from optim.backmatching.activations import is_activation, slope
from optim.backmatching.affine import (
    AFFINE,
    NORMS,
    BatchNormBlock,
    ConvBlock,
    LinearBlock,
    conv_counts,
)
from optim.backmatching.block import Block
from optim.backmatching.structure import Leaf, describe

__all__ = ["AFFINE", "NORMS", "Block", "conv_counts", "make_block", "supported"]


class _Constant(Block):
    hooked = False

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        return 1.0, []


class _Dropout(Block):
    hooked = False

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        p = float(getattr(self.module, "p", 0.0))
        if not self.module.training or p == 0.0:
            return 1.0, []
        return (math.inf if p >= 1.0 else 1.0 / (1.0 - p) ** 2), []


class _Activation(Block):
    def record(self, x: Tensor, y: Tensor) -> None:
        f = slope(self.module, x, y.detach())
        self.add(torch.linalg.vector_norm(f), f.numel())

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        return self._mean_square(values), []


class _AvgPool(Block):
    """AvgPool1d/2d and AdaptiveAvgPool1d/2d (the spatial sizes come from the last pass)."""

    def __init__(self, path: str, module: nn.Module) -> None:
        super().__init__(path, module)
        self.dims = 1 if "1d" in type(module).__name__ else 2
        self.sizes: tuple[tuple[int, ...], tuple[int, ...]] = ((1,) * self.dims,) * 2

    def record(self, x: Tensor, y: Tensor) -> None:
        self.sizes = (tuple(x.shape[-self.dims :]), tuple(y.shape[-self.dims :]))
        self.counts[:] = [1]

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        sizes, outs = self.sizes
        p_in, p_out = math.prod(sizes), math.prod(outs)
        m = self.module
        if isinstance(m, nn.AvgPool1d | nn.AvgPool2d):
            taps = math.prod(_tuple(m.kernel_size, self.dims))
            d = getattr(m, "divisor_override", None) or taps
            trace = p_out * taps / d**2
        else:
            trace = math.prod(_inverse_region_sum(n, o) for n, o in zip(sizes, outs, strict=True))
        return trace / min(p_in, p_out), []


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(int(v) for v in value)


def _inverse_region_sum(size: int, out: int) -> float:
    """Σ over adaptive-pooling windows along one axis of 1 / window length."""
    return sum(
        1.0 / (math.ceil((i + 1) * size / out) - math.floor(i * size / out)) for i in range(out)
    )


_ONE = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
)
_TYPES: dict[type[nn.Module], type[Block]] = {
    nn.Linear: LinearBlock,
    nn.Conv1d: ConvBlock,
    nn.Conv2d: ConvBlock,
    nn.BatchNorm1d: BatchNormBlock,
    nn.BatchNorm2d: BatchNormBlock,
    nn.Dropout: _Dropout,
    nn.Dropout1d: _Dropout,
    nn.Dropout2d: _Dropout,
    nn.AvgPool1d: _AvgPool,
    nn.AvgPool2d: _AvgPool,
    nn.AdaptiveAvgPool1d: _AvgPool,
    nn.AdaptiveAvgPool2d: _AvgPool,
    **{t: _Constant for t in _ONE},
}


def supported(module: nn.Module) -> bool:
    """Whether `bmp` has a scalar for this layer (exact type or a declared slope)."""
    return type(module) in _TYPES or is_activation(module)


def make_block(leaf: Leaf) -> Block:
    """The block computing `leaf`'s scalars; a declared slope wins over the type."""
    module = leaf.module
    if leaf.norm is not None:
        kind = LinearBlock if type(module) is nn.Linear else ConvBlock
        return kind(leaf.path, module, leaf.norm, leaf.norm_path)
    if hasattr(module, "backmatching_slope"):
        return _Activation(leaf.path, module)
    block = _TYPES.get(type(module))
    if block is not None:
        return block(leaf.path, module)
    if is_activation(module):
        return _Activation(leaf.path, module)
    raise UnsupportedModelError("bmp", f"{describe(leaf.path, module)}: unsupported layer type")
