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
- batch order: a generator seeded with the member's seed (`worker.training.batches`). Members that
  share a seed share one index stream and one input batch (`vmap` broadcasts it); with mixed
  seeds every member gathers its own batch (`[K, B]` indices);
- divergence: checked where the runner checks it (the last batch loss every `CHECK_EVERY`
  steps, the epoch's mean train loss and the validation loss after each epoch), so
  `diverged_at_step` is the runner's. A diverged member leaves the batch at that moment:
  frozen, recorded, and unable to reach the others (between two checks its non-finite values
  stay in its own slice: every batched kernel is per member);
- pruning: after each epoch every member's objective goes to its own reporter; a member told to
  stop leaves the batch (the stacked tensors and optimizer state are compacted);
- layer factors (lars, lamb, bmp) per member, recorded each epoch as the runner records them;
- bmp: its forward hooks sit on the template's layers and run inside the vmapped forward pass,
  so each statistic they record is per member; the stack hands them to the optimizer after the
  forward pass (`BatchedOptimizer.forward_statistics`), which computes every member's scalars
  and factors from its own (`optim.backmatching.batched`);
- bmp_exact: its hooks record every layer's input and output per member the same way, the
  stacked output's gradient is hooked outside vmap (`BatchedOptimizer.watch_output`), and each
  member's least-squares step is solved on its own slices by the single optimizer's code;
- BatchNorm: running means and variances are per member (stacked like the parameters);
  `num_batches_tracked`, which every member advances at the same steps, is one shared
  counter (a batched tensor cannot drive the Python-side branches that read it);
- transformed MLPs: the running statistics are per member; `update_transformations` runs on
  each member's slice every `transform_every` steps;
- learning-rate schedules are per member (`TrialConfig.schedule`, which `cohort_key` leaves
  out: members may differ in swept schedule fields): before step `s` each member's rate is set
  to `lr · m(s)` of its own schedule, the product the runner's `LambdaLR` computes.

Refused (`CohortError`, a ValueError whose `reason` says why, so the sweep keeps such trials
at cohort size 1): a scheme without a batched optimizer in `optim.batched` (every registered
scheme has one), and configs that differ in anything but continuous hyperparameters and seed
(`cohort_key`). Any task's model may train as a cohort (the loss and the metrics are the
task's, `worker.tasks.losses`); one that `vmap` cannot run is found before it is batched
(`batching_problem`), and its arm stays at cohort size 1.

A cohort of one is slower than `run_trial` (vmap's per-operation dispatch: 0.43-0.50x in
docs/bench/cohort_throughput.json), so a caller with a single trial should use the runner.

Float64 cohorts (`TrialConfig.dtype = "float64"`) match separate float64 runs to 1e-10
(tests/worker/test_cohort.py); in float32 the batched kernels round differently from the
single-model ones, so histories agree only loosely (the test states its tolerance).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

import optim
from optim.batched import BATCHED_SCHEMES, BatchedOptimizer, build_batched
from worker.runner import TrialConfig, build_model
from worker.tasks import Task
from worker.tasks.losses import Loss, loss_of
from worker.training import Prepared, prepare, train
from worker.trial import Reporter, TrialResult

__all__ = [
    "CohortError",
    "auto_cohort_size",
    "batching_problem",
    "batching_slows",
    "check_cohort",
    "cohort_key",
    "run_cohort",
]

_EVAL_CHUNK = 4096  # the runner's evaluation chunk


class CohortError(ValueError):
    """These configs cannot train as one cohort; `reason` says why (train them one by one)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def cohort_key(config: TrialConfig) -> tuple[Any, ...]:
    """What members of one cohort share: every field but `hyperparameters`, `seed` and
    `schedule`, plus the scheme's discrete (bool) hyperparameters. Trials with equal keys may
    train together."""
    shared = tuple(
        (f.name, repr(getattr(config, f.name)))
        for f in fields(config)
        if f.name not in ("hyperparameters", "seed", "schedule")
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
    if first.scheme not in BATCHED_SCHEMES:
        raise CohortError(
            f"scheme {first.scheme!r} has no batched optimizer (optim.batched), so its trials "
            "run at cohort size 1"
        )
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


def batching_problem(task: Task, data: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """Why `task`'s model cannot train as a cohort, or None: two members built, stacked and
    trained one step under `vmap`, as `run_cohort` does, each on its own batch of two zero
    inputs (as members of different seeds train). Tried
    on the meta device first (nothing is allocated); a model that cannot run there (one that
    reads a value, like the transformed MLP's step counter) is tried on the CPU. A model that
    branches on its values, calls `.item()` under `vmap`, or updates a buffer in a way `vmap`
    refuses fails, and its trials then run one per task."""
    try:
        _batched_step(task, data, given, torch.device("meta"))
    except Exception:  # the meta device refuses more than vmap does: ask the CPU
        try:
            _batched_step(task, data, given, torch.device("cpu"))
        except Exception as exc:  # whatever the model's code raises: the reason, in a line
            text = str(exc).strip()
            return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return None


def _batched_step(
    task: Task, data: Mapping[str, Any], given: Mapping[str, Any], device: torch.device
) -> None:
    with torch.device(device):
        members = [task.build(data, given) for _ in range(2)]
        template = members[0].train()
        params, buffers = stack_module_state(members)
        shared = {n: b[0] for n, b in buffers.items() if n.endswith("num_batches_tracked")}
        batched = {n: b for n, b in buffers.items() if n not in shared}
        shape = task.shape(data)
        flat = task.flat_input(data)
        # each member its own batch, as members of different seeds have: [K, B, ...]
        x = torch.zeros(2, 2, *((math.prod(shape.input_shape),) if flat else shape.input_shape))
        if task.kind == "classification":
            y = torch.zeros(2, 2, dtype=torch.long)
        else:
            y = torch.zeros(2, 2, shape.n_outputs)

        def call(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Tensor) -> Tensor:
            out: Tensor = functional_call(template, ({**p, **b}, shared), (inputs,))
            return out

        output = vmap(call, in_dims=(0, 0, 0))(params, batched, x)
        loss_of(task.kind).members(output, y).sum().backward()


def batching_slows(device: torch.device | str, convolutions: bool) -> bool:
    """Whether a cohort trains slower than its trials one by one whatever its size: a model
    with convolutions on the CPU (measured in `auto_cohort_size`'s docstring)."""
    return torch.device(device).type == "cpu" and convolutions


def auto_cohort_size(
    n_parameters: int, device: torch.device | str, convolutions: bool = False
) -> int:
    """A default cohort size for a model of `n_parameters` on `device` (`convolutions`: the
    model has a convolution layer).

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
    set them by. A convolutional model on the CPU trains one trial per task: on `mnist1d-cnn`
    (docs/bench/cohort_throughput_cnn.json, 1 thread) cohorts of 4 and 16 trained at 0.89x and
    0.80x the sequential throughput, and its whole sweep (`bench/sweep_wall.py --workload cnn`)
    took 354.8 s in cohorts against 301.5 s one trial per task: vmap's batched convolution is
    no faster on the CPU than K convolutions one after another, so stacking only adds its costs.
    """
    kind = torch.device(device).type
    if batching_slows(device, convolutions):
        return 1
    limits = (
        ((1_000_000, 64), (10_000_000, 16), (50_000_000, 4))
        if kind == "cuda"
        else ((1_000_000, 16), (10_000_000, 4))
    )
    for limit, size in limits:
        if n_parameters <= limit:
            return size
    return 1


class _Stack:
    """The stacked model, a `worker.training.Learner` of K members: parameters (owned by the
    batched optimizer), per-member buffers, shared counters, and a template module whose
    structure `functional_call` reuses; each member's schedule and transformations."""

    def __init__(
        self,
        configs: Sequence[TrialConfig],
        template: nn.Module,
        buffers: dict[str, Tensor],
        shared_buffers: dict[str, Tensor],
        optimizer: BatchedOptimizer,
        loss: Loss,
        steps_per_epoch: int,
    ) -> None:
        self.template = template
        self.buffers = buffers  # [K, ...] per member
        self.shared = shared_buffers  # counters every member advances together
        self.optimizer = optimizer
        self.loss = loss
        self.layerwise = optimizer.layerwise
        self.n_parameters = sum(p.numel() for p in template.parameters())
        self.live = list(range(len(configs)))  # the members training, in batch order
        self.schedules = [c.schedule.resolve(steps_per_epoch, c.epochs) for c in configs]
        self.scheduled = not all(s.is_constant for s in self.schedules)
        self.base_lrs = [optim.validate(c.scheme, c.hyperparameters)["lr"] for c in configs]
        self.transform: Any = None
        if configs[0].model.transformed:
            from optim.transformed import update_transformations

            self.transform = update_transformations
        self.transform_every = configs[0].model.transform_every

    # -- worker.training.Learner ----------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor, batched: bool, step: int) -> Tensor:
        losses = self.loss.members(self.logits(x, batched), y)
        self.optimizer.zero_grad()
        losses.sum().backward()
        if self.scheduled:  # before step `step`, each member's `lr · m(step)`, as LambdaLR
            self.optimizer.set_lr([self.base_lrs[m] * self.schedules[m](step) for m in self.live])
        self.optimizer.step()
        return losses.detach()

    def after_step(self, step: int) -> None:
        if self.transform is not None and step % self.transform_every == 0:
            self.per_member(self.transform)

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float | None]]:
        return _evaluate(self, x, y, self.loss)

    def factors(self) -> dict[str, list[float]]:
        return {n: f.tolist() for n, f in self.optimizer.layer_factors().items()}

    def keep(self, positions: list[int]) -> None:
        self.live = [self.live[i] for i in positions]
        self.select(positions)

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        out: Tensor = functional_call(self.template, ({**params, **buffers}, self.shared), (x,))
        return out

    def _watched_call(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self._call(params, buffers, x), self.optimizer.forward_statistics()

    def logits(self, x: Tensor, x_batched: bool) -> Tensor:
        """Every member's logits `[K, B, C]`; a training pass of an optimizer that
        `watches_forward` (bmp) also hands it the members' forward statistics."""
        in_dims = (0, 0, 0 if x_batched else None)
        args = (self.optimizer.params, self.buffers, x)
        if not (self.optimizer.watches_forward and torch.is_grad_enabled()):
            out: Tensor = vmap(self._call, in_dims=in_dims)(*args)
            return out
        logits: Tensor
        logits, statistics = vmap(self._watched_call, in_dims=in_dims)(*args)
        self.optimizer.record_statistics(statistics)
        self.optimizer.watch_output(logits)
        return logits

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


def _build_stack(configs: Sequence[TrialConfig], prepared: Prepared) -> _Stack:
    """Each member's initial model (built after `manual_seed(seed)`, like the runner), stacked."""
    data, device, dtype = prepared.data, prepared.device, prepared.dtype
    by_seed: dict[int, nn.Module] = {}
    for config in configs:
        if config.seed not in by_seed:
            torch.manual_seed(config.seed)
            by_seed[config.seed] = build_model(config, device).to(dtype)
    template = by_seed[configs[0].seed]
    members = [by_seed[c.seed] for c in configs]
    params, buffers = stack_module_state(members)
    shared = {n: b for n, b in buffers.items() if n.endswith("num_batches_tracked")}
    batched = {n: b for n, b in buffers.items() if n not in shared}
    shared = {n: b[0].clone() for n, b in shared.items()}
    hyperparameters = [optim.validate(c.scheme, c.hyperparameters) for c in configs]
    dims = {n: p.dim() for n, p in template.named_parameters()}
    optimizer = build_batched(configs[0].scheme, params, hyperparameters, dims, model=template)
    template.train()
    first = configs[0]
    steps_per_epoch = first.steps_per_epoch or len(data.y_train) // first.data.batch_size
    return _Stack(configs, template, batched, shared, optimizer, data.loss, steps_per_epoch)


def _evaluate(
    stack: _Stack, x: Tensor, y: Tensor, loss_fn: Loss
) -> tuple[list[float], list[float | None]]:
    """Per member, the runner's `_evaluate`: mean loss and accuracy (None for regression) in
    eval mode, with the task's loss (`worker.tasks.losses`)."""
    stack.template.eval()
    k = stack.optimizer.members
    loss = torch.zeros(k, device=x.device, dtype=x.dtype)
    correct = torch.zeros(k, device=x.device, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(y), _EVAL_CHUNK):
            outputs = stack.logits(x[start : start + _EVAL_CHUNK], x_batched=False)
            total, hits = loss_fn.sums(outputs, y[start : start + _EVAL_CHUNK])
            loss += total
            if hits is not None:
                correct += hits
    stack.template.train()
    n = len(y)
    accuracies: list[float | None] = (
        [c / n for c in correct.tolist()] if loss_fn.kind == "classification" else [None] * k
    )
    return [v / n for v in loss.tolist()], accuracies


def run_cohort(
    configs: Sequence[TrialConfig], reporters: Sequence[Reporter | None] | None = None
) -> list[TrialResult]:
    """Train `configs` as one batched model; result i is what `run_trial(configs[i],
    reporters[i])` returns (timings aside). Raises `CohortError` for what cannot be batched."""
    check_cohort(configs)
    reporters = list(reporters) if reporters is not None else [None] * len(configs)
    if len(reporters) != len(configs):
        raise ValueError(f"{len(reporters)} reporters for {len(configs)} configs")
    prepared = prepare(configs[0])
    return train(configs, reporters, _build_stack(configs, prepared), prepared)
