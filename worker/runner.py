"""Train one configuration: `run_trial(config, reporter) -> TrialResult`. No Ray, no database.

The same function runs inside a Ray task (`worker.sweep`), in a benchmark
(`bench/runner_throughput.py`) or by hand on a GPU node. It is the one training loop
(`worker.training.train`, which says what a trial records: epochs, divergence, pruning,
factors) with one member: a plain `torch.nn.Module` built from the task
(`torch.manual_seed(config.seed)` first, so a trial is deterministic on CPU: same config, same
history) and the scheme's optimizer (`optim.build`). Specific to one model:

- the learning-rate schedule (`config.schedule`, formulas in `optim.schedules`) multiplies the
  scheme's `lr` through `torch.optim.lr_scheduler.LambdaLR`, stepped after every optimizer
  step over the whole budget (`epochs × steps_per_epoch` steps, whether or not the trial is
  stopped early); a constant schedule leaves the optimizer alone;
- a transformed MLP re-estimates its units every `model.transform_every` steps
  (`optim.transformed.update_transformations`);
- the task: a trial names its task's package and version as the driver had them, and a worker
  with another version, or without the package, refuses it (`worker.tasks.require`); an inline
  task of the Python API travels inside the config (`worker.trial.TrialConfig`).

A trial's configuration is `TrialConfig`, here; what it reports and returns (`TrialResult`,
`EpochRecord`, divergence's value) lives in `worker.trial`, which this module re-exports for
the callers of `run_trial`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import optim
from worker.spec_base import given_options
from worker.spec_options import DataOptions, ModelOptions
from worker.spec_schedule import ScheduleSpec
from worker.tasks import Task, get_task, require
from worker.tasks.losses import Loss
from worker.training import Prepared, prepare, train
from worker.trial import (
    CHECK_EVERY,
    EpochRecord,
    Reporter,
    TrialResult,
    check_objective,
    diverged_value,
    resolve_device,
    trial_objective,
)

__all__ = [
    "CHECK_EVERY",
    "EpochRecord",
    "Reporter",
    "TrialConfig",
    "TrialResult",
    "build_model",
    "check_objective",
    "diverged_value",
    "resolve_device",
    "run_trial",
    "trial_objective",
]


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs; plain data, so it pickles into a Ray task.

    `data`, `model` and `schedule` are the spec's validated options (the arm's effective model,
    the trial's schedule with its swept fields), so their defaults live in `worker.spec` alone;
    a dict given by hand (a benchmark, a test) is validated into them here, once.
    `task_package` and `task_version` are filled in from this process's registry where the
    config is made (the driver), unless given; an inline task (registered in this process
    without a package, `ratebench.compare`) is carried as `inline_task`, so that the worker
    needs no registration of its own.
    """

    task: str
    scheme: str
    hyperparameters: dict[str, Any]
    epochs: int
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available
    objective: str = "val_accuracy"  # or "val_loss"
    divergence_factor: float = 10.0
    evaluate_test: bool = False  # final seeds only: the objective never sees the test split
    dtype: Literal["float32", "float64"] = "float32"  # float64: exactness checks (worker.cohort)
    task_package: str | None = None
    task_version: str | None = None
    inline_task: Task | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataOptions.model_validate(self.data))
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelOptions.model_validate(self.model))
        if isinstance(self.schedule, dict | str):
            object.__setattr__(self, "schedule", ScheduleSpec.model_validate(self.schedule))
        if self.task_package is None and self.inline_task is None:
            task = get_task(self.task)
            if task.package is None:
                object.__setattr__(self, "inline_task", task)
            else:
                object.__setattr__(self, "task_package", task.package)
                object.__setattr__(self, "task_version", task.version)

    def resolve_task(self) -> Task:
        """The task to train: the inline one, or this process's, checked against the driver's
        package and version (`TaskMismatchError` otherwise)."""
        if self.inline_task is not None:
            return self.inline_task
        return require(self.task, self.task_package, self.task_version)

    def run(self, reporter: Reporter | None = None) -> TrialResult:
        """`run_trial(self, reporter)`: a trial is the work of a Ray task (`worker.remote`)."""
        return run_trial(self, reporter)


def run_trial(config: TrialConfig, reporter: Reporter | None = None) -> TrialResult:
    """Train `config` for its epochs (`worker.training` says what is measured)."""
    prepared = prepare(config)
    return train([config], [reporter], _OneModel(config, prepared), prepared)[0]


def build_model(config: TrialConfig, device: torch.device) -> nn.Module:
    """The task's model for `config`, on `device` (the caller seeds torch first)."""
    task = config.resolve_task()
    return task.build(config.data.model_dump(), given_options(config.model)).to(device)


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Loss) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for regression) in eval mode."""
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=x.dtype)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(y), 4096):
        total, hits = loss_fn.sums(model(x[start : start + 4096]), y[start : start + 4096])
        loss += total
        if hits is not None:
            correct += hits
    model.train()
    accuracy = correct.item() / len(y) if loss_fn.kind == "classification" else None
    return loss.item() / len(y), accuracy


class _OneModel:
    """The `worker.training.Learner` of one trial: a model and its optimizer."""

    def __init__(self, config: TrialConfig, prepared: Prepared) -> None:
        data = prepared.data
        torch.manual_seed(config.seed)
        self.model = build_model(config, prepared.device).to(prepared.dtype)
        self.optimizer = optim.build(config.scheme, self.model, **config.hyperparameters)
        self.layerwise = optim.SCHEMES[config.scheme].layerwise
        self.n_parameters = sum(p.numel() for p in self.model.parameters())
        self.loss = data.loss
        steps_per_epoch = config.steps_per_epoch or len(data.y_train) // config.data.batch_size
        schedule = config.schedule.resolve(steps_per_epoch, config.epochs)
        self.rates = (
            None
            if schedule.is_constant
            else torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        )
        self.transform: Callable[[nn.Module], None] | None = None
        if config.model.transformed:
            from optim.transformed import update_transformations

            self.transform = update_transformations
        self.transform_every = config.model.transform_every
        self.model.train()

    def step(self, x: Tensor, y: Tensor, batched: bool, step: int) -> Tensor:
        loss = self.loss.mean(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.rates is not None:
            self.rates.step()
        return loss.detach().reshape(1)

    def after_step(self, step: int) -> None:
        if self.transform is not None and step % self.transform_every == 0:
            self.transform(self.model)

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float | None]]:
        loss, accuracy = _evaluate(self.model, x, y, self.loss)
        return [loss], [accuracy]

    def factors(self) -> dict[str, list[float]]:
        if not self.layerwise:
            return {}
        factors = self.optimizer.layer_factors()  # type: ignore[attr-defined]
        return {name: [float(value)] for name, value in factors.items()}

    def keep(self, positions: list[int]) -> None:
        """One member: when it leaves, nothing trains on."""
