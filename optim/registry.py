"""The scheme registry: one name per learning-rate scheme, its hyperparameters, its constructor.

`SCHEMES` is the single description of what every scheme accepts. The worker validates study
specs against it and builds Optuna search spaces from it; the service lists it at
`GET /api/v1/schemes`. `build(name, model, **hyperparameters)` turns a validated configuration
into a `torch.optim.Optimizer`.

Every scheme takes its base learning rate as `lr`, so a sweep over `lr` means the same thing for
all of them (for layer-wise schemes it is the rate *before* the per-layer factor).

`sgd`, `adam` and `adamw` are PyTorch's own optimizers, not rewritten: a comparison against a
re-implementation would measure the re-implementation. `lars`, `lamb`, `bmp` and `bmp_exact`
are ours (`optim.lars`, `optim.lamb`, `optim.backmatching`).

What `build` hands a constructor: the model itself for `needs_model` schemes (they hook its
layers), `model.named_parameters()` for the other layer-wise schemes (so `layer_factors()` is
keyed by the model's parameter names), and `model.parameters()` for the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from optim._checks import MAX_MOMENTUM, HyperparameterError, require_momentum
from optim.backmatching import BackMatching, BackMatchingExact
from optim.lamb import LAMB
from optim.lars import LARS

__all__ = ["SCHEMES", "Hyperparameter", "Scheme", "build", "scheme", "validate"]

HyperparameterType = Literal["float", "int", "bool"]


@dataclass(frozen=True)
class Hyperparameter:
    """One knob of a scheme: its type, default, valid closed range and usual sweep scale."""

    name: str
    type: HyperparameterType
    default: float | int | bool
    low: float | None = None
    high: float | None = None
    log: bool = False
    help: str = ""
    search: tuple[float, float] | None = None  # the usual sweep range (`"auto"` in a spec)
    # A variant switch: a spec that leaves it out gets today's default written into its arm at
    # submit, so a later change of the default never changes what a stored arm trained with
    # (nor which arms pool on a leaderboard).
    pinned: bool = False

    def check(self, scheme: str, value: Any) -> float | int | bool:
        """Return `value` coerced to this hyperparameter's type, or raise a
        `HyperparameterError` naming it."""

        def refuse(detail: str) -> HyperparameterError:
            return HyperparameterError(scheme, self.name, detail)

        if self.type == "bool":
            if not isinstance(value, bool):
                raise refuse(f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise refuse(f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise refuse(f"must be finite, got {value!r}")
        if self.type == "int":
            if float(value) != int(value):
                raise refuse(f"must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and value < self.low:
            raise refuse(f"must be >= {self.low:g}, got {value:g}")
        if self.high is not None and value > self.high:
            raise refuse(f"must be <= {self.high:g}, got {value:g}")
        return value


Constructor = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class Scheme:
    """A learning-rate scheme: how to build it and what it accepts.

    `needs_model` schemes get the whole `nn.Module` (they hook layers); the others get its
    parameters. `layerwise` schemes expose `layer_factors() -> dict[str, float]`.
    """

    name: str
    summary: str
    constructor: Constructor
    hyperparameters: tuple[Hyperparameter, ...]
    needs_model: bool = False
    layerwise: bool = False
    reference: str = ""
    _by_name: dict[str, Hyperparameter] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {h.name: h for h in self.hyperparameters})

    def hyperparameter(self, name: str) -> Hyperparameter:
        """The hyperparameter called `name`, or a `HyperparameterError` listing the known ones
        (without a field name: the name is what is wrong)."""
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name)
            detail = f"unknown hyperparameter {name!r}; known: {known}"
            raise HyperparameterError(self.name, "", detail) from None

    def defaults(self) -> dict[str, float | int | bool]:
        return {h.name: h.default for h in self.hyperparameters}


def _lr(default: float, search: tuple[float, float]) -> Hyperparameter:
    """`search`: where the scheme's useful rates lie, about four decades around its default
    (a spec's `"lr": "auto"`); the valid range is far wider."""
    return Hyperparameter(
        "lr", "float", default, 1e-7, 100.0, log=True, help="base learning rate", search=search
    )


def _momentum(default: float = 0.0) -> Hyperparameter:
    """Every scheme's momentum has the range its constructor checks (`require_momentum`)."""
    return Hyperparameter(
        "momentum", "float", default, 0.0, MAX_MOMENTUM, help="heavy-ball momentum"
    )


def _weight_decay(default: float = 0.0) -> Hyperparameter:
    return Hyperparameter("weight_decay", "float", default, 0.0, 1.0, help="L2 weight decay")


_NESTEROV = Hyperparameter("nesterov", "bool", False, help="Nesterov momentum (needs momentum>0)")
_BETA1 = Hyperparameter("beta1", "float", 0.9, 0.0, 0.9999, help="first-moment decay")
_BETA2 = Hyperparameter("beta2", "float", 0.999, 0.0, 0.99999, help="second-moment decay")
_EPS = Hyperparameter("eps", "float", 1e-8, 1e-12, 1e-2, log=True, help="denominator epsilon")


def _sgd(params: Any, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> Any:
    require_momentum("sgd", momentum)  # torch.optim.SGD takes any momentum >= 0
    if nesterov and momentum <= 0:
        raise HyperparameterError("sgd", "nesterov", "needs momentum > 0")
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def _adam(
    params: Any, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> Any:
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


def _adamw(
    params: Any, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> Any:
    return torch.optim.AdamW(
        params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
    )


_TORCH_SCHEMES = (
    Scheme(
        "sgd",
        "stochastic gradient descent (torch.optim.SGD)",
        _sgd,
        (_lr(0.05, (1e-4, 1.0)), _momentum(), _weight_decay(), _NESTEROV),
    ),
    Scheme(
        "adam",
        "Adam (torch.optim.Adam)",
        _adam,
        (_lr(1e-3, (1e-5, 1e-1)), _BETA1, _BETA2, _EPS, _weight_decay()),
        reference="Kingma, Ba 2014, arXiv 1412.6980",
    ),
    Scheme(
        "adamw",
        "Adam with decoupled weight decay (torch.optim.AdamW)",
        _adamw,
        (_lr(1e-3, (1e-5, 1e-1)), _BETA1, _BETA2, _EPS, _weight_decay(0.01)),
        reference="Loshchilov, Hutter 2017, arXiv 1711.05101",
    ),
)

_EXCLUDE = Hyperparameter(
    "exclude_bias_and_norm",
    "bool",
    True,
    help="no trust ratio and no weight decay for 1-D tensors (biases, normalisation)",
)

_OUR_SCHEMES = (
    Scheme(
        "lars",
        "layer-wise adaptive rate scaling: SGD with momentum, trust ratio η‖w‖/(‖g‖+β‖w‖)",
        LARS,
        (
            _lr(1.0, (1e-2, 1e2)),  # the trust ratio scales it by η = 1e-3
            _momentum(0.9),
            _weight_decay(5e-4),
            Hyperparameter(
                "trust_coefficient", "float", 1e-3, 1e-6, 1.0, log=True, help="η of the ratio"
            ),
            _EXCLUDE,
        ),
        layerwise=True,
        reference="You, Gitman, Ginsburg 2017, arXiv 1708.03888",
    ),
    Scheme(
        "lamb",
        "layer-wise adaptive moments: Adam step scaled by the trust ratio ‖w‖/‖r‖",
        LAMB,
        (
            _lr(1e-3, (1e-5, 1e-1)),
            _BETA1,
            _BETA2,
            Hyperparameter("eps", "float", 1e-6, 1e-12, 1e-2, log=True, help="denominator ε"),
            _weight_decay(0.01),
            _EXCLUDE,
        ),
        layerwise=True,
        reference="You et al. 2019, arXiv 1904.00962",
    ),
    Scheme(
        "bmp",
        "back-matching layer-wise rates: SGD with lr·(1/s_W) per layer (propagate=true: "
        "times Π(1/s_z above)); BatchNorm folded into the Linear/Conv before it",
        BackMatching,
        (
            _lr(0.05, (1e-4, 1.0)),
            _momentum(),
            _weight_decay(),
            _NESTEROV,
            Hyperparameter(
                "ema", "float", 0.0, 0.0, 0.999, help="running-average decay of the scalars"
            ),
            Hyperparameter(
                "clamp", "float", 1e12, 1.0, 1e15, log=True, help="factor kept in [1/clamp, clamp]"
            ),
            Hyperparameter(
                "warmup_steps", "int", 0, 0, 1e6, help="steps of the geometric ramp 1 → factor"
            ),
            Hyperparameter(
                "propagate",
                "bool",
                False,
                help="multiply in 1/s_z of every block above (the back-matching recursion; "
                "arm label bmp) or not (default: each block's own 1/s_W only, bmp-local)",
                pinned=True,
            ),
            Hyperparameter(
                "mean_over_positions",
                "bool",
                True,
                help="a convolution block's scalars are means over its output positions (read "
                "as samples, like the batch; the default, arm label -mean-positions) or sums, "
                "whose factor shrinks with the input's spatial size",
                pinned=True,
            ),
        ),
        needs_model=True,
        layerwise=True,
        reference="Zhang, Chen, Liu 2018, arXiv 1802.09750",
    ),
    Scheme(
        "bmp_exact",
        "exact back-matching: per-block damped least squares (Linear + activation chains)",
        BackMatchingExact,
        (
            _lr(0.1, (1e-3, 1.0)),  # 1: the exact least-squares step
            Hyperparameter(
                "damping",
                "float",
                0.1,
                0.0,
                1e3,
                help="relative damping: λ = damping × the block's mean Hessian eigenvalue",
            ),
            _momentum(),
            Hyperparameter(
                "split",
                "bool",
                True,
                help="each of the K Linear layers of a chain matches 1/K of the output target "
                "(first order only: with little damping one step can still raise the loss); "
                "false: each matches its whole target (a chain then overshoots about K-fold)",
            ),
        ),
        needs_model=True,
        reference="Zhang, Chen, Liu 2018, arXiv 1802.09750",
    ),
)

SCHEMES: dict[str, Scheme] = {s.name: s for s in (*_TORCH_SCHEMES, *_OUR_SCHEMES)}


def scheme(name: str) -> Scheme:
    """The scheme called `name`, or a ValueError listing the known ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        known = ", ".join(SCHEMES)
        raise ValueError(f"unknown scheme {name!r}; known: {known}") from None


def validate(name: str, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """Complete `hyperparameters` with the scheme's defaults and check every value.

    Raises `HyperparameterError` (a ValueError) naming the scheme and the field for an unknown
    name or an out-of-range value, so callers can show the message to a person unchanged.
    """
    sch = scheme(name)
    values: dict[str, Any] = sch.defaults()
    for key, value in hyperparameters.items():
        values[key] = sch.hyperparameter(key).check(name, value)
    return values


def build(name: str, model: nn.Module, **hyperparameters: Any) -> torch.optim.Optimizer:
    """Build scheme `name` for `model` with validated hyperparameters (defaults filled in)."""
    sch = scheme(name)
    values = validate(name, hyperparameters)
    target: Any
    if sch.needs_model:
        target = model
    elif sch.layerwise:
        target = model.named_parameters()
    else:
        target = model.parameters()
    return sch.constructor(target, **values)
