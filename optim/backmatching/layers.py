"""The back-matching scalars of each supported layer, from forward statistics and weights.

Rule (DESIGN.md): replace a block's batch-averaged local Hessian by the mean of its spectrum
over the directions the block can move, `s_z = trace(J_zᵀJ_z) / min(dim_in, dim_out)` for the
input and `s_W = trace(J_Wᵀ J_W) / fan_in` per output unit for the weights (the weight Hessian
is block diagonal with one identical block per output unit / channel). The batch is a sample
of the data, so a small batch's rank limit is ignored. `P` counts spatial positions; `B` is
the batch size; all leading dimensions of a Linear input count as batch.

- Linear(n_in, n_out): `s_W(weight) = mean(x²)`, `s_W(bias) = 1`;
  `s_z = ‖W‖_F² / min(n_in, n_out)`.
- Conv2d: `s_W(weight) = Σ_b Σ_p ‖patch_p‖² / (B·C_in·k_h·k_w)`, `s_W(bias) = P_out`;
  `s_z = P_out·‖W‖_F² / min(C_in·P_in, C_out·P_out)`.
- BatchNorm1d/2d: `s_W(γ) = s_W(β) = P`; `s_z = mean_c(γ_c² / (σ_c² + eps))`.
- ReLU: `s_z = 1` (the identity on the active set).
- Tanh, Sigmoid, GELU, SiLU, modules declaring `backmatching_slope(u)`: `s_z = mean(f'(u)²)`.
- Dropout(p) in train mode: `s_z = 1 / (1 − p)²`; in eval mode 1.
- MaxPool2d, AdaptiveMaxPool2d, Identity, Flatten, Unflatten: `s_z = 1`.
- AvgPool2d (kernel k_h×k_w, divisor d): `s_z = P_out·(k_h·k_w / d²) / min(P_in, P_out)`.
- AdaptiveAvgPool2d: `s_z = Σ_p (1 / |window_p|) / min(P_in, P_out)`.

Choices where DESIGN.md or the paper is silent, and why:
- Conv2d `s_W` is exact with zero padding: `Σ_p ‖patch_p‖² = Σ_q count(q)·Σ_{b,c} x[b,c,q]²`
  where `count(q)` is how many (output position, tap) pairs read input position q (computed
  once per input size; the hook costs one multiply and one reduction). Dividing by
  `C_in·k_h·k_w` instead of `fan_in = C_in/groups·k_h·k_w` is the same mean for grouped
  convolutions (each output channel sees one group). Only `padding_mode="zeros"` is
  supported. `s_z` follows DESIGN.md's formula, which counts every tap at every output
  position (taps on padding too).
- BatchNorm uses the variance the layer normalised with: the batch variance in train mode (or
  without running statistics), the running variance in eval mode. Its affine parameters get
  `s_W = P` (DESIGN.md), not `P·mean(x̂²)`, which differs from it by `σ²/(σ² + eps)`.
  In train mode with running statistics and a momentum μ > 0, the batch variance is read back
  from the running estimate the layer has just updated (PyTorch's documented rule
  `r ← (1 − μ)·r + μ·v·n/(n − 1)`, with `r` saved by a pre-hook) instead of a second pass over
  the activations; in float32 this costs about `1e-7·r_old/(μ·v)` relative error. Otherwise
  (`momentum=None`, no running statistics) it is computed from the input.
- Dropout keeps a subset of units scaled by `1/(1 − p)`; like ReLU it moves only the kept units,
  so the mean of the spectrum over those directions is `1/(1 − p)²`.
- Average pooling ignores border effects (`count_include_pad=False`, `ceil_mode`): interior
  windows, as Conv2d's `s_z`. Max pooling selects one input per output: `s_z = 1`.
- Statistics are pooled over every forward pass made with gradients enabled since the last
  step (gradient accumulation), as sums of squares over counts; BatchNorm's scalar is averaged
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
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optim.backmatching.activations import is_activation, slope
from optim.backmatching.structure import describe

__all__ = ["Block", "make_block", "supported", "tap_counts"]

_FOLD = 32  # recorded values kept per layer before they are folded into one


class Block:
    """One leaf layer: records forward statistics and turns them into its scalars."""

    hooked: ClassVar[bool] = True  # records statistics in forward hooks
    post: ClassVar[bool] = True  # has a forward (post) hook; `pre_hook` when not None

    def __init__(self, path: str, module: nn.Module) -> None:
        self.path = path
        self.module = module
        self.values: list[Tensor] = []  # 0-d tensors recorded since the last step
        self.counts: list[int] = []  # what each value is divided by; non-empty once seen
        self.pending: Tensor | None = None  # a tensor whose norm is taken at step time
        self.n_params = len(self.params())

    def params(self) -> list[tuple[str, nn.Parameter]]:
        """The layer's own parameters, in the order `scalars` returns their `s_W`."""
        return list(self.module.named_parameters(recurse=False))

    def weight(self) -> Tensor | None:
        """The tensor whose squared Frobenius norm `s_z` needs (taken at step time)."""
        return None

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            self.record(args[0].detach(), output)

    pre_hook: Callable[[nn.Module, tuple[Any, ...]], None] | None = None

    def record(self, x: Tensor, y: Tensor) -> None:
        """Append this forward pass's statistics to `values` and `counts` (`y`: the output,
        not detached)."""

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        """`(s_z, [s_W of each parameter])` from the recorded values and `‖weight‖²`."""
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

    def _mean_square(self, values: list[float]) -> float:
        if len(values) == 1 and len(self.counts) == 1:
            return values[0] * values[0] / self.counts[0]
        return sum(v * v for v in values) / sum(self.counts)


class _Constant(Block):
    hooked = False

    def __init__(self, path: str, module: nn.Module, value: float = 1.0) -> None:
        super().__init__(path, module)
        self.value = value

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        return self.value, []


class _Dropout(Block):
    hooked = False

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        p = float(getattr(self.module, "p", 0.0))
        if not self.module.training or p == 0.0:
            return 1.0, []
        return (math.inf if p >= 1.0 else 1.0 / (1.0 - p) ** 2), []


class _Linear(Block):
    module: nn.Linear

    def weight(self) -> Tensor:
        return self.module.weight

    post = False  # the input is all it needs: a pre-hook is the cheaper hook to dispatch

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            self.defer(args[0].detach())

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        m = self.module
        s_z = weight_sq / min(m.in_features, m.out_features)
        s_w = self._mean_square(values)
        return s_z, ([s_w, 1.0] if self.n_params == 2 else [s_w])


class _Conv2d(Block):
    module: nn.Conv2d

    def __init__(self, path: str, module: nn.Module) -> None:
        super().__init__(path, module)
        if self.module.padding_mode != "zeros":
            raise ValueError(
                f"bmp: {describe(path, module)}: padding_mode {self.module.padding_mode!r} is not "
                "supported (only 'zeros')"
            )
        self._roots: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}
        self.p_in = self.p_out = 1

    def weight(self) -> Tensor:
        return self.module.weight

    def record(self, x: Tensor, y: Tensor) -> None:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        h, w = x.shape[-2], x.shape[-1]
        key = (h, w, x.device, x.dtype)
        root = self._roots.get(key)
        if root is None:
            root = self._roots[key] = tap_counts(self.module, h, w, x).sqrt()
        self.add(torch.linalg.vector_norm(x * root), x.shape[0])  # √(Σ_q count(q)·Σ_{b,c} x²)
        self.p_in = h * w
        self.p_out = y.shape[-2] * y.shape[-1]

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        m = self.module
        taps = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        s_w = self._mean_square(values) / taps
        dims = min(m.in_channels * self.p_in, m.out_channels * self.p_out)
        return self.p_out * weight_sq / dims, [s_w, float(self.p_out)][: self.n_params]


def tap_counts(conv: nn.Conv2d, h: int, w: int, like: Tensor) -> Tensor:
    """`count(q)`: how many (output position, tap) pairs of `conv` read input position q of an
    h×w input — the gradient of the sum of a convolution of ones with a kernel of ones."""
    ones = torch.ones(1, 1, h, w, dtype=like.dtype, device=like.device)
    kernel = torch.ones(1, 1, *conv.kernel_size, dtype=like.dtype, device=like.device)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'same' with an even kernel: a one-off padded copy
        ones.requires_grad_(True)
        out = F.conv2d(ones, kernel, None, conv.stride, conv.padding, conv.dilation)
        (count,) = torch.autograd.grad(out.sum(), ones)
    return count[0, 0]


class _BatchNorm(Block):
    module: nn.BatchNorm1d | nn.BatchNorm2d

    def __init__(self, path: str, module: nn.Module) -> None:
        super().__init__(path, module)
        self.positions = 1
        self._before: Tensor | None = None  # running variance before this forward pass

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        m = self.module
        momentum = m.momentum
        if torch.is_grad_enabled() and m.training and momentum and m.running_var is not None:
            self._before = m.running_var.clone()

    def record(self, x: Tensor, y: Tensor) -> None:
        m = self.module
        before, self._before = self._before, None
        if m.training or m.running_var is None:
            n = x.numel() // x.shape[1]
            if before is not None and m.running_var is not None and m.momentum and n > 1:
                # r_new = (1 − μ)·r_old + μ·v·n/(n − 1): the layer's own batch variance
                var = torch.sub(m.running_var, before, alpha=1.0 - m.momentum)
                var.mul_((n - 1) / (n * m.momentum)).clamp_min_(0.0)
            else:
                var = _channel_variance(x)
            var.add_(m.eps)
        else:
            var = m.running_var + m.eps
        gain = var.reciprocal_() if m.weight is None else m.weight.detach().square().div_(var)
        self.add(gain.mean(), 1)
        self.positions = x.numel() // (x.shape[0] * x.shape[1])

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        return sum(values) / sum(self.counts), [float(self.positions)] * self.n_params

    def fold(self, values: Tensor) -> Tensor:
        return values.sum()


class _Activation(Block):
    def record(self, x: Tensor, y: Tensor) -> None:
        f = slope(self.module, x, y.detach())
        self.add(torch.linalg.vector_norm(f), f.numel())

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        return self._mean_square(values), []


class _AvgPool(Block):
    def __init__(self, path: str, module: nn.Module) -> None:
        super().__init__(path, module)
        self.shapes = (1, 1, 1, 1)

    def record(self, x: Tensor, y: Tensor) -> None:
        self.shapes = (x.shape[-2], x.shape[-1], y.shape[-2], y.shape[-1])
        self.counts[:] = [1]

    def scalars(self, values: list[float], weight_sq: float) -> tuple[float, list[float]]:
        h, w, ho, wo = self.shapes
        p_in, p_out = h * w, ho * wo
        m = self.module
        if isinstance(m, nn.AvgPool2d):
            kh, kw = _pair(m.kernel_size)
            d = m.divisor_override or kh * kw
            trace = p_out * kh * kw / d**2
        else:
            trace = _inverse_region_sum(h, ho) * _inverse_region_sum(w, wo)
        return trace / min(p_in, p_out), []


def _channel_variance(x: Tensor) -> Tensor:
    """Biased variance per channel (dim 1) from per-channel sums and sums of squares.

    Contiguous reductions; `torch.var` over dims (0, 2, 3) reduces across strides and is
    several times slower on CPU. The cancellation in `E[x²] − E[x]²` costs about
    `1e-7·(1 + 3·mean²/var)` relative error in float32: negligible for a scalar estimate.
    """
    rows = x.reshape(x.shape[0], x.shape[1], -1)
    n = rows.shape[0] * rows.shape[2]
    total = rows.sum((0, 2))
    squares = torch.linalg.vector_norm(rows, dim=-1).square_().sum(0)
    return torch.addcmul(squares, total, total, value=-1.0 / n).div_(n).clamp_min_(0.0)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _inverse_region_sum(size: int, out: int) -> float:
    """Σ over adaptive-pooling windows along one axis of 1 / window length."""
    return sum(
        1.0 / (math.ceil((i + 1) * size / out) - math.floor(i * size / out)) for i in range(out)
    )


_ONE = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Flatten, nn.Unflatten)
_TYPES: dict[type[nn.Module], type[Block]] = {
    nn.Linear: _Linear,
    nn.Conv2d: _Conv2d,
    nn.BatchNorm1d: _BatchNorm,
    nn.BatchNorm2d: _BatchNorm,
    nn.Dropout: _Dropout,
    nn.Dropout1d: _Dropout,
    nn.Dropout2d: _Dropout,
    nn.AvgPool2d: _AvgPool,
    nn.AdaptiveAvgPool2d: _AvgPool,
    **{t: _Constant for t in _ONE},
}


def supported(module: nn.Module) -> bool:
    """Whether `bmp` has a scalar for this layer (exact type or a declared slope)."""
    return type(module) in _TYPES or is_activation(module)


def make_block(path: str, module: nn.Module) -> Block:
    """The block computing `module`'s scalars; a declared slope wins over the type."""
    if hasattr(module, "backmatching_slope"):
        return _Activation(path, module)
    kind = _TYPES.get(type(module))
    if kind is not None:
        return kind(path, module)
    if is_activation(module):
        return _Activation(path, module)
    raise ValueError(f"bmp: {describe(path, module)}: unsupported layer type")
