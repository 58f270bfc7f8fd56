"""The loss and the metrics of each kind of task: what the runner and the cohort train and report.

- `classification`: the mean cross-entropy of class logits `[B, C]` against integer labels
  `[B]`; metrics `val_loss` (that cross-entropy, to minimise) and `val_accuracy` (the fraction
  of argmax hits, to maximise).
- `regression`: the mean squared error of outputs `[B, d]` against float targets `[B, d]`,
  averaged over the batch and the d values; metric `val_loss` (that error, to minimise). There is
  no accuracy: a regression trial's `val_accuracy` and `test_accuracy` are None.

**Chance level and divergence.** A trial diverges when its loss is NaN/inf or above
`divergence_factor × chance_loss` (`worker.runner`). `chance_loss` is the loss of a network that
learned nothing, what a freshly initialised one scores: for classification the cross-entropy of
the uniform prediction, ln(C); for regression the mean squared error of predicting zero, i.e.
the training targets' mean square (averaged over the d values). Both are in the loss's own
units, so one factor means the same thing for either kind: "this many times worse than a network
that has learned nothing". For regression we chose the mean square over the variance (the error
of predicting the targets' mean): an untrained network outputs about zero, not the mean, and
with targets far from zero its first loss is already many times their variance (Friedman's
regression in examples/plugins: mean 14.5, variance 25.3, mean square 234), so a bound on the
variance would call most trials diverged at their first check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from worker.tasks.contract import Kind

__all__ = ["LOSSES", "Loss", "loss_of", "metrics_of"]


@dataclass(frozen=True)
class Loss:
    """One kind's loss. Every function takes outputs and targets as the runner holds them."""

    kind: Kind
    name: str  # how the loss is described to users
    metrics: tuple[str, ...]  # the objective metrics a task of this kind reports

    def mean(self, output: Tensor, target: Tensor) -> Tensor:
        """The batch's mean loss (what one training step minimises)."""
        if self.kind == "classification":
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)

    def members(self, output: Tensor, target: Tensor) -> Tensor:
        """Each cohort member's mean loss `[K]`, from outputs `[K, B, ...]` and targets shared
        (`[B, ...]`) or per member (`[K, B, ...]`): one kernel over all members."""
        if self.kind == "classification":
            labels = target.expand(output.shape[:2]) if target.dim() == 1 else target
            return F.cross_entropy(output.transpose(1, 2), labels, reduction="none").mean(dim=1)
        values = target.expand(output.shape) if target.dim() == output.dim() - 1 else target
        return (output - values).pow(2).flatten(1).mean(dim=1)

    def sums(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """The summed loss over the batch's examples, and the count of correct predictions
        (None for regression); per member when `output` has a leading member dimension."""
        members = output.dim() > target.dim() + (1 if self.kind == "classification" else 0)
        if self.kind == "classification":
            if members:
                labels = target.expand(output.shape[:2])
                loss = F.cross_entropy(output.transpose(1, 2), labels, reduction="none").sum(1)
                return loss, (output.argmax(dim=2) == labels).sum(dim=1)
            loss = F.cross_entropy(output, target, reduction="sum")
            return loss, (output.argmax(dim=1) == target).sum()
        squared = (output - target).pow(2)
        per_example = squared.flatten(2 if members else 1).mean(dim=-1)
        return per_example.sum(dim=-1), None

    def chance_loss(self, n_outputs: int, y_train: Tensor) -> float:
        """The loss of knowing nothing of the inputs (see the module docstring)."""
        if self.kind == "classification":
            return math.log(n_outputs)
        return float(y_train.double().pow(2).mean())


LOSSES: dict[str, Loss] = {
    "classification": Loss("classification", "cross-entropy", ("val_loss", "val_accuracy")),
    "regression": Loss("regression", "mean squared error", ("val_loss",)),
}


def loss_of(kind: str) -> Loss:
    return LOSSES[kind]


def metrics_of(kind: str) -> tuple[str, ...]:
    return LOSSES[kind].metrics
