"""Naive unrolled hypergradients: the reference the reversible method is checked against.

The same training run as `reversible` (same mini-batches, the same quantised momentum
`n/2**16`, w_0 = s·base) in ordinary float64 with the whole T-step graph kept by autograd
(`create_graph=True` on every training gradient), then one backward pass from the validation
loss to the hyperparameters. Memory grows as T × (parameters + activations); it exists to test
and benchmark the reversible method on problems small enough to unroll.
The quantised momentum enters as `γ + (γ_q − γ).detach()`, so its derivative is that of
`sigmoid(logit)` — the same convention as `reversible.reverse`.
"""

from __future__ import annotations

import torch

from optim.hypergrad.problem import Hyperparameters, Problem
from optim.hypergrad.reversible import HypergradResult

__all__ = ["unrolled_hypergradient"]


def unrolled_hypergradient(problem: Problem, hyper: Hyperparameters) -> HypergradResult:
    """∂ val_loss / ∂ hyperparameters by back-propagating through the unrolled run."""
    hyper.check(problem)
    values = hyper.values()
    leaves = hyper.detached()
    for leaf in leaves.fields().values():
        leaf.requires_grad_(True)
    alpha = leaves.log_lr.exp()
    gamma_exact = torch.sigmoid(leaves.logit_momentum)
    gamma = gamma_exact + (torch.from_numpy(values.gamma) - gamma_exact).detach()
    scale = leaves.log_init_scale.exp()
    l2 = leaves.log_l2.exp()
    schedule = problem.batches()
    with torch.enable_grad():
        w = [scale[i] * base for i, base in enumerate(problem.base_params)]
        v = [torch.zeros_like(base) for base in problem.base_params]
        for t in range(problem.steps):
            b = values.block(t, problem.steps)
            idx = schedule.indices(t)
            loss = problem.loss(w, problem.train_x[idx], problem.train_y[idx])
            penalty = sum(0.5 * l2[i] * (p * p).sum() for i, p in enumerate(w))
            g = torch.autograd.grad(loss + penalty, w, create_graph=True)
            v = [gamma[b, i] * v[i] - (1.0 - gamma[b, i]) * g[i] for i in range(len(w))]
            w = [w[i] + alpha[b, i] * v[i] for i in range(len(w))]
        val = problem.val_loss(w)
        grads = torch.autograd.grad(val, list(leaves.fields().values()))
    return HypergradResult(val_loss=float(val.detach()), grad=Hyperparameters(*grads))
