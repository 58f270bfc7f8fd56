"""Elementwise activations: their slope `f'(u)`, from the input `u` or the output `y = f(u)`.

Known by type (exact type, so a subclass that changes `forward` is not misread):
`ReLU` (`1[u > 0]`), `Tanh` (`1 − y²`), `Sigmoid` (`y·(1 − y)`), `GELU` (exact:
`Φ(u) + u·φ(u)`; `approximate="tanh"`: the derivative of its tanh formula), `SiLU`
(`σ(u)·(1 + u·(1 − σ(u)))`). Any other module declares its slope with
`backmatching_slope(u) -> Tensor`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["is_activation", "slope"]

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _relu(module: nn.Module, u: Tensor, y: Tensor) -> Tensor:
    return (u > 0).to(u.dtype)


def _tanh(module: nn.Module, u: Tensor, y: Tensor) -> Tensor:
    return y.square().neg_().add_(1.0)


def _sigmoid(module: nn.Module, u: Tensor, y: Tensor) -> Tensor:
    return y.neg().add_(1.0).mul_(y)


def _gelu(module: nn.Module, u: Tensor, y: Tensor) -> Tensor:
    if getattr(module, "approximate", "none") == "tanh":
        u2 = u.square()
        t = torch.tanh(_GELU_K * u * (1.0 + _GELU_C * u2))
        inner = _GELU_K * (1.0 + 3.0 * _GELU_C * u2)
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t.square()) * inner
    cdf = 0.5 * (1.0 + torch.erf(u * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * u.square()) * _INV_SQRT_2PI
    return cdf + u * pdf


def _silu(module: nn.Module, u: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


_SLOPES: dict[type[nn.Module], Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    nn.ReLU: _relu,
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.GELU: _gelu,
    nn.SiLU: _silu,
}


def is_activation(module: nn.Module) -> bool:
    """Whether `slope` knows this module's derivative."""
    return hasattr(module, "backmatching_slope") or type(module) in _SLOPES


def slope(module: nn.Module, u: Tensor, y: Tensor) -> Tensor:
    """`f'(u)` elementwise, for a module that `is_activation`; `y` is the module's output."""
    declared = getattr(module, "backmatching_slope", None)
    if declared is not None:
        return declared(u)
    return _SLOPES[type(module)](module, u, y)
