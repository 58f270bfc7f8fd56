"""Train K trials as one batched model: `run_cohort(configs, reporters) -> [TrialResult]`.

A *cohort* is K trial configurations that differ only in continuous hyperparameters (rates,
momentum, weight decay, betas, …) and seed. Their K networks are stacked parameter by
parameter (`[K, *shape]`) and trained in one pass: `torch.func.vmap` over
`functional_call(model, member_parameters, x)` runs the K forward and backward passes as
batched kernels, and `optim.batched` applies each member's scheme with its own
hyperparameters. On a small network this does K trainings' work in far fewer, larger kernels
(`bench/cohort_throughput.py` measures it).

Each member's `TrialResult` is what `worker.runner.run_trial` returns for that member's config
alone, except for the timings (wall time and examples per second are the cohort's, shared):

- initial weights: `torch.manual_seed(seed)` then the model is built, as the runner does;
- batch order: a generator seeded with the member's seed (`runner._batches`). Members that
  share a seed share one index stream and one input batch (`vmap` broadcasts it); with mixed
  seeds every member gathers its own batch (`[K, B]` indices);
- divergence: checked where the runner checks it (the last batch loss every `CHECK_EVERY`
  steps, the epoch's mean train loss and the validation loss after each epoch), so
  `diverged_at_step` is the runner's. A diverged member leaves the batch at that moment:
  frozen, recorded, and unable to reach the others (between two checks its non-finite values
  stay in its own slice: every batched kernel is per member);
- pruning: after each epoch every member's objective goes to its own reporter; a member told to
  stop leaves the batch (the stacked tensors and optimizer state are compacted);
- layer factors (lars, lamb) per member, recorded each epoch as the runner records them;
- BatchNorm: running means and variances are per member (stacked like the parameters);
  `num_batches_tracked`, which every member advances at the same steps, is one shared
  counter (a batched tensor cannot drive the Python-side branches that read it);
- transformed MLPs: the running statistics are per member; `update_transformations` runs on
  each member's slice every `transform_every` steps.

Refused (`CohortError`, a ValueError whose `reason` says why, so the sweep keeps such trials
at cohort size 1): `bmp` and `bmp_exact` (their rates come from hooks on the layers of one
model: per-member batched versions do not exist yet), and configs that differ in anything
but continuous hyperparameters and seed (`cohort_key`).

A cohort of one is slower than `run_trial` (vmap's per-operation dispatch: 0.43-0.50x in
docs/bench/cohort_throughput.json), so a caller with a single trial should use the runner.

Float64 cohorts (`TrialConfig.dtype = "float64"`) match separate float64 runs to 1e-10
(tests/worker/test_cohort.py); in float32 the batched kernels round differently from the
single-model ones, so histories agree only loosely (the test states its tolerance).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

import optim
from optim.batched import BATCHED_SCHEMES, BatchedOptimizer, build_batched
from worker.runner import (
    CHECK_EVERY,
    EpochRecord,
    Reporter,
    TrialConfig,
    TrialResult,
    _batches,
    _build,
    _round,
    cast_data,
    resolve_device,
    trial_objective,
)
from worker.tasks import TaskData, load_task_data

__all__ = ["CohortError", "auto_cohort_size", "check_cohort", "cohort_key", "run_cohort"]

_EVAL_CHUNK = 4096  # the runner's evaluation chunk


class CohortError(ValueError):
    """These configs cannot train as one cohort; `reason` says why (train them one by one)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_REFUSED_SCHEMES = {
    "bmp": "bmp computes each layer's rate from forward/backward hooks on one model's layers "
    "(optim.backmatching); it has no per-member batched version, so bmp trials run at "
    "cohort size 1",
    "bmp_exact": "bmp_exact solves per-block least-squares problems on one model's layers; "
    "it has no per-member batched version, so bmp_exact trials run at cohort size 1",
}


def cohort_key(config: TrialConfig) -> tuple[Any, ...]:
    """What members of one cohort share: every field but `hyperparameters` and `seed`, plus the
    scheme's discrete (bool) hyperparameters. Trials with equal keys may train together."""
    shared = tuple(
        (f.name, repr(getattr(config, f.name)))
        for f in fields(config)
        if f.name not in ("hyperparameters", "seed")
    )
    values = optim.validate(config.scheme, config.hyperparameters)
    discrete = tuple(
        (h.name, values[h.name])
        for h in optim.SCHEMES[config.scheme].hyperparameters
        if h.type == "bool"
    )
    return shared + discrete


def check_cohort(configs: Sequence[TrialConfig]) -> None:
    """Raise `CohortError` unless `configs` can train as one cohort, or
    `optim.HyperparameterError` for a value the scheme's constructor refuses, as `run_trial`
    would."""
    if not configs:
        raise CohortError("a cohort needs at least one member")
    first = configs[0]
    if first.scheme in _REFUSED_SCHEMES:
        raise CohortError(_REFUSED_SCHEMES[first.scheme])
    if first.scheme not in BATCHED_SCHEMES:
        raise CohortError(f"scheme {first.scheme!r} has no batched optimizer")
    probe = nn.Linear(1, 1)
    for config in configs:  # the constructors' own refusals (nesterov without momentum, ...)
        optim.build(config.scheme, probe, **config.hyperparameters)
    key = cohort_key(first)
    for i, config in enumerate(configs[1:], start=1):
        other = cohort_key(config)
        if other != key:
            differing = [a[0] for a, b in zip(key, other, strict=False) if a != b]
            raise CohortError(
                f"member {i} differs from member 0 in {', '.join(differing) or 'its fields'}; "
                "a cohort's members differ only in continuous hyperparameters and seed"
            )


def auto_cohort_size(n_parameters: int, device: torch.device | str) -> int:
    """A default cohort size for a model of `n_parameters` on `device`.

    Why: batching helps while one small model's kernels are too small to keep the hardware
    busy (per-kernel overhead, threads that a single small model cannot use); once one model
    fills the device, stacking gains nothing and costs K times the memory. A cohort also
    reports when its last member finishes, so a large K delays the sampler's feedback.
    On the 2-core CPU of docs/bench/cohort_throughput.json (mnist1d MLP, 2 threads, a loaded
    machine), K = 16 gave a median 2.04x the sequential throughput and K = 64 2.12x with
    per-round ratios from 0.57 to 6.08 (K = 4: 1.14x), so 16: the gain without the
    feedback delay and memory of 64. Up to 1M parameters 16, up to 10M 4, then 1. The GPU
    figures (64 up to 1M parameters, 16 up to 10M, 4 up to 50M, then 1) are a starting
    choice, not yet measured: `bench/cohort_throughput.py --device cuda` prints the figures to
    set them by.
    """
    kind = torch.device(device).type
    limits = (
        ((1_000_000, 64), (10_000_000, 16), (50_000_000, 4))
        if kind == "cuda"
        else ((1_000_000, 16), (10_000_000, 4))
    )
    for limit, size in limits:
        if n_parameters <= limit:
            return size
    return 1


@dataclass
class _Member:
    """One trial's bookkeeping while it trains in the cohort."""

    config: TrialConfig
    reporter: Reporter | None
    history: list[EpochRecord]
    factor_rows: list[list[float | None]]
    outcome: str = "complete"
    diverged_at: int | None = None
    steps: int = 0
    wall_time: float = 0.0
    test: tuple[float, float] | None = None


class _Stack:
    """The stacked model: parameters (owned by the optimizer), per-member buffers, shared
    counters, and a template module whose structure `functional_call` reuses."""

    def __init__(
        self,
        template: nn.Module,
        buffers: dict[str, Tensor],
        shared_buffers: dict[str, Tensor],
        optimizer: BatchedOptimizer,
    ) -> None:
        self.template = template
        self.buffers = buffers  # [K, ...] per member
        self.shared = shared_buffers  # counters every member advances together
        self.optimizer = optimizer

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        out: Tensor = functional_call(self.template, ({**params, **buffers}, self.shared), (x,))
        return out

    def logits(self, x: Tensor, x_batched: bool) -> Tensor:
        return vmap(self._call, in_dims=(0, 0, 0 if x_batched else None))(
            self.optimizer.params, self.buffers, x
        )

    def select(self, index: Sequence[int]) -> None:
        self.optimizer.select(index)
        idx = torch.tensor(list(index), dtype=torch.long)
        self.buffers = {n: b.index_select(0, idx.to(b.device)) for n, b in self.buffers.items()}

    @torch.no_grad()
    def per_member(self, function: Any) -> None:
        """Apply `function(module)` to each member's slice through the template (rare,
        in-place updates such as the transformed networks' re-centring)."""
        params = self.optimizer.params
        for k in range(self.optimizer.members):
            state = {n: p[k] for n, p in params.items()}
            state.update({n: b[k] for n, b in self.buffers.items()})
            state.update(self.shared)
            for name, tensor in _named_tensors(self.template):
                if name in state:
                    tensor.copy_(state[name])
            function(self.template)
            for name, tensor in _named_tensors(self.template):
                if name in params:
                    params[name][k].copy_(tensor)
                elif name in self.buffers:
                    self.buffers[name][k].copy_(tensor)


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _build_stack(
    configs: Sequence[TrialConfig], data: TaskData, device: torch.device, dtype: torch.dtype
) -> tuple[_Stack, int]:
    """Each member's initial model (built after `manual_seed(seed)`, like the runner), stacked."""
    by_seed: dict[int, nn.Module] = {}
    for config in configs:
        if config.seed not in by_seed:
            torch.manual_seed(config.seed)
            by_seed[config.seed] = _build(config, data, device).to(dtype)
    template = by_seed[configs[0].seed]
    members = [by_seed[c.seed] for c in configs]
    params, buffers = stack_module_state(members)
    shared = {n: b for n, b in buffers.items() if n.endswith("num_batches_tracked")}
    batched = {n: b for n, b in buffers.items() if n not in shared}
    shared = {n: b[0].clone() for n, b in shared.items()}
    hyperparameters = [optim.validate(c.scheme, c.hyperparameters) for c in configs]
    dims = {n: p.dim() for n, p in template.named_parameters()}
    optimizer = build_batched(configs[0].scheme, params, hyperparameters, dims)
    n_parameters = sum(p.numel() for p in template.parameters())
    template.train()
    return _Stack(template, batched, shared, optimizer), n_parameters


def _member_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Each member's mean cross-entropy, `[K]`, from logits `[K, B, C]` and labels `[B]` (shared
    batch) or `[K, B]`: one kernel over all members rather than `vmap`'s per-op dispatch."""
    target = y.expand(logits.shape[:2]) if y.dim() == 1 else y
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(dim=1)


def _evaluate(stack: _Stack, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
    """Per member, the runner's `_evaluate`: mean loss and accuracy in eval mode."""
    stack.template.eval()
    k = stack.optimizer.members
    loss = torch.zeros(k, device=x.device, dtype=x.dtype)
    correct = torch.zeros(k, device=x.device, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(y), _EVAL_CHUNK):
            logits = stack.logits(x[start : start + _EVAL_CHUNK], x_batched=False)
            target = y[start : start + _EVAL_CHUNK]
            loss += vmap(lambda z, t=target: F.cross_entropy(z, t, reduction="sum"))(logits)
            correct += (logits.argmax(dim=2) == target).sum(dim=1)
    stack.template.train()
    n = len(y)
    return [v / n for v in loss.tolist()], [c / n for c in correct.tolist()]


def run_cohort(
    configs: Sequence[TrialConfig], reporters: Sequence[Reporter | None] | None = None
) -> list[TrialResult]:
    """Train `configs` as one batched model; result i is what `run_trial(configs[i],
    reporters[i])` returns (timings aside). Raises `CohortError` for what cannot be batched."""
    check_cohort(configs)
    reporters = list(reporters) if reporters is not None else [None] * len(configs)
    if len(reporters) != len(configs):
        raise ValueError(f"{len(reporters)} reporters for {len(configs)} configs")
    first = configs[0]
    setup_start = time.perf_counter()
    device = resolve_device(first.device)
    data = load_task_data(first.task, first.data.model_dump(), device)
    batch_size, n_train = first.data.batch_size, len(data.y_train)
    if batch_size > n_train:
        raise ValueError(f"data.batch_size: {batch_size} exceeds the {n_train} training examples")
    dtype = getattr(torch, first.dtype)
    if dtype != data.x_train.dtype:
        data = cast_data(data, dtype)
    stack, n_parameters = _build_stack(configs, data, device, dtype)
    optimizer = stack.optimizer
    members = [_Member(c, r, [], []) for c, r in zip(configs, reporters, strict=True)]
    live = list(range(len(configs)))  # member numbers, in batch order
    transform: Callable[[nn.Module], None] | None = None
    if first.model.transformed:
        from optim.transformed import update_transformations as transform

    bound = first.divergence_factor * math.log(data.n_classes)
    started = time.perf_counter()
    setup_time = started - setup_start
    steps_per_epoch = first.steps_per_epoch or n_train // batch_size
    streams = {
        seed: _batches(n_train, batch_size, torch.Generator().manual_seed(seed), device)
        for seed in dict.fromkeys(c.seed for c in configs)
    }
    step = 0
    loss_sum = torch.zeros(len(live), device=device, dtype=dtype)

    def leave(gone: set[int]) -> None:
        """Drop batch positions `gone` (members that diverged or were pruned)."""
        nonlocal live, loss_sum
        keep = [i for i in range(len(live)) if i not in gone]
        now = time.perf_counter() - started
        for i in gone:
            members[live[i]].steps, members[live[i]].wall_time = step, now
        live = [live[i] for i in keep]
        if live and gone:
            stack.select(keep)
            loss_sum = loss_sum.index_select(0, torch.tensor(keep, device=device))

    for epoch in range(1, first.epochs + 1):
        if not live:
            break
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros(len(live), device=device, dtype=dtype)
        for i in range(steps_per_epoch):
            seeds = [members[m].config.seed for m in live]
            index = {s: next(streams[s]) for s in dict.fromkeys(seeds)}
            if len(index) == 1:
                idx = next(iter(index.values()))
                x, y, batched = data.x_train[idx], data.y_train[idx], False
            else:
                idx = torch.stack([index[s] for s in seeds])
                x, y, batched = data.x_train[idx], data.y_train[idx], True
            logits = stack.logits(x, batched)
            losses = _member_losses(logits, y)
            optimizer.zero_grad()
            losses.sum().backward()
            optimizer.step()
            step += 1
            loss_sum += losses.detach()
            if transform is not None and step % first.model.transform_every == 0:
                stack.per_member(transform)
            if (i + 1) % CHECK_EVERY == 0:
                last = losses.tolist()
                gone = {j for j, v in enumerate(last) if not math.isfinite(v) or v > bound}
                for j in gone:
                    members[live[j]].outcome, members[live[j]].diverged_at = "diverged", step
                leave(gone)
                if not live:
                    break
        if not live:
            break
        train_time = time.perf_counter() - epoch_start
        train_losses = [v / steps_per_epoch for v in loss_sum.tolist()]
        gone = {j for j, v in enumerate(train_losses) if not math.isfinite(v) or v > bound}
        for j in gone:
            members[live[j]].outcome, members[live[j]].diverged_at = "diverged", step
        kept_losses = [v for j, v in enumerate(train_losses) if j not in gone]
        leave(gone)
        if not live:
            break
        val_losses, val_accuracies = _evaluate(stack, data.x_val, data.y_val)
        gone = {j for j, v in enumerate(val_losses) if not math.isfinite(v)}
        factors = {n: f.tolist() for n, f in optimizer.layer_factors().items()}
        wall = time.perf_counter() - started
        for j, m in enumerate(live):
            member = members[m]
            if j in gone:
                member.outcome, member.diverged_at = "diverged", step
                continue
            member.history.append(
                EpochRecord(
                    epoch,
                    step,
                    kept_losses[j],
                    val_losses[j],
                    val_accuracies[j],
                    wall,
                    steps_per_epoch * batch_size / max(train_time, 1e-9),
                )
            )
            if optimizer.layerwise:
                member.factor_rows.append(
                    [_round(v[j]) if math.isfinite(v[j]) else None for v in factors.values()]
                )
            value = (
                val_accuracies[j] if member.config.objective == "val_accuracy" else val_losses[j]
            )
            if member.reporter is not None and member.reporter.report(epoch, value):
                member.outcome = "pruned"
                gone.add(j)
        leave(gone)

    if live:
        for m in live:
            members[m].steps, members[m].wall_time = step, time.perf_counter() - started
        if first.evaluate_test:
            losses_, accuracies = _evaluate(stack, data.x_test, data.y_test)
            for j, m in enumerate(live):
                members[m].test = (losses_[j], accuracies[j])
    names = list(optimizer.layer_factors()) or [n for n, _ in stack.template.named_parameters()]
    return [
        _result(
            member, names, n_parameters, device, setup_time, data.n_classes, optimizer.layerwise
        )
        for member in members
    ]


def _result(
    member: _Member,
    names: list[str],
    n_parameters: int,
    device: torch.device,
    setup_time: float,
    n_classes: int,
    layerwise: bool,
) -> TrialResult:
    config = member.config
    result = TrialResult(
        outcome=member.outcome,  # type: ignore[arg-type]
        value=trial_objective(
            config.objective, config.divergence_factor, member.history, member.outcome, n_classes
        ),
        history=member.history,
        steps=member.steps,
        wall_time=member.wall_time,
        setup_time=setup_time,
        n_parameters=n_parameters,
        device=str(device),
        layer_factors={"names": names if member.factor_rows else [], "values": member.factor_rows}
        if layerwise
        else None,
        diverged_at_step=member.diverged_at,
    )
    if member.test is not None:
        result.test_loss, result.test_accuracy = member.test
    return result
