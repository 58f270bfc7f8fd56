"""Transformed tanh nonlinearities with linear shortcut connections.

Raiko, Valpola, LeCun 2012 ("Deep learning made easier by linear transformations in
perceptrons", AISTATS, PMLR 22:924-932) and Vatanen, Raiko, Valpola, LeCun 2013 ("Pushing
stochastic gradient towards second-order methods", arXiv 1301.3476) reparameterise the network
instead of the optimizer. A block computes

    y = A·f(B·x + b) + C·x + d,        f_i(u) = γ_i·(tanh(u) + α_i·u + β_i)

and the transformation parameters are re-estimated from the training data every few steps:

    α_i = −E[tanh'(u_i)]                  (zero mean slope: the linear part goes to C)
    β_i = −E[tanh(u_i) + α_i·u_i]          (zero mean output: the constant part goes to d)
    γ_i = 1 / sqrt(Var[tanh(u_i) + α_i·u_i] + eps)   (unit output scale; optional, off by default)

so that each hidden unit models only what the linear shortcut cannot. The papers show this makes
the Fisher information closer to diagonal, so plain SGD behaves more like a second-order method.
Vatanen et al. report that the third transformation (γ) speeds learning but can end in worse
local optima, hence the switch.

Each change (α, β, γ) → (α', β', γ') is compensated so that the block computes the same
function (derivation: write h_i = γ_i(t_i + α_i u_i + β_i), t = tanh(u), u = B·x + b):

    A' = A·diag(γ/γ')
    C' = C + A·diag(γ⊙(α − α'))·B
    d' = d + A·(γ⊙((α − α')⊙b + β − β'))

Choices where the papers are silent or where we differ:
- Statistics are exponential running averages (like BatchNorm, `momentum` = weight of the newest
  batch) of five per-unit moments of the activation's input u, collected in train mode on every
  forward: E[t], E[u], E[t²], E[t·u], E[u²]. They do not depend on α, β, γ, so they survive an
  update, and they give α (tanh' = 1 − t²), β and Var[t + α·u] in closed form. The first batch
  seen initialises them.
- `eps` floors the variance, so γ ≤ 1/sqrt(eps). Units that work in tanh's linear range have
  Var[t + α·u] ≈ 0 (α ≈ −1); with eps = 1e-5 such units got γ ≈ 300, which multiplies the
  effective rate of their input weights by γ², and SGD at a rate that trains the untransformed
  network diverged on our two-moons test. The default 1e-3 caps γ at about 32.
- The update runs only when the training loop asks for it (`update_transformations(model)` or
  `TransformationScheduler(model, every=k).step()`).
- The compensation is computed in float64 and written back in the parameters' dtype.
- `d` is the shortcut's bias; `A` has no bias. `C` and `d` start at zero, so before the first
  update a block is the plain `A·tanh(B·x + b)`; the shortcut learns the linear part.
- Deep networks: `transformed_mlp(n_in, [h_1, ..., h_L], n_out)` chains L blocks whose
  input/output widths run n_in, h_1, ..., h_{L−1}, n_out and whose hidden widths are h_1..h_L;
  each shortcut skips one tanh layer. With one hidden layer this is exactly the papers' network.
- Optimizer state (e.g. SGD momentum) is not transformed with the parameters.

For the back-matching optimizer a block declares its two parallel paths
(`backmatching_paths()`: the nonlinear `Sequential(B, f, A)` and the shortcut `Linear`), and the
activation declares its slope (`backmatching_slope(u) = γ·(1 − tanh(u)² + α)`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

__all__ = [
    "TransformationScheduler",
    "TransformedBlock",
    "TransformedTanh",
    "tanh_mlp",
    "transformed_mlp",
    "update_transformations",
]

_log = logging.getLogger(__name__)

# Rows of `TransformedTanh.moments`: running means of t, u, t², t·u, u² (t = tanh(u)).
_T, _U, _TT, _TU, _UU = range(5)


class TransformedTanh(nn.Module):
    """Elementwise `f_i(u) = γ_i·(tanh(u) + α_i·u + β_i)` over the last dimension.

    α, β, γ are buffers (saved in `state_dict`, not trained by gradients). In train mode every
    forward folds the batch's moments of u into running averages; `target()` turns them into
    the transformation the statistics call for. The owning `TransformedBlock` applies it, since
    only the block can compensate it.
    """

    alpha: Tensor
    beta: Tensor
    gamma: Tensor
    moments: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        n: int,
        *,
        transform: bool = True,
        scale: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"TransformedTanh: n: must be >= 1, got {n}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"TransformedTanh: momentum: must be in (0, 1], got {momentum}")
        if not eps > 0.0:
            raise ValueError(f"TransformedTanh: eps: must be > 0, got {eps}")
        self.n = n
        self.transform = transform
        self.scale = scale
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("alpha", torch.zeros(n))
        self.register_buffer("beta", torch.zeros(n))
        self.register_buffer("gamma", torch.ones(n))
        self.register_buffer("moments", torch.zeros(5, n))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{self.n}, transform={self.transform}, scale={self.scale}, "
            f"momentum={self.momentum}, eps={self.eps}"
        )

    def forward(self, u: Tensor) -> Tensor:
        t = torch.tanh(u)
        if self.training:
            self._track(u.detach(), t.detach())
        return self.gamma * (t + self.alpha * u + self.beta)

    @torch.no_grad()
    def _track(self, u: Tensor, t: Tensor) -> None:
        u = u.reshape(-1, self.n)
        t = t.reshape(-1, self.n)
        batch = torch.stack([t, u, t * t, t * u, u * u]).mean(dim=1)
        if int(self.num_batches_tracked) == 0:
            self.moments.copy_(batch)
        else:
            self.moments.lerp_(batch, self.momentum)
        self.num_batches_tracked += 1

    def backmatching_slope(self, u: Tensor) -> Tensor:
        """`f'(u) = γ·(1 − tanh(u)² + α)` elementwise, for the back-matching optimizer."""
        t = torch.tanh(u)
        return self.gamma * (1.0 - t * t + self.alpha)

    @torch.no_grad()
    def target(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The (α', β', γ') the running statistics call for (float64), or None without data."""
        if int(self.num_batches_tracked) == 0:
            return None
        m = self.moments.double()
        alpha, beta, gamma = self.alpha.double(), self.beta.double(), self.gamma.double()
        if self.transform:
            alpha = m[_TT] - 1.0  # −E[tanh'(u)] = −(1 − E[t²])
            beta = -(m[_T] + alpha * m[_U])
        if self.scale:
            mean = m[_T] + alpha * m[_U]
            second = m[_TT] + 2.0 * alpha * m[_TU] + alpha * alpha * m[_UU]
            var = (second - mean * mean).clamp_min(0.0)
            gamma = torch.rsqrt(var + self.eps)
        return alpha, beta, gamma


class TransformedBlock(nn.Module):
    """`y = A·f(B·x + b) + C·x + d` with transformed tanh units `f` (see module docstring).

    Submodules: `nonlinear = Sequential(B: Linear(n_in, n_hidden), f: TransformedTanh,
    A: Linear(n_hidden, n_out, bias=False))` and `shortcut = Linear(n_in, n_out)` (weight C,
    bias d, both initialised to zero). `forward(x) = nonlinear(x) + shortcut(x)`, exactly.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_out: int,
        *,
        transform: bool = True,
        scale: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        for name, value in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
            if value < 1:
                raise ValueError(f"TransformedBlock: {name}: must be >= 1, got {value}")
        self.nonlinear = nn.Sequential(
            nn.Linear(n_in, n_hidden),
            TransformedTanh(n_hidden, transform=transform, scale=scale, momentum=momentum, eps=eps),
            nn.Linear(n_hidden, n_out, bias=False),
        )
        self.shortcut = nn.Linear(n_in, n_out)
        nn.init.zeros_(self.shortcut.weight)
        nn.init.zeros_(self.shortcut.bias)

    @property
    def inner(self) -> nn.Linear:
        """B (weight) and b (bias): the hidden units' input map."""
        return cast(nn.Linear, self.nonlinear[0])

    @property
    def activation(self) -> TransformedTanh:
        return cast(TransformedTanh, self.nonlinear[1])

    @property
    def outer(self) -> nn.Linear:
        """A: the hidden units' output map (no bias; the constant term is the shortcut's d)."""
        return cast(nn.Linear, self.nonlinear[2])

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(x) + self.shortcut(x)

    def backmatching_paths(self) -> list[nn.Module]:
        """The block's output is the sum of these paths, each applied to the block's input."""
        return [self.nonlinear, self.shortcut]

    @torch.no_grad()
    def update_transformations(self) -> None:
        """Move α, β, γ to the running statistics' targets and compensate in A, C, d.

        The block's function is unchanged (up to rounding). A no-op before any train-mode
        forward has been seen.
        """
        act = self.activation
        target = act.target()
        if target is None:
            _log.debug("TransformedBlock: no statistics yet, transformation not updated")
            return
        alpha_new, beta_new, gamma_new = target
        alpha, beta, gamma = act.alpha.double(), act.beta.double(), act.gamma.double()
        A = self.outer.weight.double()
        B = self.inner.weight.double()
        b = self.inner.bias.double()
        d_alpha = gamma * (alpha - alpha_new)
        d_beta = gamma * (beta - beta_new)
        C = self.shortcut.weight.double() + (A * d_alpha) @ B
        d = self.shortcut.bias.double() + A @ (d_alpha * b + d_beta)
        self.shortcut.weight.copy_(C)
        self.shortcut.bias.copy_(d)
        self.outer.weight.copy_(A * (gamma / gamma_new))
        act.alpha.copy_(alpha_new)
        act.beta.copy_(beta_new)
        act.gamma.copy_(gamma_new)


def update_transformations(model: nn.Module) -> None:
    """Update the transformations of every `TransformedBlock` inside `model` (any nesting)."""
    for module in model.modules():
        if isinstance(module, TransformedBlock):
            module.update_transformations()


class TransformationScheduler:
    """Calls `update_transformations(model)` on every `every`-th call of `step()`.

    Call `step()` once per optimizer step, after it; the first update happens after `every`
    steps, when the running statistics have seen `every` batches.
    """

    def __init__(self, model: nn.Module, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"TransformationScheduler: every: must be >= 1, got {every}")
        self.model = model
        self.every = every
        self.steps = 0

    def step(self) -> bool:
        """Count one training step; return True when this step updated the transformations."""
        self.steps += 1
        if self.steps % self.every:
            return False
        update_transformations(self.model)
        return True


def _check_sizes(where: str, n_in: int, hidden: Sequence[int], n_out: int) -> list[int]:
    widths = [int(h) for h in hidden]
    if not widths:
        raise ValueError(f"{where}: hidden: needs at least one width, got {list(hidden)}")
    for name, value in [("n_in", n_in), ("n_out", n_out)] + [
        (f"hidden[{i}]", h) for i, h in enumerate(widths)
    ]:
        if value < 1:
            raise ValueError(f"{where}: {name}: must be >= 1, got {value}")
    return widths


def transformed_mlp(
    n_in: int,
    hidden: Sequence[int],
    n_out: int,
    *,
    transform: bool = True,
    scale: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-3,
) -> nn.Sequential:
    """A chain of `TransformedBlock`s with hidden tanh widths `hidden`.

    Block k maps width w_{k−1} to w_k through h_k tanh units, with w = (n_in, h_1, ...,
    h_{L−1}, n_out). `transform=False` keeps the shortcuts but never moves α, β (the papers'
    "shortcuts only" network); `scale=True` turns on the third transformation γ.
    """
    widths = _check_sizes("transformed_mlp", n_in, hidden, n_out)
    ends = [n_in, *widths[:-1], n_out]
    return nn.Sequential(
        *(
            TransformedBlock(
                ends[k],
                h,
                ends[k + 1],
                transform=transform,
                scale=scale,
                momentum=momentum,
                eps=eps,
            )
            for k, h in enumerate(widths)
        )
    )


def tanh_mlp(n_in: int, hidden: Sequence[int], n_out: int) -> nn.Sequential:
    """The plain counterpart: `Linear, Tanh, ..., Linear`, same tanh widths, no shortcuts."""
    widths = _check_sizes("tanh_mlp", n_in, hidden, n_out)
    layers: list[nn.Module] = []
    for w_in, w_out in zip([n_in, *widths[:-1]], widths, strict=True):
        layers += [nn.Linear(w_in, w_out), nn.Tanh()]
    layers.append(nn.Linear(widths[-1], n_out))
    return nn.Sequential(*layers)
