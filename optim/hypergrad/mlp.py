"""A functional multilayer perceptron for hypergradient problems.

Parameters are a flat list `[W_1, b_1, W_2, b_2, …]` (W_k of shape (n_out, n_in)); the
network is ReLU between layers, linear at the output, and the loss is mean cross-entropy.
Base initialisation (scaled per tensor by the learned init scale `s_l`): every entry of
W_k and b_k is drawn from N(0, 1/n_in), seeded — like PyTorch's `nn.Linear` default, which
draws both from U(±1/√n_in), but Gaussian as in Maclaurin et al. 2015 (arXiv 1502.03492).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mlp_base_params", "mlp_forward", "mlp_loss", "mlp_param_names"]


def mlp_base_params(layer_sizes: Sequence[int], seed: int = 0) -> tuple[Tensor, ...]:
    """Seeded float64 base parameters `[W_1, b_1, …]` for `layer_sizes` (inputs … classes)."""
    if len(layer_sizes) < 2 or any(n < 1 for n in layer_sizes):
        raise ValueError(f"layer_sizes: need >= 2 positive sizes, got {list(layer_sizes)}")
    gen = torch.Generator().manual_seed(seed)
    params: list[Tensor] = []
    for n_in, n_out in itertools.pairwise(layer_sizes):
        std = n_in**-0.5
        params.append(torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * std)
        params.append(torch.randn(n_out, generator=gen, dtype=torch.float64) * std)
    return tuple(params)


def mlp_param_names(layer_sizes: Sequence[int]) -> list[str]:
    """`["layer1.weight", "layer1.bias", …]`, one name per tensor of `mlp_base_params`."""
    return [f"layer{k}.{kind}" for k in range(1, len(layer_sizes)) for kind in ("weight", "bias")]


def mlp_forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """Logits of the ReLU MLP."""
    h = x
    last = len(params) // 2 - 1
    for k in range(last + 1):
        h = F.linear(h, params[2 * k], params[2 * k + 1])
        if k < last:
            h = torch.relu(h)
    return h


def mlp_loss(params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of the MLP's logits against integer labels `y`."""
    return F.cross_entropy(mlp_forward(params, x), y)
