"""Exactly reversible SGD with momentum and the hypergradient computed on the way back.

Maclaurin, Duvenaud, Adams 2015, "Gradient-based Hyperparameter Optimization through
Reversible Learning" (arXiv 1502.03492), algorithms 1 and 2. `train_forward` runs the steps of
`problem.Problem` with weights and velocities in exact fixed point (`fixedpoint.FixedArray`);
`reverse` runs them backwards, restoring every `(w_{t-1}, v_{t-1})` from `(w_t, v_t)`:

    w_{t-1} = w_t − α_t·v_t,   g_t = ∇L(w_{t-1}),   v_{t-1} = (v_t + (1 − γ_t)·g_t) / γ_t

and, as it goes, back-propagates the validation loss f(w_T) (float64; per tensor l):

    dα_t   = ⟨dw, v_t⟩                     dv ← dv + α_t·dw
    dγ_t   = ⟨dv, v_{t-1} + g_t⟩          dw ← dw − ∇²L(w_{t-1})·u − λ⊙u,  u = (1 − γ_t)⊙dv
    dλ    −= ⟨u, w_{t-1}⟩                 dv ← γ_t⊙dv

(⊙: per tensor; with per-tensor γ the factor (1 − γ) must scale dv before the Hessian product,
not after, as the paper's scalar-γ algorithm 2 may write it), finishing with dw = ∂f/∂w_0, so
`d s_l = ⟨dw_l, base_l⟩`. Hessian-vector products are double backward through `torch.autograd`.
Memory: the fixed-point state, the buffer (log2(1/γ) bits per parameter per step) and one
step's autograd graph — nothing proportional to T × parameters.

Choices where the paper is silent:
- The gradient in the reversed step is recomputed with `create_graph=True` (for the HVP); its
  value is bit-identical to the forward's, which the exact-reversal test checks.
- The hypergradient is that of the real-valued dynamics evaluated on the exact fixed-point
  trajectory, with the quantised momentum `n/2**16` in the dynamics and the chain rule through
  the unquantised `sigmoid(logit)` (quantisation treated as identity).
- Per-block hypergradients are sums of the per-step ones over the block's steps.
- A run whose weights leave the fixed-point range or whose gradient is not finite raises
  `TrainingDivergedError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from optim.hypergrad.fixedpoint import FixedArray, InfoBuffer
from optim.hypergrad.problem import Hyperparameters, Problem, StepValues

__all__ = [
    "HypergradResult",
    "TrainState",
    "TrainingDivergedError",
    "evaluate",
    "hypergradient",
    "init_state",
    "reverse",
    "train_forward",
    "validation_gradient",
]


class TrainingDivergedError(ArithmeticError):
    """The run left the fixed-point range or produced a non-finite gradient."""


@dataclass
class TrainState:
    """Everything a reversible run holds: weights, velocities, their buffers, the step."""

    weights: list[FixedArray]
    velocities: list[FixedArray]
    buffers: list[InfoBuffer]
    shapes: list[torch.Size]
    step: int = 0

    def weight_tensors(self, requires_grad: bool = False) -> list[Tensor]:
        return [
            torch.from_numpy(w.to_float()).view(shape).requires_grad_(requires_grad)
            for w, shape in zip(self.weights, self.shapes, strict=True)
        ]

    def velocity_arrays(self) -> list[np.ndarray]:
        return [v.to_float() for v in self.velocities]

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part: fixed-point weights and velocities, buffer heads and words."""
        return {
            "weights": sum(int(w.ints.nbytes) for w in self.weights),
            "velocities": sum(int(v.ints.nbytes) for v in self.velocities),
            "buffer_heads": sum(int(b.head.nbytes) for b in self.buffers),
            "buffer_words": sum(4 * b.words for b in self.buffers),
        }

    def info_bits(self) -> float:
        return sum(b.info_bits() for b in self.buffers)


@dataclass
class HypergradResult:
    """Validation loss at w_T and its gradient with respect to the hyperparameters."""

    val_loss: float
    grad: Hyperparameters
    grad_w0: list[Tensor] = field(default_factory=list)
    info_bits: float = 0.0


def init_state(problem: Problem, values: StepValues) -> TrainState:
    """w_0 = s_l · base_l on the fixed-point grid, v_0 = 0, empty buffers."""
    weights, velocities, buffers, shapes = [], [], [], []
    for i, base in enumerate(problem.base_params):
        try:
            weights.append(FixedArray.from_float(float(values.init_scale[i]) * base))
        except OverflowError as exc:
            raise TrainingDivergedError(f"initial weights of tensor {i}: {exc}") from exc
        velocities.append(FixedArray(np.zeros(base.numel(), dtype=np.int64)))
        buffers.append(InfoBuffer(base.numel()))
        shapes.append(base.shape)
    return TrainState(weights, velocities, buffers, shapes)


def _train_grad(
    problem: Problem, w: list[Tensor], t: int, idx: Tensor, l2: np.ndarray, create_graph: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """Step t's loss gradient: (raw, with a graph when asked; flat total including L2)."""
    with torch.enable_grad():
        loss = problem.loss(w, problem.train_x[idx], problem.train_y[idx])
        raw = list(torch.autograd.grad(loss, w, create_graph=create_graph))
    total = [
        (r.detach() + float(l2[i]) * p.detach()).reshape(-1)
        for i, (r, p) in enumerate(zip(raw, w, strict=True))
    ]
    for i, g in enumerate(total):
        if not bool(torch.isfinite(g).all()):
            raise TrainingDivergedError(f"step {t}: gradient of tensor {i} is not finite")
    return raw, total


def train_forward(problem: Problem, values: StepValues, state: TrainState, stop: int) -> None:
    """Run steps `state.step … stop − 1` in exact fixed point (algorithm 1)."""
    schedule = problem.batches()
    try:
        for t in range(state.step, stop):
            b = values.block(t, problem.steps)
            w = state.weight_tensors(requires_grad=True)
            _, g = _train_grad(problem, w, t, schedule.indices(t), values.l2, False)
            for i, (W, V, buf) in enumerate(
                zip(state.weights, state.velocities, state.buffers, strict=True)
            ):
                V.mul_fraction(int(values.numerator[b, i]), buf)
                V.sub((1.0 - float(values.gamma[b, i])) * g[i].numpy())
                W.add(float(values.alpha[b, i]) * V.to_float())
            state.step = t + 1
    except OverflowError as exc:
        raise TrainingDivergedError(f"step {state.step}: {exc}") from exc


def reverse(
    problem: Problem, values: StepValues, state: TrainState, dw: list[Tensor]
) -> tuple[Hyperparameters, list[Tensor]]:
    """Run `state` back to step 0, back-propagating `dw = ∂f/∂w_T`.

    Returns the hypergradient (unconstrained coordinates) and ∂f/∂w_0.
    """
    blocks, n = values.alpha.shape
    d_alpha = np.zeros((blocks, n))
    d_gamma = np.zeros((blocks, n))
    d_l2 = np.zeros(n)
    dw = [d.detach().reshape(-1).clone() for d in dw]
    dv = [torch.zeros_like(d) for d in dw]
    schedule = problem.batches()
    for t in range(state.step - 1, -1, -1):
        b = values.block(t, problem.steps)
        v_t = state.velocity_arrays()
        for i, W in enumerate(state.weights):
            alpha = float(values.alpha[b, i])
            d_alpha[b, i] += float(dw[i] @ torch.from_numpy(v_t[i]))
            W.sub(alpha * v_t[i])
            dv[i] += alpha * dw[i]
        w = state.weight_tensors(requires_grad=True)
        raw, g = _train_grad(problem, w, t, schedule.indices(t), values.l2, True)
        for i, (V, buf) in enumerate(zip(state.velocities, state.buffers, strict=True)):
            V.add((1.0 - float(values.gamma[b, i])) * g[i].numpy())
            V.div_fraction(int(values.numerator[b, i]), buf)
        v_prev = state.velocity_arrays()
        # adjoint of v_t = γ⊙v − (1−γ)⊙g(w): scale by (1−γ) per tensor *before* the HVP
        scaled = [(1.0 - float(values.gamma[b, i])) * dv[i] for i in range(n)]
        hvp = _hvp(raw, w, scaled)
        for i in range(n):
            d_gamma[b, i] += float(dv[i] @ (torch.from_numpy(v_prev[i]) + g[i]))
            d_l2[i] -= float(scaled[i] @ w[i].detach().reshape(-1))
            dw[i] -= hvp[i] + float(values.l2[i]) * scaled[i]
            dv[i] *= float(values.gamma[b, i])
        state.step = t
    d_scale = np.array(
        [float(dw[i] @ base.reshape(-1)) for i, base in enumerate(problem.base_params)]
    )
    gamma_exact = values.gamma_exact
    grad = Hyperparameters(
        log_lr=torch.from_numpy(d_alpha * values.alpha),
        logit_momentum=torch.from_numpy(d_gamma * gamma_exact * (1.0 - gamma_exact)),
        log_init_scale=torch.from_numpy(d_scale * values.init_scale),
        log_l2=torch.from_numpy(d_l2 * values.l2),
    )
    grad_w0 = [d.view(base.shape) for d, base in zip(dw, problem.base_params, strict=True)]
    return grad, grad_w0


def _hvp(raw: list[Tensor], w: list[Tensor], dv: list[Tensor]) -> list[Tensor]:
    """∇²L · dv by double backward (terms of a gradient that is constant in w are zero)."""
    pairs = [(r, d.view(r.shape)) for r, d in zip(raw, dv, strict=True) if r.requires_grad]
    out: list[Tensor] = [torch.zeros_like(p).reshape(-1) for p in w]
    if pairs:
        grads = torch.autograd.grad(
            [r for r, _ in pairs], w, [d for _, d in pairs], allow_unused=True
        )
        out = [o if g is None else g.reshape(-1) for o, g in zip(out, grads, strict=True)]
    return out


def validation_gradient(problem: Problem, state: TrainState) -> tuple[float, list[Tensor]]:
    """f(w) = validation loss at the state's weights, and ∂f/∂w (where `reverse` starts)."""
    w = state.weight_tensors(requires_grad=True)
    with torch.enable_grad():
        loss = problem.val_loss(w)
        dw = list(torch.autograd.grad(loss, w))
    return float(loss.detach()), dw


def evaluate(problem: Problem, hyper: Hyperparameters) -> float:
    """Validation loss after training with `hyper` (forward only); raises TrainingDivergedError."""
    hyper.check(problem)
    values = hyper.values()
    state = init_state(problem, values)
    train_forward(problem, values, state, problem.steps)
    with torch.no_grad():
        return float(problem.val_loss(state.weight_tensors()))


def hypergradient(problem: Problem, hyper: Hyperparameters) -> HypergradResult:
    """Train reversibly, then reverse to get ∂ val_loss / ∂ hyperparameters."""
    hyper.check(problem)
    values = hyper.values()
    state = init_state(problem, values)
    train_forward(problem, values, state, problem.steps)
    val_loss, dw = validation_gradient(problem, state)
    if not np.isfinite(val_loss):
        raise TrainingDivergedError(f"validation loss is {val_loss}")
    bits = state.info_bits()
    grad, grad_w0 = reverse(problem, values, state, dw)
    return HypergradResult(val_loss=val_loss, grad=grad, grad_w0=grad_w0, info_bits=bits)
