"""The plots researchers judge schemes by, rendered with matplotlib (Agg) to PNG or SVG bytes.

- `sensitivity`: objective vs learning rate (log axis) per arm; completed trials as dots joined
  in rate order, pruned trials hollow, diverged trials as crosses below the axis's data at
  their rate (their objective is the metric's worst value, which would flatten the plot), one
  row of crosses per arm so that arms diverging at the same rate do not hide each other, and
  the final seeds' mean ± std as an error bar at the best rate. The rate axis is labelled as
  densely as its labels fit without overlapping (decades, or 1-2-5, or every digit when the
  rates are close).
- `curves`: validation metric per epoch of each arm's final seeds, mean line and min–max band.
- `factors`: per-layer factors over training of each layer-wise arm's first final seed (the
  sweep's best trial when no final seed exists), one line per parameter named as the model
  names it, with its module and shape (`0.weight (Linear, 32×40)`: `worker.report.layers`),
  log scale, the legend beside the axes at the size of the tick labels.

Epoch axes have integer ticks only (a 2-epoch curve has no epoch 1.5). A title longer than its
figure is wide (a study's name is up to 200 characters) is wrapped onto more lines instead of
running off the figure: `figure` gives the drawn `Figure`, which the tests measure.
- `profile`: a performance profile ρ_s(τ) across tasks (see `worker.report.stats`); each
  arm's legend says on how many of the tasks it was run.

Matplotlib is not thread-safe: its mathtext parser (log-axis tick labels such as
`$\\mathdefault{10^{-2}}$`) and font caches are shared module state, and concurrent renders in
the API's threads failed with `ParseException`. Every public function here therefore draws
under one process-wide lock (`_MPL_LOCK`), on a `Figure` of its own (never pyplot's global
figure registry). Renders in one process run one at a time; callers cache the bytes
(`service.plots`) so that an unchanged plot is not drawn again.

A study's name is the user's text, drawn as it is (`parse_math=False`): read as mathtext, a
name with `$…$` would change the title or, malformed, fail every plot of the study.
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from worker.report.layers import parameter_labels

if TYPE_CHECKING:
    from worker.results import TrialRecord
    from worker.spec import StudySpec

__all__ = ["PLOTS", "curves", "factors", "figure", "profile", "render", "sensitivity"]

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


LEGEND_SIZE = 9  # points: the tick labels' 10 less a little, readable at the page's width
_DIVERGED_ROW = 0.07  # of the data's span: the gap between two arms' rows of diverged crosses


def _axes(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = _figure(figsize)
    return fig, fig.subplots()


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure with its own Agg canvas: laying it out measures text with a real renderer."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _layout(fig: Figure) -> Figure:
    """Tight layout, then every axes title wrapped until it lies within the figure (a title is
    centred on its axes, which the y label pushes right, so it may have less room on one side
    than the figure's half-width), then layout again for the taller titles."""
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in fig.axes:
        title = ax.title
        text = title.get_text()
        width = len(text)
        while width > 8:
            box = title.get_window_extent(renderer)
            margin = 0.01 * fig.bbox.width
            if box.x0 >= fig.bbox.x0 + margin and box.x1 <= fig.bbox.x1 - margin:
                break
            width = min(width - 1, int(width * 0.9))
            title.set_text(textwrap.fill(text, width))
    fig.tight_layout()
    return fig


def _finish(fig: Figure, fmt: str) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    buffer = io.BytesIO()
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


def _rate_label(rate: float, _position: float | None = None) -> str:
    """`0.003`, `0.12`, `1e-05`: short, and plain text (no mathtext to parse)."""
    return f"{rate:.3g}"


def _rate_tick_choices(low: float, high: float) -> list[list[float]]:
    """Tick sets for a log rate axis from `low` to `high`, densest first: every mantissa
    1…9, then 1-2-5, then decades, then every 2nd, 3rd, … decade; for a range without two
    such ticks (0.12 to 0.18), evenly spaced round rates first."""

    def within(candidates: Sequence[float]) -> list[float]:
        return sorted({float(f"{t:.3g}") for t in candidates if low <= t <= high})

    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    decades = range(first, last + 1)
    choices = [
        within([m * 10.0**e for e in decades for m in mantissas])
        for mantissas in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 5), (1,))
    ]
    choices += [within([10.0**e for e in decades if e % stride == 0]) for stride in (2, 3, 5, 10)]
    if len(choices[0]) < 3:
        even = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
        choices.insert(0, within([t for t in even if t > 0]))
    return [ticks for ticks in choices if ticks] or [[low]]


def _rate_axis(fig: Figure, ax: Axes) -> None:
    """Label the log rate axis with the densest tick set (`_rate_tick_choices`) whose labels do
    not overlap at the figure's laid-out size; minor ticks stay, unlabelled."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_rate_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    low, high = ax.get_xlim()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ticks in _rate_tick_choices(low, high):
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        fig.canvas.draw()
        boxes = sorted(
            (label.get_window_extent(renderer) for label in ax.get_xticklabels()
             if label.get_text()),
            key=lambda box: box.x0,
        )  # fmt: skip
        gap = 0.4 * LEGEND_SIZE * fig.dpi / 72  # about an "n" between two labels
        if all(left.x1 + gap <= right.x0 for left, right in pairwise(boxes)):
            return  # else the sparsest set stays


def _epoch_axis(ax: Axes) -> None:
    """Epochs are whole: a 2-epoch run has no tick at 1.5."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_key(ax: Axes, pruned: bool, diverged: bool) -> None:
    """The markers' meaning as grey legend entries (they were in the title, which they made
    too long for the figure)."""
    grey = "0.35"
    ax.plot([], [], "D", color=grey, ms=6, label="final seeds: mean ± std")
    if pruned:
        ax.plot([], [], "o", mfc="none", color=grey, ms=5, label="pruned")
    if diverged:
        ax.plot([], [], "x", color=grey, ms=7, mew=2, label="diverged (below the data)")


def _sensitivity_figure(spec: StudySpec, trials: Sequence[TrialRecord]) -> Figure:
    metric = spec.objective.metric
    fig, ax = _axes((7, 4.2))
    sweep, final = _by_arm(trials, "sweep"), _by_arm(trials, "final")
    finite = [
        t.value for t in trials if t.value is not None and t.outcome in ("complete", "pruned")
    ]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = high - low or 1.0
    sign = -1.0 if spec.objective.maximize else 1.0  # which way is "worse than every value"
    edge = low if spec.objective.maximize else high
    any_pruned = any_diverged = False
    diverged_row = 0
    for index, label in enumerate(spec.labels):
        color = f"C{index % 10}"
        arm_trials = sweep.get(label, [])
        done = sorted(_points(arm_trials, "complete"))
        if done:
            ax.plot(*zip(*done, strict=True), "o-", color=color, ms=4, lw=1, label=label)
        pruned = _points(arm_trials, "pruned")
        if pruned:
            any_pruned = True
            ax.plot(*zip(*pruned, strict=True), "o", mfc="none", color=color, ms=5)
        diverged = [rate for rate, _ in _points(arm_trials, "diverged", need_value=False)]
        if diverged:
            # one row per arm, so that two arms diverging at one rate are both seen
            any_diverged = True
            diverged_row += 1
            row = edge + sign * _DIVERGED_ROW * diverged_row * span
            ax.plot(diverged, [row] * len(diverged), "x", color=color, ms=7, mew=2,
                    gid=f"diverged-{label}")  # fmt: skip
        seeds = [t.value for t in final.get(label, []) if t.value is not None]
        rates = [r for t in final.get(label, []) if (r := _lr(t)) is not None]
        if seeds and rates:
            mean = sum(seeds) / len(seeds)
            std = math.sqrt(sum((v - mean) ** 2 for v in seeds) / max(1, len(seeds) - 1))
            ax.errorbar([rates[0]], [mean], yerr=[std], fmt="D", color=color, ms=7, capsize=4)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(f"{spec.name}: rate sensitivity", parse_math=False)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        _legend_key(ax, any_pruned, any_diverged)
        ax.legend(fontsize=LEGEND_SIZE)
    if ax.has_data():
        _rate_axis(fig, ax)
    return _layout(fig)


@_locked
def sensitivity(spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    return _finish(_sensitivity_figure(spec, trials), fmt)


def _history(t: TrialRecord, key: str) -> list[tuple[int, float]]:
    return [
        (int(h["epoch"]), float(h[key]))
        for h in t.user_attrs.get("history", [])
        if h.get(key) is not None and math.isfinite(float(h[key]))
    ]


def _curves_figure(spec: StudySpec, trials: Sequence[TrialRecord]) -> Figure:
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
    _epoch_axis(ax)
    ax.set_ylabel(metric)
    ax.set_title(f"{spec.name}: learning curves of the best rate (final seeds)", parse_math=False)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=LEGEND_SIZE)
    return _layout(fig)


@_locked
def curves(spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    return _finish(_curves_figure(spec, trials), fmt)


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


def _factors_figure(spec: StudySpec, trials: Sequence[TrialRecord]) -> Figure:
    labels = [
        label for label in spec.labels
        if any(t.arm == label and t.user_attrs.get("layer_factors") for t in trials)
    ]  # fmt: skip
    rows = max(1, len(labels))
    # wider than the other plots: the legend stands beside the axes, not over the lines
    fig = _figure((9, 3.4 * rows))
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
        _epoch_axis(ax)
        ax.set_ylabel("factor (rate / lr)")
        ax.set_title(f"{label}: per-layer factors", parse_math=False)
        ax.grid(True, which="both", alpha=0.3)
        if names:
            ax.legend(fontsize=LEGEND_SIZE, ncol=1 + len(names) // 13,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # fmt: skip
    return _layout(fig)


@_locked
def factors(spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    return _finish(_factors_figure(spec, trials), fmt)


@_locked
def profile(
    data: Mapping[str, Sequence[float]],
    taus: Sequence[float],
    fmt: str = "png",
    ran: Mapping[str, Sequence[str]] | None = None,
    n_tasks: int | None = None,
    measure: str = "score",
) -> bytes:
    """ρ_s(τ) per arm; with `ran` and `n_tasks` each legend entry says on how many tasks the
    arm was run (its fractions are of those tasks only). `measure`: what τ is a ratio of
    (`score`: 1 + gap to the best; `time`, `steps`: to the target, over the fastest arm's)."""
    fig, ax = _axes((7, 4.2))
    for index, (scheme, rho) in enumerate(sorted(data.items())):
        label = scheme
        if ran is not None and n_tasks is not None:
            label = f"{scheme} (run on {len(ran.get(scheme, []))} of {n_tasks} tasks)"
        ax.step(taus, rho, where="post", color=f"C{index % 10}", label=label)
    ax.set_xlabel(
        "τ = 1 + relative gap to the task's best arm"
        if measure == "score"
        else f"τ = {measure} to target / the task's fastest arm's"
    )
    ax.set_ylabel("fraction of its tasks within τ")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        "performance profile across tasks"
        + ("" if measure == "score" else f", {measure} to target")
    )
    ax.grid(True, alpha=0.3)
    if data:
        ax.legend(fontsize=LEGEND_SIZE)
    return _finish(_layout(fig), fmt)


PLOTS: dict[str, Any] = {"sensitivity": sensitivity, "curves": curves, "factors": factors}
_FIGURES: dict[str, Callable[[StudySpec, Sequence[TrialRecord]], Figure]] = {
    "sensitivity": _sensitivity_figure,
    "curves": _curves_figure,
    "factors": _factors_figure,
}


@_locked
def figure(kind: str, spec: StudySpec, trials: Sequence[TrialRecord]) -> Figure:
    """One of the study plots (`PLOTS`) as the laid-out matplotlib `Figure` that `render`
    saves, for measuring what was drawn (title and legend extents, ticks, markers)."""
    if kind not in _FIGURES:
        raise ValueError(f"plot: must be one of {', '.join(PLOTS)}, got {kind!r}")
    return _FIGURES[kind](spec, trials)


@_locked
def render(kind: str, spec: StudySpec, trials: Sequence[TrialRecord], fmt: str = "png") -> bytes:
    """One of the study plots (`PLOTS`) as bytes in `fmt` (png or svg)."""
    if kind not in PLOTS:
        raise ValueError(f"plot: must be one of {', '.join(PLOTS)}, got {kind!r}")
    result: bytes = PLOTS[kind](spec, trials, fmt)
    return result
