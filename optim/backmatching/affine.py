"""Linear and convolution blocks, with the BatchNorm that follows them folded in (revision 2).

A block `y = γ ⊙ (W·x − μ)/σ + β` (Linear or Conv, then BatchNorm; `γ = 1, β = 0` without a
normalisation) with the batch statistics μ, σ held constant has, per output channel c, the
Jacobians of the bare layer times `γ_c/σ_c`. With `g_c = γ_c²/σ_c²` (`g_c = 1` without a
normalisation), `P_in`/`P_out` the spatial positions (1 for Linear) and `count(t)` the number of
output positions at which kernel tap t lands on a real input position (not on padding):

    trace(J_zᵀJ_z) = Σ_c g_c Σ_t count(t)·‖W[c, :, t]‖²      (Linear: Σ_c g_c ‖W_c‖²)
    s_z            = trace / min(C_in·P_in, C_out·P_out)
    s_W(W)         = mean_c g_c · (batch mean of Σ_pos ‖patch‖²) / fan_in   (Linear: mean(x²))
    s_W(bias)      = mean_c g_c · P_out,   s_W(γ) = s_W(β) = P_out

With `mean` (`bmp`'s `mean_over_positions`; docs/design.md, revision 3) output positions count
as samples, like the batch: a convolution is read as a Linear layer from each patch (`C_in·k`
values, k taps) to the `C_out` outputs at its position, and its traces are averaged over the
`P_out` output positions instead of summed:

    s_z            = (trace(J_zᵀJ_z) / P_out) / min(C_in·k, C_out)
    s_W(W)         = mean_c g_c · (mean over batch and positions of ‖patch‖²) / fan_in
    s_W(bias)      = mean_c g_c,   s_W(γ) = s_W(β) = 1

Without padding these are exactly the scalars of a Linear layer (and BatchNorm1d) applied to
`F.unfold`'s patches with the positions as further batch rows; with padding the trace still
counts only taps on real input. A Linear layer has no positions and is the same in both modes.

Choices, and why:
- `count(t)` is exact for any stride, dilation, groups and padding (zeros only): each output
  position reads through tap t exactly one input position, a real one or padding; it is the
  gradient, with respect to a kernel of ones, of the sum of a convolution of an input of ones
  (computed once per input size). For a grouped convolution each weight couples one input
  channel of its group to one output channel, so the same sum holds with `W[c, :, t]` the
  weights of output channel c. `C_in·k` divides the patch energy, which for groups is the same
  mean as `fan_in = C_in/groups·k` per output channel.
- A Linear or Conv bias before a BatchNorm moves the output by `γ_c/σ_c` per position when the
  statistics are held constant (the Gauss–Newton reading of revision 2), hence `g·P_out`.
- `σ_c²` is the variance the BatchNorm normalised with plus its `eps`: the batch variance in
  train mode (read back from the running estimate it has just updated, PyTorch's documented
  rule `r ← (1 − m)·r + m·v·n/(n − 1)`, when it has one; otherwise computed from its input),
  the running variance in eval mode. `g_c` is averaged over the training forward passes since
  the last step; `count(t)`, `P_in` and `P_out` come from the last pass.
- A BatchNorm that does not follow a Linear or Conv is its own block:
  `s_z = mean_c g_c`, `s_W(γ) = s_W(β) = P` (1 with `mean`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from optim._checks import UnsupportedModelError
from optim.backmatching.block import Block
from optim.backmatching.structure import describe

__all__ = ["AFFINE", "NORMS", "BatchNormBlock", "ConvBlock", "LinearBlock", "conv_counts"]

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class _Gain:
    """`g_c = γ_c²/(σ_c² + eps)` of one BatchNorm, summed over the training passes of a step."""

    def __init__(self, bn: nn.Module) -> None:
        self.bn: nn.BatchNorm1d | nn.BatchNorm2d = bn  # type: ignore[assignment]
        self.total: Tensor | None = None
        self.passes = 0
        self.positions = 1
        self._before: Tensor | None = None  # running variance before this forward pass

    def register(self) -> list[RemovableHandle]:
        return [
            self.bn.register_forward_pre_hook(self._pre_hook),
            self.bn.register_forward_hook(self._hook),
        ]

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        m = self.bn
        if torch.is_grad_enabled() and m.training and m.momentum and m.running_var is not None:
            self._before = m.running_var.clone()

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        x = args[0].detach()
        m = self.bn
        before, self._before = self._before, None
        if m.training or m.running_var is None:
            n = x.numel() // x.shape[1]
            if before is not None and m.running_var is not None and m.momentum and n > 1:
                var = torch.sub(m.running_var, before, alpha=1.0 - m.momentum)
                var.mul_((n - 1) / (n * m.momentum)).clamp_min_(0.0)
            else:
                var = _channel_variance(x)
            var.add_(m.eps)
        else:
            var = m.running_var + m.eps
        gain = var.reciprocal_() if m.weight is None else m.weight.detach().square().div_(var)
        self.total = gain if self.total is None else self.total.add_(gain)
        self.passes += 1
        self.positions = x.numel() // (x.shape[0] * x.shape[1]) if x.dim() > 2 else 1

    def mean(self) -> Tensor:
        assert self.total is not None
        return self.total / self.passes

    def reset(self) -> None:
        self.total = None
        self.passes = 0


class BatchNormBlock(Block):
    """A BatchNorm that does not follow a Linear or Conv: its own block."""

    def __init__(self, path: str, module: nn.Module) -> None:
        super().__init__(path, module)
        self.gain = _Gain(module)

    def register(self) -> list[RemovableHandle]:
        return self.gain.register()

    def finish(self) -> list[Tensor]:
        return [self.gain.mean().mean()]

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        positions = 1.0 if mean else float(self.gain.positions)
        return extra[0], [positions] * self.n_params

    def missing(self) -> str | None:
        return describe(self.path, self.module) if self.gain.passes == 0 else None

    def reset(self) -> None:
        super().reset()
        self.gain.reset()


class _Affine(Block):
    """A Linear or Conv layer and, when `norm` is given, the BatchNorm right after it."""

    def __init__(
        self, path: str, module: nn.Module, norm: nn.Module | None = None, norm_path: str = ""
    ) -> None:
        self.norm = norm
        self.norm_path = norm_path
        self.gain = _Gain(norm) if norm is not None else None
        super().__init__(path, module)
        self.has_bias = getattr(module, "bias", None) is not None
        self.n_norm = len(list(norm.parameters(recurse=False))) if norm is not None else 0

    def params(self) -> list[tuple[str, nn.Parameter]]:
        own = list(self.module.named_parameters(recurse=False))
        if self.norm is not None:
            own += list(self.norm.named_parameters(recurse=False))
        return own

    def modules(self) -> list[nn.Module]:
        return [self.module] + ([self.norm] if self.norm is not None else [])

    def register(self) -> list[RemovableHandle]:
        handles = self._register_layer()
        return handles + (self.gain.register() if self.gain is not None else [])

    def _register_layer(self) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(self.hook)]

    def missing(self) -> str | None:
        gone = super().missing()
        if gone is None and self.gain is not None and self.gain.passes == 0:
            assert self.norm is not None
            return describe(self.norm_path, self.norm)
        return gone

    def reset(self) -> None:
        super().reset()
        if self.gain is not None:
            self.gain.reset()

    def _norm_scalars(self, gbar: float, s_w: float, positions: float) -> list[float]:
        """`s_W` of the weight, the bias and the normalisation's γ, β, in `params()` order."""
        return [s_w] + [gbar * positions] * self.has_bias + [positions] * self.n_norm


class LinearBlock(_Affine):
    module: nn.Linear

    def _register_layer(self) -> list[RemovableHandle]:
        # the input is all it needs: a pre-hook is the cheaper hook to dispatch
        return [self.module.register_forward_pre_hook(self._pre_hook)]

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            self.defer(args[0].detach())

    def weight(self) -> Tensor | None:
        return self.module.weight if self.gain is None else None

    def finish(self) -> list[Tensor]:
        if self.gain is None:
            return []
        g = self.gain.mean()
        rows = torch.linalg.vector_norm(self.module.weight, dim=1).square_()
        return [torch.dot(g, rows), g.mean()]

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        m = self.module
        dims = min(m.in_features, m.out_features)
        trace, gbar = extra if extra else (weight_sq, 1.0)
        return trace / dims, self._norm_scalars(gbar, gbar * self._mean_square(values), 1.0)


class ConvBlock(_Affine):
    module: nn.Conv1d | nn.Conv2d

    def __init__(
        self, path: str, module: nn.Module, norm: nn.Module | None = None, norm_path: str = ""
    ) -> None:
        super().__init__(path, module, norm, norm_path)
        if self.module.padding_mode != "zeros":
            raise UnsupportedModelError(
                "bmp",
                f"{describe(path, module)}: padding_mode {self.module.padding_mode!r} is not "
                "supported (only 'zeros')",
            )
        self.dims = self.module.weight.dim() - 2
        self._geometry: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self.taps: Tensor | None = None  # count(t) for the last input size
        self.p_in = self.p_out = 1

    def record(self, x: Tensor, y: Tensor) -> None:
        if x.dim() == self.dims + 1:
            x = x.unsqueeze(0)
        size = tuple(x.shape[2:])
        key = (size, x.device, x.dtype)
        geometry = self._geometry.get(key)
        if geometry is None:
            inputs, taps = conv_counts(self.module, size, x)
            geometry = self._geometry[key] = (inputs.sqrt(), taps)
        root, self.taps = geometry
        self.add(torch.linalg.vector_norm(x * root), x.shape[0])  # √(Σ_q count(q)·Σ_{b,c} x²)
        self.p_in = math.prod(size)
        self.p_out = math.prod(y.shape[-self.dims :])

    def finish(self) -> list[Tensor]:
        assert self.taps is not None
        per_channel = (self.module.weight.square() * self.taps).flatten(1).sum(1)
        if self.gain is None:
            return [per_channel.sum()]
        g = self.gain.mean()
        return [torch.dot(g, per_channel), g.mean()]

    def scalars(
        self, values: list[float], extra: list[float], weight_sq: float, mean: bool = False
    ) -> tuple[float, list[float]]:
        m = self.module
        gbar = extra[1] if len(extra) > 1 else 1.0
        taps = math.prod(m.kernel_size)
        s_w = gbar * self._mean_square(values) / (m.in_channels * taps)
        if mean:  # positions as samples: a Linear layer from each patch to its output position
            dims = min(m.in_channels * taps, m.out_channels)
            p_out = float(self.p_out)
            return extra[0] / p_out / dims, self._norm_scalars(gbar, s_w / p_out, 1.0)
        dims = min(m.in_channels * self.p_in, m.out_channels * self.p_out)
        return extra[0] / dims, self._norm_scalars(gbar, s_w, float(self.p_out))


def conv_counts(conv: nn.Module, size: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    """For `conv` (Conv1d/Conv2d) on inputs of spatial `size`: how many (output position, tap)
    pairs read each input position, and at how many output positions each kernel tap reads a
    real input position — the gradients, with respect to the input and the kernel, of the sum
    of a convolution of ones with a kernel of ones."""
    assert isinstance(conv, nn.Conv1d | nn.Conv2d)
    dtype, device = like.dtype, like.device
    function = F.conv1d if len(size) == 1 else F.conv2d
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'same' with an even kernel: a one-off padded copy
        ones = torch.ones(1, 1, *size, dtype=dtype, device=device, requires_grad=True)
        shape = (1, 1, *conv.kernel_size)
        kernel = torch.ones(shape, dtype=dtype, device=device, requires_grad=True)
        out = function(ones, kernel, None, conv.stride, conv.padding, conv.dilation)
        inputs, taps = torch.autograd.grad(out.sum(), (ones, kernel))
    return inputs[0, 0], taps[0, 0]


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
