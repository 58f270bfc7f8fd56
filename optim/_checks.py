"""One place for the optimizers' argument errors, so every scheme words them the same way:
`<scheme>: <field>: must be <rule>, got <value>` (the service shows these to users as is)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["require", "require_rate"]


def require(scheme: str, name: str, value: Any, ok: bool, rule: str) -> None:
    """Raise ValueError naming the scheme and the field unless `ok`."""
    if not ok:
        raise ValueError(f"{scheme}: {name}: must be {rule}, got {value!r}")


def require_rate(scheme: str, lr: float) -> None:
    """The learning rate every scheme needs: a finite number > 0."""
    require(scheme, "lr", lr, lr > 0 and math.isfinite(lr), "> 0")
