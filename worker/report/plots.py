"""The plots researchers judge schemes by, rendered with matplotlib (Agg) to PNG or SVG bytes.

- `sensitivity`: objective vs learning rate (log axis) per arm; completed trials as dots joined
  in rate order, pruned trials hollow, diverged trials as crosses on the axis edge at their rate
  (their objective is the metric's worst value, which would flatten the plot), and the final
  seeds' mean ± std as an error bar at the best rate.
- `curves`: validation metric per epoch of each arm's final seeds, mean line and min–max band.
- `factors`: per-layer factors over training of each layer-wise arm's first final seed (the
  sweep's best trial when no final seed exists), one line per parameter named as the model
  names it, with its module and shape (`0.weight (Linear, 32×40)`: `worker.report.layers`),
  log scale.
- `profile`: a performance profile ρ_s(τ) across tasks (see `worker.report.stats`); each
  arm's legend says on how many of the tasks it was run.

Matplotlib is not thread-safe: its mathtext parser (log-axis tick labels such as
`$\\mathdefault{10^{-2}}$`) and font caches are shared module state, and concurrent renders in
the API's threads failed with `ParseException`. Every public function here therefore draws
under one process-wide lock (`_MPL_LOCK`), on a `Figure` of its own (never pyplot's global
figure registry). Renders in one process run one at a time; callers cache the bytes
(`service.plots`) so that an unchanged plot is not drawn again.
"""

from __future__ import annotations

import functools
import io
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from worker.report.layers import parameter_labels

if TYPE_CHECKING:
    from worker.results import TrialRecord
    from worker.spec import StudySpec

__all__ = ["PLOTS", "curves", "factors", "profile", "render", "sensitivity"]

FORMATS = {"png": "image/png", "svg": "image/svg+xml"}

_MPL_LOCK = threading.RLock()
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `function` holding the matplotlib lock (re-entrant: a plot may call another)."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _MPL_LOCK:
            return function(*args, **kwargs)

    return wrapper


def _axes(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _finish(fig: Figure, fmt: str) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format=fmt, dpi=110)
    return buffer.getvalue()


def _by_arm(trials: Sequence[TrialRecord], role: str) -> dict[str, list[TrialRecord]]:
    grouped: dict[str, list[TrialRecord]] = defaultdict(list)
    for t in trials:
        if t.role == role:
            grouped[t.arm].append(t)
    return grouped


def _lr(t: TrialRecord) -> float | None:
    value = t.params.get("lr", t.user_attrs.get("lr"))
    return float(value) if value is not None else None


def _points(
    trials: Sequence[TrialRecord], outcome: str, need_value: bool = True
) -> list[tuple[float, float]]:
    """(rate, value) of the trials with `outcome` (value 0.0 stands in when not needed)."""
    points = []
    for t in trials:
        rate = _lr(t)
        if t.outcome != outcome or rate is None or (need_value and t.value is None):
            continue
        points.append((rate, float(t.value) if t.value is not None else 0.0))
    return points


@_locked
def sensitivity(spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    metric = spec.objective.metric
    fig, ax = _axes((7, 4.2))
    sweep, final = _by_arm(trials, "sweep"), _by_arm(trials, "final")
    finite = [
        t.value for t in trials if t.value is not None and t.outcome in ("complete", "pruned")
    ]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    edge = (
        low - 0.05 * (high - low or 1)
        if spec.objective.maximize
        else high + 0.05 * (high - low or 1)
    )
    for index, label in enumerate(spec.labels):
        color = f"C{index % 10}"
        arm_trials = sweep.get(label, [])
        done = sorted(_points(arm_trials, "complete"))
        if done:
            ax.plot(*zip(*done, strict=True), "o-", color=color, ms=4, lw=1, label=label)
        pruned = _points(arm_trials, "pruned")
        if pruned:
            ax.plot(*zip(*pruned, strict=True), "o", mfc="none", color=color, ms=5)
        diverged = [rate for rate, _ in _points(arm_trials, "diverged", need_value=False)]
        if diverged:
            ax.plot(diverged, [edge] * len(diverged), "x", color=color, ms=7, mew=2)
        seeds = [t.value for t in final.get(label, []) if t.value is not None]
        rates = [r for t in final.get(label, []) if (r := _lr(t)) is not None]
        if seeds and rates:
            mean = sum(seeds) / len(seeds)
            std = math.sqrt(sum((v - mean) ** 2 for v in seeds) / max(1, len(seeds) - 1))
            ax.errorbar([rates[0]], [mean], yerr=[std], fmt="D", color=color, ms=7, capsize=4)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(f"{spec.name}: rate sensitivity (× diverged, ○ pruned, ◆ final seeds)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _finish(fig, fmt)


def _history(t: TrialRecord, key: str) -> list[tuple[int, float]]:
    return [
        (int(h["epoch"]), float(h[key]))
        for h in t.user_attrs.get("history", [])
        if h.get(key) is not None and math.isfinite(float(h[key]))
    ]


@_locked
def curves(spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    metric = spec.objective.metric if spec.objective.metric.startswith("val_") else "val_loss"
    fig, ax = _axes((7, 4.2))
    final = _by_arm(trials, "final")
    for index, label in enumerate(spec.labels):
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for t in final.get(label, []):
            for epoch, value in _history(t, metric):
                per_epoch[epoch].append(value)
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
        color = f"C{index % 10}"
        ax.plot(epochs, mean, "-", color=color, label=f"{label} (n={len(final[label])})")
        ax.fill_between(
            epochs, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
            color=color, alpha=0.2,
        )  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{spec.name}: learning curves of the best rate (final seeds)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _finish(fig, fmt)


def _factor_trial(label: str, trials: Sequence[TrialRecord], maximize: bool) -> TrialRecord | None:
    final = [t for t in trials if t.arm == label and t.role == "final"]
    if final:
        return min(final, key=lambda t: t.number)
    sweep = [
        t for t in trials if t.arm == label and t.outcome == "complete" and t.value is not None
    ]
    if not sweep:
        return None
    pick = max if maximize else min
    return pick(sweep, key=lambda t: float(t.value or 0.0))


@_locked
def factors(spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    labels = [
        label for label in spec.labels
        if any(t.arm == label and t.user_attrs.get("layer_factors") for t in trials)
    ]  # fmt: skip
    rows = max(1, len(labels))
    fig = Figure(figsize=(7, 3.2 * rows))
    axes = fig.subplots(rows, 1, squeeze=False)
    if not labels:
        axes[0][0].text(0.5, 0.5, "no layer-wise arm in this study", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, label in zip(axes[:, 0], labels, strict=False):
        trial = _factor_trial(label, trials, spec.objective.maximize)
        record = (trial.user_attrs.get("layer_factors") if trial else None) or {}
        names, values = record.get("names", []), record.get("values", [])
        readable = parameter_labels(spec, label, names)  # `0.weight (Linear, 32×40)`
        for j, name in enumerate(names):
            series = [row[j] for row in values]
            ax.plot(range(1, len(values) + 1), series, label=readable.get(name, name))
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("factor (rate / lr)")
        ax.set_title(f"{label}: per-layer factors")
        ax.grid(True, which="both", alpha=0.3)
        if names:
            ax.legend(fontsize=6, ncol=2)
    return _finish(fig, fmt)


@_locked
def profile(
    data: Mapping[str, Sequence[float]],
    taus: Sequence[float],
    fmt: str = "png",
    ran: Mapping[str, Sequence[str]] | None = None,
    n_tasks: int | None = None,
) -> bytes:
    """ρ_s(τ) per arm; with `ran` and `n_tasks` each legend entry says on how many tasks the
    arm was run (its fractions are of those tasks only)."""
    fig, ax = _axes((7, 4.2))
    for index, (scheme, rho) in enumerate(sorted(data.items())):
        label = scheme
        if ran is not None and n_tasks is not None:
            label = f"{scheme} (run on {len(ran.get(scheme, []))} of {n_tasks} tasks)"
        ax.step(taus, rho, where="post", color=f"C{index % 10}", label=label)
    ax.set_xlabel("τ = 1 + relative gap to the task's best arm")
    ax.set_ylabel("fraction of its tasks within τ")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("performance profile across tasks")
    ax.grid(True, alpha=0.3)
    if data:
        ax.legend(fontsize=8)
    return _finish(fig, fmt)


PLOTS: dict[str, Any] = {"sensitivity": sensitivity, "curves": curves, "factors": factors}


@_locked
def render(kind: str, spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    """One of the study plots (`PLOTS`) as bytes in `fmt` (png or svg)."""
    if kind not in PLOTS:
        raise ValueError(f"plot: must be one of {', '.join(PLOTS)}, got {kind!r}")
    result: bytes = PLOTS[kind](spec, trials, fmt)
    return result
