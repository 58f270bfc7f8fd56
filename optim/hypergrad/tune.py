"""Meta-optimisation: hyperparameters learned by gradient descent on the validation loss.

Each meta-iteration trains once reversibly, reverses to get the hypergradient
(`reversible.hypergradient`) and takes one Adam step (Kingma, Ba 2014, arXiv 1412.6980) on the
learned unconstrained hyperparameters (log rates, logit momenta, log init scales, log L2).
Maclaurin, Duvenaud, Adams 2015 (arXiv 1502.03492) use SGD with momentum on the
hyperparameters; we use Adam because hypergradients of different blocks and tensors differ
by orders of magnitude, and Adam's step is about `meta_lr` in log/logit units whatever their
size. The training seed (initial weights and mini-batches) is the same at every
meta-iteration, as in the paper, so the objective is deterministic.

Divergence is a result, not an error: a run that leaves the fixed-point range or returns a
non-finite loss or hypergradient is reported with `val_loss = inf`, `diverged = True`; the
hyperparameters then return to the best ones so far and the meta step is halved (before any
run has succeeded, the learning rates are halved instead).

Every meta-iteration is reported to `callback(MetaIteration)` as plain floats, so that a caller
can record it as an Optuna trial (`MetaIteration.params()` flattens it to `{name: float}`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from optim.hypergrad.mlp import mlp_base_params, mlp_loss, mlp_param_names
from optim.hypergrad.problem import Hyperparameters, Problem
from optim.hypergrad.reversible import TrainingDivergedError, hypergradient

__all__ = ["KINDS", "MetaIteration", "TuneResult", "tune", "tune_problem"]

logger = logging.getLogger(__name__)

KINDS = ("lr", "momentum", "init_scale", "l2")


@dataclass(frozen=True)
class MetaIteration:
    """One meta-iteration: the hyperparameters it trained with and what it measured.

    `lr` and `momentum` are [block][tensor]; `init_scale` and `l2` are [tensor];
    `grad_norms` maps each kind to the norm of the hypergradient with respect to its
    unconstrained form (empty when the run diverged).
    """

    index: int
    val_loss: float
    diverged: bool
    lr: list[list[float]]
    momentum: list[list[float]]
    init_scale: list[float]
    l2: list[float]
    grad_norms: dict[str, float]
    seconds: float
    tensor_names: tuple[str, ...] = field(default=())

    def params(self) -> dict[str, float]:
        """Flat `{"lr/b00/layer1.weight": 0.1, …, "l2/layer1.bias": 0.0}` for trial records."""
        names = self.tensor_names or tuple(f"t{i}" for i in range(len(self.init_scale)))
        flat: dict[str, float] = {}
        for kind, table in (("lr", self.lr), ("momentum", self.momentum)):
            for b, row in enumerate(table):
                flat.update({f"{kind}/b{b:02d}/{n}": v for n, v in zip(names, row, strict=True)})
        flat.update({f"init_scale/{n}": v for n, v in zip(names, self.init_scale, strict=True)})
        flat.update({f"l2/{n}": v for n, v in zip(names, self.l2, strict=True)})
        return flat


@dataclass(frozen=True)
class TuneResult:
    """The best meta-iteration, every meta-iteration, and the best hyperparameters."""

    best: MetaIteration
    history: list[MetaIteration]
    hyperparameters: Hyperparameters

    @property
    def schedule(self) -> dict[str, list[float]]:
        """The best learning-rate schedule: tensor name → rate per block."""
        names = self.best.tensor_names
        return {n: [row[i] for row in self.best.lr] for i, n in enumerate(names)}


def _snapshot(
    index: int,
    hyper: Hyperparameters,
    val_loss: float,
    grad: Hyperparameters | None,
    seconds: float,
    names: tuple[str, ...],
) -> MetaIteration:
    v = hyper.values()
    norms = {} if grad is None else {k: float(t.norm()) for k, t in grad.fields().items()}
    return MetaIteration(
        index=index,
        val_loss=val_loss,
        diverged=grad is None,
        lr=v.alpha.tolist(),
        momentum=v.gamma.tolist(),
        init_scale=v.init_scale.tolist(),
        l2=v.l2.tolist(),
        grad_norms=norms,
        seconds=seconds,
        tensor_names=names,
    )


def tune_problem(
    problem: Problem,
    initial: Hyperparameters,
    *,
    meta_iterations: int,
    meta_lr: float = 0.05,
    learn: Sequence[str] = ("lr",),
    callback: Callable[[MetaIteration], None] | None = None,
    tensor_names: Sequence[str] = (),
) -> TuneResult:
    """Run `meta_iterations` × (train → reverse → hypergradient → Adam step) on `problem`."""
    if meta_iterations < 1:
        raise ValueError(f"meta_iterations: must be >= 1, got {meta_iterations}")
    if not meta_lr > 0:
        raise ValueError(f"meta_lr: must be > 0, got {meta_lr}")
    unknown = sorted(set(learn) - set(KINDS))
    if unknown or not learn:
        raise ValueError(f"learn: unknown or empty {unknown or list(learn)}; known: {KINDS}")
    initial.check(problem)
    hyper = initial.detached()
    if "l2" in learn and not bool(torch.isfinite(hyper.log_l2).all()):
        raise ValueError("l2: must be > 0 to be learned (it is learned on a log scale)")
    names = tuple(tensor_names) or tuple(f"t{i}" for i in range(len(problem.base_params)))
    learned = [hyper.fields()[k] for k in learn]
    step_size = meta_lr
    optimizer = torch.optim.Adam(learned, lr=step_size)
    history: list[MetaIteration] = []
    best: tuple[float, Hyperparameters] | None = None
    for index in range(meta_iterations):
        started = time.perf_counter()
        try:
            result = hypergradient(problem, hyper)
            grad: Hyperparameters | None = result.grad
            val_loss = result.val_loss
            if not all(bool(torch.isfinite(g).all()) for g in result.grad.fields().values()):
                raise TrainingDivergedError("hypergradient is not finite")
        except TrainingDivergedError as exc:
            logger.info("meta-iteration %d diverged: %s", index, exc)
            grad, val_loss = None, math.inf
        record = _snapshot(index, hyper, val_loss, grad, time.perf_counter() - started, names)
        history.append(record)
        if callback is not None:
            callback(record)
        if grad is not None and (best is None or val_loss < best[0]):
            best = (val_loss, hyper.detached())
        if index == meta_iterations - 1:
            break
        with torch.no_grad():
            if grad is None:
                if best is None:
                    hyper.log_lr -= math.log(2.0)
                else:
                    for k in learn:
                        hyper.fields()[k].copy_(best[1].fields()[k])
                step_size /= 2.0
                optimizer = torch.optim.Adam(learned, lr=step_size)
                continue
            for k, t in zip(learn, learned, strict=True):
                t.grad = grad.fields()[k].to(t.dtype)
        optimizer.step()
    if best is None:
        raise TrainingDivergedError("tune: every meta-iteration diverged; lower the learning rate")
    best_record = min((h for h in history if not h.diverged), key=lambda h: h.val_loss)
    return TuneResult(best=best_record, history=history, hyperparameters=best[1])


def tune(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    layer_sizes: Sequence[int],
    *,
    steps: int = 500,
    batch_size: int = 64,
    meta_iterations: int = 20,
    meta_lr: float = 0.05,
    seed: int = 0,
    blocks: int = 10,
    learn: Sequence[str] = ("lr",),
    lr: float = 0.1,
    momentum: float = 0.9,
    init_scale: float = 1.0,
    l2: float = 0.0,
    callback: Callable[[MetaIteration], None] | None = None,
) -> TuneResult:
    """Learn per-tensor, per-block hyperparameter schedules of a ReLU MLP classifier.

    `layer_sizes` runs from the input width to the number of classes; `steps` is the training
    length T and `blocks` the number of schedule blocks (T // blocks steps each); `lr`,
    `momentum`, `init_scale`, `l2` are the starting values (constant schedules), of which
    those named in `learn` are learned. Returns the best meta-iteration and its
    hyperparameters; `result.schedule` is the learned learning-rate schedule.
    """
    if train_x.shape[-1] != layer_sizes[0] or val_x.shape[-1] != layer_sizes[0]:
        raise ValueError(
            f"layer_sizes: first size {layer_sizes[0]} must equal the input width "
            f"{train_x.shape[-1]}"
        )
    problem = Problem(
        base_params=mlp_base_params(layer_sizes, seed),
        loss=mlp_loss,
        train_x=train_x.to(torch.float64),
        train_y=train_y.long(),
        val_x=val_x.to(torch.float64),
        val_y=val_y.long(),
        steps=steps,
        batch_size=batch_size,
        seed=seed,
    )
    initial = Hyperparameters.constant(
        len(problem.base_params), blocks, lr=lr, momentum=momentum, init_scale=init_scale, l2=l2
    )
    return tune_problem(
        problem,
        initial,
        meta_iterations=meta_iterations,
        meta_lr=meta_lr,
        learn=learn,
        callback=callback,
        tensor_names=mlp_param_names(layer_sizes),
    )
