"""The one training loop: K trials trained side by side, written once for one model and for a
cohort. `worker.runner.run_trial` is K = 1 on a plain model; `worker.cohort.run_cohort` is K
members stacked into one batched model. What a trial records is decided here alone:

- data are loaded once per process onto the device as tensors (`worker.tasks.load_task_data`);
  every step gathers a batch from them by index, so no DataLoader or host-to-device copy runs
  inside the loop (`prepare`);
- the batch order comes from a generator seeded with the trial's seed; an epoch is a pass over
  the training split in a fresh random order, dropping the last incomplete batch (every step
  sees a full batch; BatchNorm never sees a batch of one), or `steps_per_epoch` steps (the
  order continues across epoch boundaries). Members that share a seed share one batch;
- after every epoch, per member: mean train loss, validation loss and accuracy (eval mode; None
  for regression), cumulative wall time, training examples per second of that epoch
  (evaluation excluded), and for layer-wise schemes the optimizer's per-tensor factors;
- divergence: a member ends as *diverged* when its loss is NaN/inf or above
  `divergence_factor × chance_loss`, the task's chance-level loss (ln(classes) for
  classification, the training targets' mean square for regression) times the factor. The last
  batch's losses are checked every `CHECK_EVERY` steps (reading them synchronises a GPU, so not
  every step), the epoch's mean train loss and the validation loss after every epoch. A
  diverged member leaves at that moment; its objective is `diverged_value(...)`;
- after every epoch a member's objective goes to its `reporter.report(epoch, value)`; True
  prunes it, and it leaves too;
- the test split is evaluated at the end for the members still training when
  `evaluate_test` (final seeds only: the objective never sees it).

How the K members step and evaluate is the `Learner`'s: one `torch.nn.Module` and its optimizer
(`runner`), or a stacked model under `torch.func.vmap` and a batched optimizer (`cohort`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from worker.tasks import TaskData, load_task_data
from worker.trial import (
    CHECK_EVERY,
    EpochRecord,
    Reporter,
    TrialResult,
    cast_data,
    check_objective,
    epoch_objective,
    resolve_device,
    trial_objective,
)

if TYPE_CHECKING:  # a trial's config is the runner's; the loop only reads its fields
    from worker.runner import TrialConfig

__all__ = ["Learner", "Prepared", "batches", "prepare", "train"]


class Learner(Protocol):
    """K members that train together; the loop tells it which stay (`keep`)."""

    layerwise: bool  # the scheme reports per-tensor factors
    n_parameters: int  # of one member

    def step(self, x: Tensor, y: Tensor, batched: bool, step: int) -> Tensor:
        """One optimizer step of every live member on its batch (`batched`: x is `[K, B, …]`,
        else one batch for all); the members' losses before the step, `[K]`, detached."""
        ...

    def after_step(self, step: int) -> None:
        """Anything a model does between steps (the transformed networks' re-estimates)."""
        ...

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float | None]]:
        """Each member's mean loss and accuracy (None for regression), in eval mode."""
        ...

    def factors(self) -> dict[str, list[float]]:
        """Each tensor's factor at the last step, per live member ({} unless layer-wise)."""
        ...

    def keep(self, positions: list[int]) -> None:
        """Only the members at these positions (in the current order) train on."""
        ...


@dataclass(frozen=True)
class Prepared:
    """What every member shares: the task's data on the device, in the configs' dtype."""

    data: TaskData
    device: torch.device
    dtype: torch.dtype
    setup_start: float  # when loading began (set-up time counts from here)


def prepare(config: TrialConfig) -> Prepared:
    """The data `config` trains on (every member of a cohort shares them), checked against it."""
    setup_start = time.perf_counter()
    device = resolve_device(config.device)
    data = load_task_data(config.resolve_task(), config.data.model_dump(), device)
    check_objective(config, data)
    n_train = len(data.y_train)
    if config.data.batch_size > n_train:
        raise ValueError(
            f"data.batch_size: {config.data.batch_size} exceeds the {n_train} training examples"
        )
    dtype = getattr(torch, config.dtype)
    if dtype != data.x_train.dtype:
        data = cast_data(data, dtype)
    return Prepared(data, device, dtype, setup_start)


def batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[Tensor]:
    """Index batches over endless random permutations of range(n), full batches only."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _round(value: float) -> float | None:
    return float(f"{value:.4g}") if math.isfinite(value) else None


@dataclass
class _Member:
    """One trial's bookkeeping while it trains."""

    config: TrialConfig
    reporter: Reporter | None
    history: list[EpochRecord] = field(default_factory=list)
    factor_rows: list[list[float | None]] = field(default_factory=list)
    outcome: str = "complete"
    diverged_at: int | None = None
    steps: int = 0
    wall_time: float = 0.0
    test: tuple[float, float | None] | None = None


def train(
    configs: Sequence[TrialConfig],
    reporters: Sequence[Reporter | None],
    learner: Learner,
    prepared: Prepared,
) -> list[TrialResult]:
    """Train every member to its end (see the module doc); result i is configs[i]'s."""
    data, device, dtype = prepared.data, prepared.device, prepared.dtype
    first = configs[0]
    members = [_Member(c, r) for c, r in zip(configs, reporters, strict=True)]
    live = list(range(len(configs)))  # member numbers, in the learner's order
    bound = first.divergence_factor * data.chance_loss
    started = time.perf_counter()  # training time: data loading and model building excluded
    n_train, batch_size = len(data.y_train), first.data.batch_size
    steps_per_epoch = first.steps_per_epoch or n_train // batch_size
    streams = {
        seed: batches(n_train, batch_size, torch.Generator().manual_seed(seed), device)
        for seed in dict.fromkeys(c.seed for c in configs)
    }
    step = 0
    loss_sum = torch.zeros(len(live), device=device, dtype=dtype)

    def leave(gone: set[int]) -> None:
        """Drop positions `gone` (members that diverged or were pruned)."""
        nonlocal live, loss_sum
        keep = [i for i in range(len(live)) if i not in gone]
        now = time.perf_counter() - started
        for i in gone:
            members[live[i]].steps, members[live[i]].wall_time = step, now
        live = [live[i] for i in keep]
        if live and gone:
            learner.keep(keep)
            loss_sum = loss_sum.index_select(0, torch.tensor(keep, device=device))

    def diverge(positions: set[int]) -> None:
        for j in positions:
            members[live[j]].outcome, members[live[j]].diverged_at = "diverged", step

    for epoch in range(1, first.epochs + 1):
        if not live:
            break
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros(len(live), device=device, dtype=dtype)
        for i in range(steps_per_epoch):
            seeds = [members[m].config.seed for m in live]
            index = {s: next(streams[s]) for s in dict.fromkeys(seeds)}
            if len(index) == 1:  # one batch for every member
                idx = next(iter(index.values()))
                x, y, batched = data.x_train[idx], data.y_train[idx], False
            else:  # each member its own: [K, B]
                idx = torch.stack([index[s] for s in seeds])
                x, y, batched = data.x_train[idx], data.y_train[idx], True
            losses = learner.step(x, y, batched, step)
            step += 1
            loss_sum += losses
            learner.after_step(step)
            if (i + 1) % CHECK_EVERY == 0:
                gone = {j for j, v in enumerate(losses.tolist()) if not _below(v, bound)}
                diverge(gone)
                leave(gone)
                if not live:
                    break
        if not live:
            break
        train_time = time.perf_counter() - epoch_start
        train_losses = [v / steps_per_epoch for v in loss_sum.tolist()]
        gone = {j for j, v in enumerate(train_losses) if not _below(v, bound)}
        diverge(gone)
        kept_losses = [v for j, v in enumerate(train_losses) if j not in gone]
        leave(gone)
        if not live:
            break
        val_losses, val_accuracies = learner.evaluate(data.x_val, data.y_val)
        gone = {j for j, v in enumerate(val_losses) if not math.isfinite(v)}
        diverge(gone)
        factors = learner.factors()
        wall = time.perf_counter() - started
        speed = steps_per_epoch * batch_size / max(train_time, 1e-9)
        for j, m in enumerate(live):
            member = members[m]
            if j in gone:
                continue
            record = EpochRecord(
                epoch, step, kept_losses[j], val_losses[j], val_accuracies[j], wall, speed
            )
            member.history.append(record)
            if learner.layerwise:
                member.factor_rows.append([_round(v[j]) for v in factors.values()])
            value = epoch_objective(member.config.objective, record)
            if member.reporter is not None and member.reporter.report(epoch, value):
                member.outcome = "pruned"
                gone.add(j)
        leave(gone)

    for m in live:
        members[m].steps, members[m].wall_time = step, time.perf_counter() - started
    if live and first.evaluate_test:
        test_losses, test_accuracies = learner.evaluate(data.x_test, data.y_test)
        for j, m in enumerate(live):
            members[m].test = (test_losses[j], test_accuracies[j])
    names = list(learner.factors()) if learner.layerwise else []
    setup_time = started - prepared.setup_start
    return [
        _result(member, names, learner, device, setup_time, data.chance_loss) for member in members
    ]


def _below(loss: float, bound: float) -> bool:
    """A training loss that has not diverged: finite and at most the bound."""
    return math.isfinite(loss) and loss <= bound


def _result(
    member: _Member,
    names: list[str],
    learner: Learner,
    device: torch.device,
    setup_time: float,
    chance_loss: float,
) -> TrialResult:
    config = member.config
    result = TrialResult(
        outcome=member.outcome,  # type: ignore[arg-type]
        value=trial_objective(
            config.objective, config.divergence_factor, member.history, member.outcome, chance_loss
        ),
        history=member.history,
        steps=member.steps,
        wall_time=member.wall_time,
        setup_time=setup_time,
        n_parameters=learner.n_parameters,
        device=str(device),
        layer_factors={"names": names if member.factor_rows else [], "values": member.factor_rows}
        if learner.layerwise
        else None,
        diverged_at_step=member.diverged_at,
    )
    if member.test is not None:
        result.test_loss, result.test_accuracy = member.test
    return result
