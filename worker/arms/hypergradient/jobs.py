"""The hypergradient tuner's two jobs, as plain functions: no Ray, no database inside.

- `TuneConfig.run(reporter)`: one call of `optim.hypergrad.tune` for an arm (Maclaurin,
  Duvenaud, Adams 2015, arXiv 1502.03492). Each meta-iteration goes to `reporter.report(index,
  record)` as a JSON-safe record (what `worker.arms.hypergradient.arm` stores as an Optuna
  trial); a True answer aborts the tuning (`_StopTuningError`, raised from the callback).
- `ScheduleConfig.run(reporter)`: a learned schedule retrained on one seed, for the final seeds.

Choices:
- Both run on the CPU whatever the spec's device: the reversible trainer is exact fixed-point
  arithmetic in numpy, and the retraining uses the same float64 arithmetic as the tuner's
  gradients, so the schedule is applied to the dynamics it was learned on.
- A seed fixes the initial weights (`optim.hypergrad.mlp_base_params`: Gaussian N(0, 1/fan_in),
  scaled per tensor by `init_scale`) and the mini-batches (`optim.hypergrad.BatchSchedule`).
  The tuner trains on the spec's seed at every meta-iteration; final seed `s` retrains with
  both drawn from `s`. With the tuning seed, the retraining reproduces the tuner's run up to
  fixed-point rounding (a test checks the validation loss agrees).
- Retraining is `optim.hypergrad.problem`'s update, per tensor `l` and block `b` of step `t`:
  `g = ∇loss + λ_l·w`, `v ← γ_bl·v − (1 − γ_bl)·g`, `w ← w + α_bl·v`, in plain PyTorch.
- Divergence, as in `worker.runner`: a loss that is not finite or above
  `divergence_factor · ln(classes)` (for a meta-iteration: its validation loss, or the tuner's
  own verdict; for a retraining: the training loss of any step, or the validation loss).
- A meta-iteration's `lr` is the geometric mean over blocks and tensors of α·(1 − γ): the
  `torch.optim.SGD` rate with momentum γ that makes the same step, so a hypergradient arm's
  rates sit on the same axis as an sgd arm's.
- Resuming: `TuneConfig.skip` meta-iterations are already stored; the tuner is deterministic
  (fixed seed, exact arithmetic), so it reruns them silently and reports from `skip` on.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from optim.hypergrad import (
    BatchSchedule,
    MetaIteration,
    TrainingDivergedError,
    mlp_base_params,
    mlp_forward,
    mlp_param_names,
    tune,
)
from worker.arms.hypergradient.spec import mlp_layer_sizes, mlp_parameter_count
from worker.runner import EpochRecord, Reporter, TrialResult, diverged_value, trial_objective
from worker.spec_options import DataOptions, ModelOptions
from worker.tasks import Task, get_task, load_task_data, require
from worker.trial import epoch_objective

__all__ = [
    "MetaReporter",
    "Schedule",
    "ScheduleConfig",
    "TuneConfig",
    "TuneSummary",
    "mlp_layer_sizes",
    "mlp_parameter_count",
]


class MetaReporter(Protocol):
    """Receives every meta-iteration's record; returning True stops the tuning."""

    def report(self, index: int, record: dict[str, Any]) -> bool: ...


@dataclass(frozen=True)
class Schedule:
    """Hyperparameters in `optim.hypergrad`'s units: α, γ per [block][tensor]; the rest per
    tensor. Trials store it flat, as `MetaIteration.params()` (`from_flat` reads that back)."""

    tensors: tuple[str, ...]
    lr: list[list[float]]
    momentum: list[list[float]]
    init_scale: list[float]
    l2: list[float]

    @classmethod
    def of(cls, it: MetaIteration) -> Schedule:
        return cls(tuple(it.tensor_names), it.lr, it.momentum, it.init_scale, it.l2)

    @classmethod
    def from_flat(cls, flat: dict[str, float], tensors: Sequence[str], blocks: int) -> Schedule:
        def table(kind: str) -> list[list[float]]:
            return [[flat[f"{kind}/b{b:02d}/{n}"] for n in tensors] for b in range(blocks)]

        return cls(
            tuple(tensors),
            table("lr"),
            table("momentum"),
            [flat[f"init_scale/{n}"] for n in tensors],
            [flat[f"l2/{n}"] for n in tensors],
        )

    def sgd_rate(self) -> float | None:
        """Geometric mean of α·(1 − γ), the equivalent torch.optim.SGD rate (None when a rate
        has run off to 0 or infinity)."""
        rates = [
            a * (1.0 - g)
            for row_a, row_g in zip(self.lr, self.momentum, strict=True)
            for a, g in zip(row_a, row_g, strict=True)
        ]
        if not all(0.0 < r < math.inf for r in rates):
            return None
        return math.exp(statistics.fmean(math.log(r) for r in rates))


@dataclass(frozen=True)
class TuneSummary:
    """How a tuning job ended (its meta-iterations went to the reporter one by one)."""

    meta_iterations: int  # run, replayed ones included
    reported: int
    stopped: bool  # the reporter asked to stop
    wall_time: float
    setup_time: float


class _StopTuningError(Exception):
    """Raised from the tuner's callback to abort it when the driver says stop."""


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _stamp(config: Any) -> None:
    """Fill in the task's package and version from this process's registry (the driver's)."""
    if config.task_package is None:
        task = get_task(config.task)
        object.__setattr__(config, "task_package", task.package)
        object.__setattr__(config, "task_version", task.version)


def _sizes(task: Task, data: DataOptions, model: ModelOptions) -> list[int]:
    sizes = mlp_layer_sizes(task, data, model)
    if sizes is None:  # the spec checks refuse such an arm
        raise ValueError(f"{task.name}: the hypergradient tuner needs a plain ReLU MLP")
    return sizes


@dataclass(frozen=True)
class TuneConfig:
    """One arm's hypergradient tuning; plain data, so it pickles into a Ray task."""

    task: str
    data: DataOptions
    model: ModelOptions
    steps: int
    blocks: int
    batch_size: int
    meta_iterations: int
    meta_lr: float
    learn: tuple[str, ...]
    lr: float
    momentum: float
    init_scale: float
    l2: float
    seed: int
    skip: int = 0  # meta-iterations already stored: rerun, not reported
    divergence_factor: float = 10.0
    task_package: str | None = None  # the driver's, filled in where the config is made
    task_version: str | None = None

    def __post_init__(self) -> None:
        _stamp(self)

    def run(self, reporter: MetaReporter) -> TuneSummary:
        setup_start = time.perf_counter()
        task = require(self.task, self.task_package, self.task_version)
        data = load_task_data(task, self.data.model_dump(), "cpu")
        sizes = _sizes(task, self.data, self.model)
        bound = self.divergence_factor * data.chance_loss
        n_parameters = mlp_parameter_count(sizes)
        started = time.perf_counter()
        counts = {"run": 0, "reported": 0}

        def on_meta_iteration(it: MetaIteration) -> None:
            counts["run"] += 1
            if it.index < self.skip:
                return
            record = self._record(it, bound, data.chance_loss, n_parameters)
            counts["reported"] += 1
            if reporter.report(it.index, record):
                raise _StopTuningError

        stopped = False
        try:
            tune(
                data.x_train,
                data.y_train,
                data.x_val,
                data.y_val,
                sizes,
                steps=self.steps,
                batch_size=self.batch_size,
                meta_iterations=self.meta_iterations,
                meta_lr=self.meta_lr,
                seed=self.seed,
                blocks=self.blocks,
                learn=self.learn,
                lr=self.lr,
                momentum=self.momentum,
                init_scale=self.init_scale,
                l2=self.l2,
                callback=on_meta_iteration,
            )
        except TrainingDivergedError:
            pass  # every meta-iteration diverged; each was reported as such
        except _StopTuningError:
            stopped = True
        return TuneSummary(
            counts["run"],
            counts["reported"],
            stopped,
            time.perf_counter() - started,
            started - setup_start,
        )

    def _record(
        self, it: MetaIteration, bound: float, chance_loss: float, n_parameters: int
    ) -> dict[str, Any]:
        """The JSON-safe record of a meta-iteration (see worker.arms.hypergradient.arm)."""
        schedule = Schedule.of(it)
        diverged = it.diverged or not math.isfinite(it.val_loss) or it.val_loss > bound
        value = diverged_value("val_loss", chance_loss, self.divergence_factor)
        speed = self.steps * self.batch_size / max(it.seconds, 1e-9)
        end = EpochRecord(1, self.steps, math.nan, it.val_loss, math.nan, it.seconds, speed)
        return {
            "index": it.index,
            "outcome": "diverged" if diverged else "complete",
            "value": value if diverged else it.val_loss,
            "val_loss": _finite(it.val_loss),
            "lr": schedule.sgd_rate(),
            "schedule": it.params(),
            "grad_norms": it.grad_norms,
            "seconds": it.seconds,
            "history": [end.to_dict()],  # one record: the run's end (no accuracy measured)
            "steps": self.steps,
            "n_parameters": n_parameters,
        }


@dataclass(frozen=True)
class ScheduleConfig:
    """A learned schedule retrained on one seed (a hypergradient arm's final seed)."""

    task: str
    data: DataOptions
    model: ModelOptions
    schedule: dict[str, float]  # flat, as the sweep's trials store it
    steps: int
    blocks: int
    batch_size: int
    seed: int
    objective: str = "val_loss"
    divergence_factor: float = 10.0
    evaluate_test: bool = True
    task_package: str | None = None  # the driver's, filled in where the config is made
    task_version: str | None = None

    def __post_init__(self) -> None:
        _stamp(self)

    def run(self, reporter: Reporter | None = None) -> TrialResult:
        return train_schedule(self, reporter)


@torch.no_grad()
def _evaluate(params: Sequence[Tensor], x: Tensor, y: Tensor) -> tuple[float, float]:
    logits = mlp_forward(params, x)
    loss = float(F.cross_entropy(logits, y))
    return loss, float((logits.argmax(dim=1) == y).double().mean())


def train_schedule(config: ScheduleConfig, reporter: Reporter | None = None) -> TrialResult:
    """Train the MLP with the schedule for `config.steps` steps; one history record a block."""
    setup_start = time.perf_counter()
    task = require(config.task, config.task_package, config.task_version)
    data = load_task_data(task, config.data.model_dump(), "cpu")
    x_train, x_val = data.x_train.double(), data.x_val.double()
    sizes = _sizes(task, config.data, config.model)
    s = Schedule.from_flat(config.schedule, mlp_param_names(sizes), config.blocks)
    w = [
        (scale * base).requires_grad_()
        for scale, base in zip(s.init_scale, mlp_base_params(sizes, config.seed), strict=True)
    ]
    v = [torch.zeros_like(p) for p in w]
    batches = BatchSchedule(len(x_train), config.batch_size, config.seed)
    bound = config.divergence_factor * data.chance_loss
    history: list[EpochRecord] = []
    outcome, diverged_at, loss_sum, block_start = "complete", None, 0.0, 0
    started = time.perf_counter()
    block_clock = started
    for t in range(config.steps):
        b = t * config.blocks // config.steps
        index = batches.indices(t)
        loss = F.cross_entropy(mlp_forward(w, x_train[index]), data.y_train[index])
        grads = torch.autograd.grad(loss, w)
        with torch.no_grad():
            for i, (p, vel, g) in enumerate(zip(w, v, grads, strict=True)):
                gamma = s.momentum[b][i]
                vel.mul_(gamma).sub_((1.0 - gamma) * (g + s.l2[i] * p))
                p.add_(s.lr[b][i] * vel)
        value = loss.detach().item()
        loss_sum += value
        if not math.isfinite(value) or value > bound:
            outcome, diverged_at = "diverged", t + 1
            break
        if (t + 1) * config.blocks // config.steps == b and t + 1 < config.steps:
            continue  # the block goes on
        val_loss, val_accuracy = _evaluate(w, x_val, data.y_val)
        if not math.isfinite(val_loss):
            outcome, diverged_at = "diverged", t + 1
            break
        now = time.perf_counter()
        n_steps = t + 1 - block_start
        speed = n_steps * config.batch_size / max(now - block_clock, 1e-9)
        train_loss = loss_sum / n_steps
        history.append(
            EpochRecord(b + 1, t + 1, train_loss, val_loss, val_accuracy, now - started, speed)
        )
        loss_sum, block_start, block_clock = 0.0, t + 1, now
        if reporter is not None:  # final seeds are not pruned: the answer is moot
            reporter.report(b + 1, epoch_objective(config.objective, history[-1]))
    result = TrialResult(
        outcome=outcome,  # type: ignore[arg-type]
        value=trial_objective(
            config.objective, config.divergence_factor, history, outcome, data.chance_loss
        ),
        history=history,
        steps=diverged_at or config.steps,
        wall_time=time.perf_counter() - started,
        setup_time=started - setup_start,
        n_parameters=sum(p.numel() for p in w),
        device="cpu",
        diverged_at_step=diverged_at,
    )
    if config.evaluate_test and outcome == "complete":
        result.test_loss, result.test_accuracy = _evaluate(w, data.x_test.double(), data.y_test)
    return result
