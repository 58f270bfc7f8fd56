"""One place for the schemes' refusals, so every scheme words them the same way:
`<scheme>: <field>: must be <rule>, got <value>` (`HyperparameterError`) and
`<scheme>: <where>: <why>` for a model it cannot train (`UnsupportedModelError`).

The errors carry their parts (`scheme`, `HyperparameterError.name`, `detail`), so that a caller
that already names the scheme and the field (the worker, which reports a spec's problems under
their field paths) shows the rule alone without parsing the message: the text is for people,
the attributes are the contract. Both are `ValueError`s.

`MAX_MOMENTUM` is the one bound on heavy-ball momentum: the registry's `momentum`
hyperparameters and every momentum scheme's constructor (`require_momentum`) use it, so that a
value the registry accepts always builds.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "MAX_MOMENTUM",
    "HyperparameterError",
    "UnsupportedModelError",
    "require",
    "require_momentum",
    "require_rate",
]

# Momentum 1 never forgets a gradient; 0.999 already averages over ~1000 steps.
MAX_MOMENTUM = 0.999


class HyperparameterError(ValueError):
    """A scheme refuses a hyperparameter: `name` is the field (empty when the error is about
    no single field, e.g. an unknown name) and `detail` the rule it breaks.

    `str()` is `<scheme>: <name>: <detail>` (`<scheme>: <detail>` without a name).
    """

    def __init__(self, scheme: str, name: str, detail: str) -> None:
        super().__init__(f"{scheme}: {name}: {detail}" if name else f"{scheme}: {detail}")
        self.scheme, self.name, self.detail = scheme, name, detail

    def __reduce__(self) -> tuple[type[HyperparameterError], tuple[str, str, str]]:
        # Pickling rebuilds an exception from `args` (the message alone) unless told otherwise;
        # a trial's error crosses processes (Ray) and must arrive as itself, or it is taken for
        # a dead worker and retried.
        return type(self), (self.scheme, self.name, self.detail)


class UnsupportedModelError(ValueError):
    """A scheme cannot train a model (a layer type it does not understand, tied weights, …):
    `detail` says where and why. `str()` is `<scheme>: <detail>`."""

    def __init__(self, scheme: str, detail: str) -> None:
        super().__init__(f"{scheme}: {detail}")
        self.scheme, self.detail = scheme, detail

    def __reduce__(self) -> tuple[type[UnsupportedModelError], tuple[str, str]]:
        return type(self), (self.scheme, self.detail)  # see HyperparameterError.__reduce__


def require(scheme: str, name: str, value: Any, ok: bool, rule: str) -> None:
    """Raise a `HyperparameterError` naming the scheme and the field unless `ok`."""
    if not ok:
        raise HyperparameterError(scheme, name, f"must be {rule}, got {value!r}")


def require_rate(scheme: str, lr: float) -> None:
    """The learning rate every scheme needs: a finite number > 0."""
    require(scheme, "lr", lr, lr > 0 and math.isfinite(lr), "> 0")


def require_momentum(scheme: str, momentum: float) -> None:
    """Heavy-ball momentum in [0, `MAX_MOMENTUM`] (the registry's range for every scheme)."""
    ok = 0.0 <= momentum <= MAX_MOMENTUM
    require(scheme, "momentum", momentum, ok, f"in [0, {MAX_MOMENTUM:g}]")
