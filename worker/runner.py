"""Train one configuration: `run_trial(config, reporter) -> TrialResult`. No Ray, no database.

The same function runs inside a Ray task (`worker.sweep`), in a benchmark
(`bench/runner_throughput.py`) or by hand on a GPU node. What it does:

- data are loaded once per process onto the device as tensors (`worker.tasks.load_task_data`);
  every step gathers a batch from them by index, so no DataLoader or host-to-device copy runs
  inside the loop;
- `torch.manual_seed(config.seed)` before the model is built and a generator seeded with it
  for the batch order make a trial deterministic on CPU (same config → same history);
- an epoch is a pass over the training split in a fresh random order, dropping the last
  incomplete batch (every step sees a full batch; BatchNorm never sees a batch of one), or
  `steps_per_epoch` steps when that is set (the order continues across epoch boundaries);
- after every epoch: mean train loss, validation loss and accuracy (eval mode), cumulative wall
  time, training examples per second of that epoch (evaluation excluded), and for layer-wise
  schemes the optimizer's `layer_factors()`;
- divergence: the trial ends as *diverged* when the loss is NaN/inf or above
  `divergence_factor · ln(n_classes)` (chance-level cross-entropy times the factor). The last
  batch loss is checked every `CHECK_EVERY` steps (reading it synchronises a GPU, so not every
  step), the epoch's mean train loss and the validation loss after every epoch. A diverged
  trial's objective is `diverged_value(...)`: 0 for accuracy, the bound for losses — the worst
  value a finished trial can report, so it plots at its rate and never wins;
- after every epoch the objective goes to `reporter.report(epoch, value)`; True means prune.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import optim
from worker.spec import DataOptions, ModelOptions
from worker.tasks import TaskData, build_model, get_task, load_task_data

__all__ = [
    "CHECK_EVERY",
    "EpochRecord",
    "Reporter",
    "TrialConfig",
    "TrialResult",
    "cast_data",
    "diverged_value",
    "resolve_device",
    "run_trial",
    "trial_objective",
]

CHECK_EVERY = 32
Outcome = Literal["complete", "pruned", "diverged"]


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs; plain data, so it pickles into a Ray task.

    `data` and `model` are the spec's validated options (the arm's effective model), so their
    defaults live in `worker.spec` alone; a dict given by hand (a benchmark, a test) is
    validated into them here, once.
    """

    task: str
    scheme: str
    hyperparameters: dict[str, Any]
    epochs: int
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available
    objective: str = "val_accuracy"  # or "val_loss"
    divergence_factor: float = 10.0
    evaluate_test: bool = False  # final seeds only: the objective never sees the test split
    dtype: Literal["float32", "float64"] = "float32"  # float64: exactness checks (worker.cohort)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataOptions.model_validate(self.data))
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelOptions.model_validate(self.model))

    def run(self, reporter: Reporter | None = None) -> TrialResult:
        """`run_trial(self, reporter)`: a trial is the work of a Ray task (`worker.remote`)."""
        return run_trial(self, reporter)


class Reporter(Protocol):
    """Receives the objective after every epoch; returning True stops the trial as pruned."""

    def report(self, epoch: int, value: float) -> bool: ...


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    step: int  # optimizer steps done by the end of this epoch
    train_loss: float
    val_loss: float
    val_accuracy: float
    wall_time: float  # seconds since training started (training and evaluation)
    examples_per_sec: float  # training examples per second in this epoch

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite numbers become None."""
        return {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class TrialResult:
    outcome: Outcome
    value: float  # the objective: last epoch's, or diverged_value() for a diverged trial
    history: list[EpochRecord]
    steps: int
    wall_time: float  # seconds of training and evaluation
    n_parameters: int
    device: str
    layer_factors: dict[str, list[Any]] | None = None  # {"names": [...], "values": [[...]]}
    test_loss: float | None = None
    test_accuracy: float | None = None
    diverged_at_step: int | None = None
    setup_time: float = 0.0  # seconds loading data and building the model

    def user_attrs(self) -> dict[str, Any]:
        """The Optuna user attributes that record this result (JSON-safe)."""
        attrs: dict[str, Any] = {
            "outcome": self.outcome,
            "history": [r.to_dict() for r in self.history],
            "steps": self.steps,
            "wall_time": round(self.wall_time, 4),
            "setup_time": round(self.setup_time, 4),
            "n_parameters": self.n_parameters,
            "device": self.device,
        }
        optional = {
            "layer_factors": self.layer_factors,
            "test_loss": _finite(self.test_loss) if self.test_loss is not None else None,
            "test_accuracy": self.test_accuracy,
            "diverged_at_step": self.diverged_at_step,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        return attrs


def diverged_value(metric: str, n_classes: int, divergence_factor: float) -> float:
    """The objective recorded for a diverged trial: the worst value of the metric."""
    if metric == "val_accuracy":
        return 0.0
    return divergence_factor * math.log(n_classes)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index batches over endless random permutations of range(n), full batches only."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=x.dtype)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(y), 4096):
        logits = model(x[start : start + 4096])
        target = y[start : start + 4096]
        loss += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    model.train()
    return loss.item() / len(y), correct.item() / len(y)


def _round(value: float) -> float:
    return float(f"{value:.4g}")


class _LayerFactors:
    """Per-epoch layer factors of a layer-wise optimizer, stored compactly."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.names: list[str] = []
        self.values: list[list[float | None]] = []

    def record(self) -> None:
        factors = {k: float(v) for k, v in self.optimizer.layer_factors().items()}  # type: ignore[attr-defined]
        if not self.names:
            self.names = list(factors)
        self.values.append(
            [
                _round(v) if math.isfinite(v) else None
                for v in (factors.get(n, math.nan) for n in self.names)
            ]
        )

    def to_dict(self) -> dict[str, list[Any]]:
        return {"names": self.names, "values": self.values}


def cast_data(data: TaskData, dtype: torch.dtype) -> TaskData:
    """`data` with its inputs in `dtype` (labels unchanged): a float64 run's copy."""
    return replace(
        data,
        x_train=data.x_train.to(dtype),
        x_val=data.x_val.to(dtype),
        x_test=data.x_test.to(dtype),
    )


def _build(config: TrialConfig, data: TaskData, device: torch.device) -> nn.Module:
    task, options = get_task(config.task), config.model
    model = build_model(
        task.model.name,
        task.input_shape(config.data.model_dump()),
        data.n_classes,
        width=options.width,
        depth=options.depth,
        activation=options.activation,
        transformed=options.transformed,
    )
    return model.to(device)


def run_trial(config: TrialConfig, reporter: Reporter | None = None) -> TrialResult:
    """Train `config` for its epochs; see the module docstring for what is measured."""
    setup_start = time.perf_counter()
    device = resolve_device(config.device)
    data = load_task_data(config.task, config.data.model_dump(), device)
    batch_size = config.data.batch_size
    n_train = len(data.y_train)
    if batch_size > n_train:
        raise ValueError(f"data.batch_size: {batch_size} exceeds the {n_train} training examples")
    dtype = getattr(torch, config.dtype)
    if dtype != data.x_train.dtype:
        data = cast_data(data, dtype)
    torch.manual_seed(config.seed)
    model = _build(config, data, device).to(dtype)
    optimizer = optim.build(config.scheme, model, **config.hyperparameters)
    factors = _LayerFactors(optimizer) if optim.SCHEMES[config.scheme].layerwise else None
    transform_every = config.model.transform_every
    transform: Callable[[nn.Module], None] | None = None
    if config.model.transformed:
        from optim.transformed import update_transformations as transform

    bound = config.divergence_factor * math.log(data.n_classes)
    started = time.perf_counter()  # training time: data loading and model building excluded
    steps_per_epoch = config.steps_per_epoch or n_train // batch_size
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(n_train, batch_size, generator, device)
    history: list[EpochRecord] = []
    step, outcome, diverged_at = 0, "complete", None
    model.train()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=dtype)
        for i in range(steps_per_epoch):
            index = next(batches)
            loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach()
            if transform is not None and step % transform_every == 0:
                transform(model)
            if (i + 1) % CHECK_EVERY == 0:
                last = loss.item()
                if not math.isfinite(last) or last > bound:
                    outcome, diverged_at = "diverged", step
                    break
        train_loss = loss_sum.item() / max(1, i + 1)
        train_time = time.perf_counter() - epoch_start
        if outcome == "diverged" or not math.isfinite(train_loss) or train_loss > bound:
            outcome, diverged_at = "diverged", diverged_at or step
            break
        val_loss, val_accuracy = _evaluate(model, data.x_val, data.y_val)
        if not math.isfinite(val_loss):
            outcome, diverged_at = "diverged", step
            break
        record = EpochRecord(
            epoch,
            step,
            train_loss,
            val_loss,
            val_accuracy,
            time.perf_counter() - started,
            steps_per_epoch * batch_size / max(train_time, 1e-9),
        )
        history.append(record)
        if factors is not None:
            factors.record()
        value = val_accuracy if config.objective == "val_accuracy" else val_loss
        if reporter is not None and reporter.report(epoch, value):
            outcome = "pruned"
            break

    result = TrialResult(
        outcome=outcome,  # type: ignore[arg-type]
        value=trial_objective(
            config.objective, config.divergence_factor, history, outcome, data.n_classes
        ),
        history=history,
        steps=step,
        wall_time=time.perf_counter() - started,
        setup_time=started - setup_start,
        n_parameters=sum(p.numel() for p in model.parameters()),
        device=str(device),
        layer_factors=factors.to_dict() if factors is not None else None,
        diverged_at_step=diverged_at,
    )
    if config.evaluate_test and outcome == "complete":
        result.test_loss, result.test_accuracy = _evaluate(model, data.x_test, data.y_test)
    return result


def trial_objective(
    metric: str,
    divergence_factor: float,
    history: list[EpochRecord],
    outcome: str,
    n_classes: int,
) -> float:
    """The value a trial reports: its last epoch's metric, or `diverged_value` when it
    diverged or never finished an epoch."""
    if outcome == "diverged" or not history:
        return diverged_value(metric, n_classes, divergence_factor)
    last = history[-1]
    return last.val_accuracy if metric == "val_accuracy" else last.val_loss
