"""Hypergradients through exactly reversible SGD with momentum (the `hypergradient` tuner).

Maclaurin, Duvenaud, Adams 2015, "Gradient-based Hyperparameter Optimization through
Reversible Learning" (arXiv 1502.03492). Training runs forward in exact fixed-point arithmetic
with an information buffer (`fixedpoint`), runs backwards exactly while back-propagating the
validation loss (`reversible`), and the hyperparameters follow that gradient (`tune`).

    from optim.hypergrad import tune

    result = tune(
        train_x, train_y, val_x, val_y,       # tensors; y are integer class labels
        layer_sizes=[40, 100, 10],            # ReLU MLP, inputs … classes
        steps=500,                            # T, training steps per meta-iteration
        batch_size=64,
        meta_iterations=20,                   # = number of training runs
        meta_lr=0.05,                         # Adam step on log-rates / logit-momenta
        seed=0,                               # initial weights and mini-batch schedule
        blocks=10,                            # schedule resolution: T // blocks steps a block
        learn=("lr",),                        # any of "lr", "momentum", "init_scale", "l2"
        lr=0.1, momentum=0.9, init_scale=1.0, l2=0.0,   # starting values
        callback=on_meta_iteration,           # called with a MetaIteration after every run
    )
    result.best.val_loss, result.best.params(), result.schedule   # best run, flat, lr per block

Any model given functionally (a tuple of float64 base tensors and `loss(params, x, y)`) works
through `Problem`, `Hyperparameters`, `hypergradient` and `tune_problem`;
`unrolled_hypergradient` is the naive autograd reference for problems small enough to unroll.
"""

from optim.hypergrad.fixedpoint import FixedArray, InfoBuffer
from optim.hypergrad.mlp import mlp_base_params, mlp_forward, mlp_loss, mlp_param_names
from optim.hypergrad.problem import BatchSchedule, Hyperparameters, LossFn, Problem
from optim.hypergrad.reversible import (
    HypergradResult,
    TrainingDivergedError,
    TrainState,
    evaluate,
    hypergradient,
)
from optim.hypergrad.tune import KINDS, MetaIteration, TuneResult, tune, tune_problem
from optim.hypergrad.unrolled import unrolled_hypergradient

__all__ = [
    "KINDS",
    "BatchSchedule",
    "FixedArray",
    "HypergradResult",
    "Hyperparameters",
    "InfoBuffer",
    "LossFn",
    "MetaIteration",
    "Problem",
    "TrainState",
    "TrainingDivergedError",
    "TuneResult",
    "evaluate",
    "hypergradient",
    "mlp_base_params",
    "mlp_forward",
    "mlp_loss",
    "mlp_param_names",
    "tune",
    "tune_problem",
    "unrolled_hypergradient",
]
