"""What a trial reports (`Reporter`), records per epoch (`EpochRecord`) and returns
(`TrialResult`), and the rules every training loop applies to it: the device, the objective a
task can report, divergence's value. Its configuration, `worker.runner.TrialConfig`, lives with
`run_trial`, which it runs.

`worker.training` trains trials by these definitions (one loop for one model and for a
cohort). Plain data: a result pickles back from a Ray task.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from worker.tasks import TaskData

if TYPE_CHECKING:
    from worker.runner import TrialConfig

__all__ = [
    "CHECK_EVERY",
    "EpochRecord",
    "Outcome",
    "Reporter",
    "TrialResult",
    "cast_data",
    "check_objective",
    "diverged_value",
    "epoch_objective",
    "resolve_device",
    "trial_objective",
]

CHECK_EVERY = 32
Outcome = Literal["complete", "pruned", "diverged"]


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
    val_accuracy: float | None  # None for a regression task
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


def diverged_value(metric: str, chance_loss: float, divergence_factor: float) -> float:
    """The objective recorded for a diverged trial: the worst value of the metric (0 for
    accuracy; for a loss the divergence bound, `divergence_factor × chance_loss`)."""
    if metric == "val_accuracy":
        return 0.0
    return divergence_factor * chance_loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_objective(config: TrialConfig, data: TaskData) -> None:
    """ValueError unless the task reports the config's objective (a regression has no
    accuracy); the spec checks refuse such a study, this catches a config made by hand."""
    if config.objective not in data.loss.metrics:
        raise ValueError(
            f"objective: {config.task} is a {data.loss.kind} task ({data.loss.name}); its "
            f"metrics: {', '.join(data.loss.metrics)}"
        )


def cast_data(data: TaskData, dtype: torch.dtype) -> TaskData:
    """`data` with its inputs in `dtype` (labels unchanged): a float64 run's copy."""
    return replace(
        data,
        x_train=data.x_train.to(dtype),
        x_val=data.x_val.to(dtype),
        x_test=data.x_test.to(dtype),
    )


def epoch_objective(metric: str, record: EpochRecord) -> float:
    """The value an epoch reports: its validation accuracy or loss, as `metric` says."""
    value = record.val_accuracy if metric == "val_accuracy" else record.val_loss
    assert value is not None, "a regression task reports no accuracy (worker.spec_checks)"
    return value


def trial_objective(
    metric: str,
    divergence_factor: float,
    history: list[EpochRecord],
    outcome: str,
    chance_loss: float,
) -> float:
    """The value a trial reports: its last epoch's metric, or `diverged_value` when it
    diverged or never finished an epoch."""
    if outcome == "diverged" or not history:
        return diverged_value(metric, chance_loss, divergence_factor)
    return epoch_objective(metric, history[-1])
