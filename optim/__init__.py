"""ratebench's training algorithms: pure PyTorch, usable without the rest of ratebench.

`build(name, model, **hyperparameters)` makes any registered scheme; `SCHEMES` describes each
scheme's hyperparameters (type, default, valid range, sweep scale). The optimizers can also be
used directly: `BackMatching` (`bmp`), `BackMatchingExact` (`bmp_exact`), `LARS`, `LAMB`;
`Residual` is the residual block that back-matching understands. `TransformedBlock` and
`transformed_mlp` build networks of transformed tanh units with linear shortcuts (any scheme
trains them; `update_transformations(model)` re-centres their units); `optim.hypergrad` learns
learning-rate schedules by reversible training; `Schedule` is the fixed schedules' multiplier
of `lr` (constant, cosine, linear, step, with a linear warm-up), for `LambdaLR`.

A scheme that refuses a hyperparameter raises `HyperparameterError` (its `scheme`, `name` and
`detail` say what and why), one that cannot train a model `UnsupportedModelError`; both are
`ValueError`s.
"""

from optim._checks import HyperparameterError, UnsupportedModelError
from optim.backmatching import BackMatching, BackMatchingExact
from optim.lamb import LAMB
from optim.lars import LARS
from optim.registry import SCHEMES, Hyperparameter, Scheme, build, scheme, validate
from optim.residual import Residual
from optim.schedules import SCHEDULES, Schedule
from optim.transformed import (
    TransformationScheduler,
    TransformedBlock,
    TransformedTanh,
    tanh_mlp,
    transformed_mlp,
    update_transformations,
)

__all__ = [
    "LAMB",
    "LARS",
    "SCHEDULES",
    "SCHEMES",
    "BackMatching",
    "BackMatchingExact",
    "Hyperparameter",
    "HyperparameterError",
    "Residual",
    "Schedule",
    "Scheme",
    "TransformationScheduler",
    "TransformedBlock",
    "TransformedTanh",
    "UnsupportedModelError",
    "build",
    "scheme",
    "tanh_mlp",
    "transformed_mlp",
    "update_transformations",
    "validate",
]
