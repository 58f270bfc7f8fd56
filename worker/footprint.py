"""What one training step of a trial costs, estimated before anything runs: the memory it needs
and its floating-point operations; and the timeout a trial gets when its spec sets none.

The parameter count does not bound a step's cost: a convolutional network with global pooling
has the same parameters at 32×32 and at 4096×4096, but its activations grow with the image (a
VGG13 on one 4096×4096 channel in batches of 8 produces 381 GiB of them per forward pass). So
the model a trial builds is made on the meta device (shapes only, nothing allocated) and one
batch is passed through it in eval mode, with a forward hook on every leaf module:

- `activations`: the values the leaf modules output for one batch. Autograd keeps about these
  for the backward pass (each layer's input or output), so their memory is the step's main
  cost; in-place activations are counted twice, which errs on the safe side.
- `flops`: per leaf, a `Linear` is 2 × inputs × outputs per example, a convolution 2 × its
  kernel's inputs (`in_channels / groups × kernel size`) per output value, any other module one
  operation per output value; a training step is 3 × the forward pass (the backward pass
  computes the gradients of the inputs and of the weights, each about one forward's work).
- memory of a step (`Footprint.memory_bytes`): 4 bytes (float32) × (activations + one batch of
  inputs + 4 × parameters: the weights, their gradients and up to two optimizer state tensors,
  as Adam and LAMB keep). A cohort task (`resources.cohort_size`) trains K trials as one
  batched model, so it needs K times that (`worker.arms.optuna.checks.largest_cohort`).

The service refuses a spec over its limits (`service.admission`); this module only measures.
Eval mode: the transformed MLP's statistics tracking reads values, which meta tensors do not
have; the shapes, and so the estimates, are those of training.

Default trial timeout (`default_trial_timeout_s`). A spec without `resources.trial_timeout_s`
still must not let one trial hold a node for ever, so its trials get
`DEFAULT_TIMEOUT_BASE_S + 10 × steps × max(flops / ASSUMED_FLOPS_PER_S, MIN_STEP_S)` seconds,
at most `MAX_TRIAL_TIMEOUT_S`: ten times what the trial's steps would take on a slow CPU core,
plus ten minutes for start-up and data. `steps` is a trial's epochs × steps per epoch (a
hypergradient arm's tuning task: its meta-iterations × 3 passes of its T steps). The sweep
computes it only once a trial has run `DEFAULT_TIMEOUT_BASE_S` (`worker.sweep`), so a study
whose trials end sooner never pays for the trace.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.spec_base import MAX_TRIAL_TIMEOUT_S, given_options

if TYPE_CHECKING:
    from worker.spec import ArmSpec, StudySpec
    from worker.tasks import Task

__all__ = [
    "ASSUMED_FLOPS_PER_S",
    "DEFAULT_TIMEOUT_BASE_S",
    "MIN_STEP_S",
    "ArmFootprint",
    "Footprint",
    "arm_footprint",
    "arm_footprints",
    "default_trial_timeout_s",
    "model_footprint",
    "task_footprint",
    "warm_up",
]

BYTES_PER_VALUE = 4  # float32
STATE_COPIES = 4  # weights, gradients and up to two optimizer state tensors per parameter
STEP_PASSES = 3  # a training step: the forward pass, and a backward pass of about twice its work
DEFAULT_TIMEOUT_BASE_S = 600.0
ASSUMED_FLOPS_PER_S = 1e10  # a slow CPU core on small kernels
MIN_STEP_S = 0.002  # a step's fixed cost (Python, kernel launches), whatever its FLOPs
TIMEOUT_FACTOR = 10


@dataclass(frozen=True)
class Footprint:
    """One training step of one trial (see the module docstring)."""

    parameters: int
    activations: int  # values the leaf modules output for one batch
    inputs: int  # values of one batch of inputs
    flops: int  # one step: forward and backward

    @property
    def memory_bytes(self) -> int:
        values = self.activations + self.inputs + STATE_COPIES * self.parameters
        return BYTES_PER_VALUE * values


@dataclass(frozen=True)
class ArmFootprint:
    """An arm's step, and the most trials one of its tasks trains together."""

    index: int
    footprint: Footprint
    cohort: int

    @property
    def task_memory_bytes(self) -> int:
        return self.cohort * self.footprint.memory_bytes


def _leaf_flops(module: Any, out: Any) -> int:
    from torch import nn

    values = int(out.numel())
    if isinstance(module, nn.Linear):
        return 2 * values * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
        return 2 * values * kernel
    return values


def _trace(net: Any, input_shape: tuple[int, ...], batch_size: int, flat: bool) -> Footprint:
    """One batch through `net` (made on the meta device, in eval mode), every leaf counted."""
    import torch

    counts = {"activations": 0, "flops": 0}

    def hook(module: Any, _inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            counts["activations"] += int(out.numel())
            counts["flops"] += _leaf_flops(module, out)

    leaves = [m for m in net.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    shape = (math.prod(input_shape),) if flat else input_shape
    try:
        with torch.no_grad():
            net(torch.empty((batch_size, *shape), device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return Footprint(
        parameters=sum(int(p.numel()) for p in net.parameters()),
        activations=counts["activations"],
        inputs=batch_size * math.prod(input_shape),
        flops=STEP_PASSES * counts["flops"],
    )


@functools.lru_cache(maxsize=256)
def task_footprint(task: Task, data: str, given: str, batch_size: int) -> Footprint:
    """The step of the model `task` builds for these data options and model options (both as
    canonical JSON), on batches of `batch_size` (flattened for vector models, as the runner
    feeds them), traced on the meta device. Any task's model: built-in or a plugin's."""
    import torch

    options = json.loads(data)
    shape = task.shape(options)
    with torch.device("meta"):
        net = task.build(options, json.loads(given)).eval()
    return _trace(net, tuple(shape.input_shape), batch_size, task.flat_input(options))


@functools.lru_cache(maxsize=256)
def model_footprint(
    model: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    options: tuple[Any, ...],
    batch_size: int,
    flat: bool,
) -> Footprint:
    """`task_footprint` of a built-in model by name (`worker.tasks.build_model`; `options` =
    width, depth, activation, transformed)."""
    import torch

    from worker.tasks import build_model

    width, depth, activation, transformed = options
    with torch.device("meta"):
        net = build_model(
            model, input_shape, n_classes,
            width=width, depth=depth, activation=activation, transformed=transformed,
        ).eval()  # fmt: skip
    return _trace(net, input_shape, batch_size, flat)


def _arm_footprint(spec: StudySpec, arm: ArmSpec) -> Footprint:
    from worker.tasks import get_task

    data = json.dumps(spec.data.model_dump(), sort_keys=True)
    given = json.dumps(given_options(spec.arm_model(arm)), sort_keys=True)
    return task_footprint(get_task(spec.task), data, given, spec.data.batch_size)


def arm_footprint(spec: StudySpec, index: int) -> ArmFootprint:
    """Arm `index`'s step and largest cohort (1 for tuners that train one trial per task)."""
    from worker.arms.optuna.checks import largest_cohort
    from worker.arms.optuna.spec import OptunaArmSpec

    arm = spec.arms[index]
    cohort = largest_cohort(spec, arm) if isinstance(arm, OptunaArmSpec) else 1
    return ArmFootprint(index, _arm_footprint(spec, arm), cohort)


def arm_footprints(spec: StudySpec) -> list[ArmFootprint]:
    """Every arm's `arm_footprint`."""
    return [arm_footprint(spec, index) for index in range(len(spec.arms))]


def _trial_steps(spec: StudySpec, arm: ArmSpec) -> int:
    from worker.arms.hypergradient.spec import HypergradientArmSpec

    if isinstance(arm, HypergradientArmSpec):  # one task tunes: meta-iterations × 3 passes
        steps = arm.run_steps(spec.budget) or spec.budget.epochs * spec.steps_per_epoch()
        return spec.budget.trials_per_arm * STEP_PASSES * steps
    return spec.budget.epochs * spec.steps_per_epoch()


def default_trial_timeout_s(spec: StudySpec) -> float:
    """The timeout of a trial (per cohort member) whose spec sets none; see the module
    docstring. The largest over the study's arms."""
    longest = 0.0
    for item in arm_footprints(spec):
        step_s = max(item.footprint.flops / ASSUMED_FLOPS_PER_S, MIN_STEP_S)
        longest = max(longest, _trial_steps(spec, spec.arms[item.index]) * step_s)
    return min(DEFAULT_TIMEOUT_BASE_S + TIMEOUT_FACTOR * longest, MAX_TRIAL_TIMEOUT_S)


def warm_up() -> None:
    """Trace a small convolutional network once: a process's first meta-device convolution and
    BatchNorm load PyTorch's meta kernels (1.0 s and 3.0 s timed once on the loaded 2-core
    machine, `time.perf_counter` around each), which a service does before a submit needs
    them."""
    model_footprint("vgg", (3, 8, 8), 2, (1, None, "relu", False), 2, False)
