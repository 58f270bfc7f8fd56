"""What a hypergradient is taken of: the training problem and its hyperparameters.

A `Problem` is a training run given functionally: base parameter tensors, a loss
`loss(params, x, y)` (mean over the batch), training and validation data, the number of steps
`T`, the batch size and the seed of the mini-batch schedule. Training is SGD with momentum
(Maclaurin, Duvenaud, Adams 2015, arXiv 1502.03492, algorithm 1), per parameter tensor `l`:

    w_0 = s_l · base_l,   v_0 = 0
    g_t = ∇ [loss(w_{t-1}, batch_t) + Σ_l λ_l/2 · ||w_l||²]
    v_t = γ_{t,l} · v_{t-1} − (1 − γ_{t,l}) · g_t
    w_t = w_{t-1} + α_{t,l} · v_t

and the meta-objective is `loss(w_T, val_x, val_y)`.

`Hyperparameters` holds them unconstrained, so that any real values are valid: `log_lr` and
`logit_momentum` of shape (blocks, tensors), `log_init_scale` and `log_l2` of shape (tensors,).
Step `t` (0-based) uses block `t · blocks // T`: `blocks = T` gives a per-step schedule,
`blocks = 1` a constant one. `log_l2 = -inf` means no penalty (its gradient is then 0).
The same class carries hypergradients (with respect to these unconstrained values).

Mini-batches: epoch `e` is a permutation of the training set drawn from
`numpy.random.default_rng([seed, e])`; step `t` takes the `t`-th slice of `batch_size` of the
epochs laid end to end (a last partial batch is dropped). Any step's batch can be regenerated
without storing the schedule, which the reversed run needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from optim.hypergrad.fixedpoint import fraction_numerator, fraction_value

__all__ = ["BatchSchedule", "Hyperparameters", "LossFn", "Problem", "StepValues"]

LossFn = Callable[[Sequence[Tensor], Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Problem:
    """A training run whose hyperparameters get hypergradients (float64 throughout)."""

    base_params: tuple[Tensor, ...]
    loss: LossFn
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    steps: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if not 1 <= self.batch_size <= len(self.train_x):
            raise ValueError(
                f"batch_size: must be in [1, {len(self.train_x)}], got {self.batch_size}"
            )
        if not self.base_params:
            raise ValueError("base_params: must hold at least one tensor")
        for i, p in enumerate(self.base_params):
            if p.dtype != torch.float64:
                raise ValueError(f"base_params[{i}]: must be float64, got {p.dtype}")

    def batches(self) -> BatchSchedule:
        return BatchSchedule(len(self.train_x), self.batch_size, self.seed)

    def val_loss(self, params: Sequence[Tensor]) -> Tensor:
        return self.loss(params, self.val_x, self.val_y)


class BatchSchedule:
    """Replayable mini-batch indices: `indices(t)` depends on (seed, t) only."""

    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        self.per_epoch = n_examples // batch_size
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def indices(self, t: int) -> Tensor:
        epoch, k = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_examples)
            self._epoch = epoch
        return torch.from_numpy(self._perm[k * self.batch_size : (k + 1) * self.batch_size])


@dataclass
class Hyperparameters:
    """Unconstrained hyperparameters (or hypergradients with respect to them)."""

    log_lr: Tensor
    logit_momentum: Tensor
    log_init_scale: Tensor
    log_l2: Tensor

    @classmethod
    def constant(
        cls,
        n_tensors: int,
        blocks: int = 1,
        *,
        lr: float | Sequence[float] = 0.1,
        momentum: float | Sequence[float] = 0.9,
        init_scale: float | Sequence[float] = 1.0,
        l2: float | Sequence[float] = 0.0,
    ) -> Hyperparameters:
        """Schedules constant over the blocks; each value is a scalar or one per tensor."""
        if blocks < 1:
            raise ValueError(f"blocks: must be >= 1, got {blocks}")

        def per_tensor(name: str, value: float | Sequence[float], low: float) -> Tensor:
            values = [value] * n_tensors if isinstance(value, int | float) else list(value)
            if len(values) != n_tensors:
                raise ValueError(f"{name}: needs {n_tensors} values, got {len(values)}")
            for v in values:
                if not (low <= v < math.inf) or (name == "momentum" and not v < 1.0):
                    raise ValueError(f"{name}: value {v!r} out of range")
            return torch.tensor(values, dtype=torch.float64)

        lrs = per_tensor("lr", lr, 1e-300)
        moms = per_tensor("momentum", momentum, 1e-300)
        scales = per_tensor("init_scale", init_scale, 1e-300)
        l2s = per_tensor("l2", l2, 0.0)
        return cls(
            log_lr=lrs.log().repeat(blocks, 1),
            logit_momentum=torch.logit(moms).repeat(blocks, 1),
            log_init_scale=scales.log(),
            log_l2=l2s.log(),
        )

    @property
    def blocks(self) -> int:
        return int(self.log_lr.shape[0])

    def fields(self) -> dict[str, Tensor]:
        return {
            "lr": self.log_lr,
            "momentum": self.logit_momentum,
            "init_scale": self.log_init_scale,
            "l2": self.log_l2,
        }

    def detached(self) -> Hyperparameters:
        return Hyperparameters(*(t.detach().clone() for t in self.fields().values()))

    def zeros_like(self) -> Hyperparameters:
        return Hyperparameters(*(torch.zeros_like(t) for t in self.fields().values()))

    def check(self, problem: Problem) -> None:
        n = len(problem.base_params)
        for name, t in self.fields().items():
            if t.shape[-1] != n:
                raise ValueError(f"{name}: last dimension must be {n} (tensors), got {t.shape}")
        if self.logit_momentum.shape != self.log_lr.shape:
            raise ValueError("momentum: schedule shape must equal the lr schedule's")
        if not 1 <= self.blocks <= problem.steps:
            raise ValueError(f"blocks: must be in [1, {problem.steps}], got {self.blocks}")

    def values(self) -> StepValues:
        """Constrained per-block values, computed once so forward and reverse agree bit for bit."""
        gamma = torch.sigmoid(self.logit_momentum.detach()).numpy()
        numer = np.vectorize(fraction_numerator, otypes=[np.int64])(gamma)
        return StepValues(
            alpha=self.log_lr.detach().exp().numpy(),
            numerator=numer,
            gamma=np.vectorize(fraction_value, otypes=[np.float64])(numer),
            gamma_exact=gamma,
            init_scale=self.log_init_scale.detach().exp().numpy(),
            l2=self.log_l2.detach().exp().numpy(),
        )


@dataclass(frozen=True)
class StepValues:
    """Hyperparameters in their own units: per block × tensor (alpha, gamma) or per tensor.

    `gamma` is the momentum actually applied, `numerator / 2**GAMMA_BITS`; `gamma_exact` the
    sigmoid of the logit, used for the chain rule (the quantisation is treated as identity).
    """

    alpha: np.ndarray
    numerator: np.ndarray
    gamma: np.ndarray
    gamma_exact: np.ndarray
    init_scale: np.ndarray
    l2: np.ndarray

    def block(self, t: int, steps: int) -> int:
        return t * self.alpha.shape[0] // steps
