"""What the study plots draw, measured on the laid-out figures (`worker.report.plots.figure`,
the `Figure` that `render` saves) with matplotlib's renderer: titles inside the figure, rate
labels that do not overlap, whole-epoch ticks, every arm's diverged crosses visible, and
legends as large as the tick labels."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

from worker.report import plots
from worker.results import TrialRecord
from worker.spec import StudySpec

pytestmark = pytest.mark.slow  # draws figures for seconds

LONG_NAME = (
    "mnist1d-mlp width 256 depth 3: sgd with nesterov momentum vs adam vs bmp, cosine "
    "schedule with warmup, 15 epochs, 5 final seeds (second run after the data fix)"
)


def make_spec(name: str, epochs: int = 3, arms: Sequence[str] = ("sgd", "adam")) -> StudySpec:
    return StudySpec.from_stored(
        {
            "name": name,
            "task": "mnist1d-mlp",
            "arms": [{"optimizer": arm.split("-")[0], "label": arm} for arm in arms],
            "search_space": {"lr": {"low": 1e-6, "high": 10.0, "log": True}},
            "budget": {"trials_per_arm": 8, "epochs": epochs, "final_seeds": 2},
        }
    )


def trial(
    arm: str, lr: float, outcome: str, value: float | None, role: str = "sweep", epochs: int = 3
) -> TrialRecord:
    attrs: dict[str, Any] = {"arm": arm, "lr": lr, "outcome": outcome}
    if value is not None:
        attrs["history"] = [
            {"epoch": e, "val_accuracy": value * e / epochs, "val_loss": 2.0 / e}
            for e in range(1, epochs + 1)
        ]
    if arm == "bmp":
        names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
        attrs["layer_factors"] = {
            "names": names,
            "values": [
                [0.1 * (j + 1) / e for j in range(len(names))] for e in range(1, epochs + 1)
            ],
        }
    state = "COMPLETE" if outcome in ("complete", "diverged") else outcome.upper()
    return TrialRecord(arm, role, 0, state, outcome, value, {"lr": lr}, attrs, {}, None, None)


def sweep(
    arms: Sequence[str], rates: Sequence[float], diverged: Sequence[float]
) -> list[TrialRecord]:
    """Every arm completes at `rates` (its values apart from the other arms') and diverges at
    `diverged`; two final seeds each at the middle rate."""
    trials = []
    for offset, arm in enumerate(arms):
        for i, lr in enumerate(rates):
            trials.append(trial(arm, lr, "complete", 0.3 + 0.04 * i - 0.05 * offset))
        trials += [trial(arm, lr, "diverged", 0.0) for lr in diverged]
        middle = rates[len(rates) // 2]
        trials += [trial(arm, middle, "complete", 0.6 - 0.05 * offset, "final") for _ in range(2)]
    return trials


def renderer(fig: Figure) -> Any:
    return fig.canvas.get_renderer()  # type: ignore[attr-defined]


def inside(box: Bbox, fig: Figure) -> bool:
    outer = fig.bbox
    return bool(
        box.x0 >= outer.x0 and box.x1 <= outer.x1 and box.y0 >= outer.y0 and box.y1 <= outer.y1
    )


@pytest.mark.parametrize("kind", ["sensitivity", "curves"])
@pytest.mark.parametrize("name", ["quick-mnist1d-mlp", LONG_NAME, "x" * 200])
def test_the_title_lies_within_the_figure(kind: str, name: str) -> None:
    fig = plots.figure(kind, make_spec(name), sweep(["sgd", "adam"], [1e-3, 1e-2, 1e-1], [1.0]))
    fig.canvas.draw()
    (ax,) = fig.axes
    box = ax.title.get_window_extent(renderer(fig))
    assert inside(box, fig), (box, fig.bbox)
    assert "".join(ax.title.get_text().split()).startswith("".join(name.split())[:40])
    for label in (ax.xaxis.label, ax.yaxis.label):  # the wrapped title pushed nothing out
        assert inside(label.get_window_extent(renderer(fig)), fig)


def rate_label_boxes(fig: Figure) -> list[Bbox]:
    fig.canvas.draw()
    (ax,) = fig.axes
    return sorted(
        (label.get_window_extent(renderer(fig)) for label in ax.get_xticklabels()
         if label.get_text()),
        key=lambda box: box.x0,
    )  # fmt: skip


CLOSE = [0.1, 0.105, 0.11, 0.115, 0.12]  # a fraction of a decade
SPREAD = [0.03, 0.058, 0.116, 0.23, 0.45]  # a decade and more, from 3e-2


@pytest.mark.parametrize(
    "rates",
    [
        CLOSE,
        SPREAD,
        [0.08, 0.085, 0.09, 0.1, 0.11, 0.12],
        [0.12, 0.13, 0.15, 0.18],  # not even one 1-9 mantissa inside
        [0.01, 0.02, 0.03, 0.05, 0.1, 0.2],
        [1e-4, 4.6e-4, 2.2e-3, 1e-2, 4.6e-2, 0.22, 1.0],
        [1e-6, 1e-4, 1e-2, 1.0, 10.0],
    ],
)
def test_rate_labels_do_not_overlap(rates: list[float]) -> None:
    fig = plots.figure("sensitivity", make_spec("rates"), sweep(["sgd"], rates, []))
    boxes = rate_label_boxes(fig)
    assert len(boxes) >= 2, "a rate axis needs at least two labels to be read"
    for left, right in pairwise(boxes):
        assert left.x1 < right.x0, (left, right)
    (ax,) = fig.axes
    low, high = ax.get_xlim()
    assert low <= min(rates) and max(rates) <= high  # every rate on the axis


@pytest.mark.parametrize("rates", [CLOSE, SPREAD])
def test_matplotlibs_own_log_labels_overlapped_at_these_rates(rates: list[float]) -> None:
    """The check above can fail: matplotlib's default log-axis labels collide here."""
    fig = plots.figure("sensitivity", make_spec("rates"), sweep(["sgd"], rates, []))
    (ax,) = fig.axes
    low, high = ax.get_xlim()
    ax.set_xscale("log")  # back to matplotlib's default locators and formatters
    ax.set_xlim(low, high)
    fig.canvas.draw()
    boxes = sorted(
        (label.get_window_extent(renderer(fig))
         for label in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
         if label.get_text() and low <= label.get_position()[0] <= high),
        key=lambda box: box.x0,
    )  # fmt: skip
    assert any(a.x1 > b.x0 for a, b in pairwise(boxes))


@pytest.mark.parametrize("epochs", [2, 3, 15])
def test_epoch_axes_have_whole_ticks(epochs: int) -> None:
    spec = make_spec("curves", epochs=epochs, arms=("sgd", "bmp"))
    trials = [
        trial(arm, 0.1, "complete", 0.6, "final", epochs) for arm in ("sgd", "bmp") for _ in (1, 2)
    ]
    for kind in ("curves", "factors"):
        fig = plots.figure(kind, spec, trials)
        fig.canvas.draw()
        ax = fig.axes[0]
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2, (kind, ticks)
        assert all(float(t).is_integer() for t in ticks), (kind, ticks)


def diverged_markers(fig: Figure) -> dict[str, Line2D]:
    (ax,) = fig.axes
    return {
        str(line.get_gid()).removeprefix("diverged-"): line
        for line in ax.get_lines()
        if str(line.get_gid()).startswith("diverged-")
    }


@pytest.mark.parametrize("arms", [("sgd", "adam"), ("sgd", "adam", "bmp", "sgd-2")])
@pytest.mark.parametrize("maximize", [True, False])
def test_arms_diverging_at_one_rate_are_all_visible(arms: tuple[str, ...], maximize: bool) -> None:
    spec = make_spec("diverged", arms=arms)
    if not maximize:
        spec = StudySpec.from_stored(
            {
                **spec.model_dump(mode="json"),
                "objective": {"metric": "val_loss", "direction": "minimize"},
            }
        )
    fig = plots.figure("sensitivity", spec, sweep(arms, [1e-3, 1e-2, 0.1], [0.7, 3.0]))
    fig.canvas.draw()
    markers = diverged_markers(fig)
    assert sorted(markers) == sorted(arms)
    (ax,) = fig.axes
    points = {arm: ax.transData.transform(line.get_xydata()) for arm, line in markers.items()}
    colours = {str(line.get_color()) for line in markers.values()}
    assert len(colours) == len(arms)  # told apart by colour
    for arm, line in markers.items():
        size = line.get_markersize() * fig.dpi / 72  # points to pixels
        for other in arms:
            if other == arm:
                continue
            for (x, y), (x2, y2) in zip(points[arm], points[other], strict=True):
                assert abs(x - x2) < 1  # at the same rate
                assert abs(y - y2) >= size, (arm, other, y, y2)  # a marker apart: both seen
    # and below every value drawn (above, for a metric to minimize), inside the axes
    values = [p for line in ax.get_lines() if line.get_gid() is None
              for p in ax.transData.transform(line.get_xydata())[:, 1]]  # fmt: skip
    bottom, top = ax.bbox.y0, ax.bbox.y1
    for xy in points.values():
        for y in xy[:, 1]:
            assert bottom <= y <= top
            assert (y < min(values)) if maximize else (y > max(values))


def legend_of(ax: Axes) -> Legend:
    legend = ax.get_legend()
    assert legend is not None
    return legend


def legend_sizes(fig: Figure) -> list[float]:
    return [float(text.get_fontsize()) for ax in fig.axes for text in legend_of(ax).get_texts()]


def test_legends_are_as_readable_as_the_axes() -> None:
    spec = make_spec("legend", arms=("sgd", "bmp"))
    trials = sweep(["sgd", "bmp"], [1e-3, 1e-2, 0.1], [1.0])
    for kind in ("sensitivity", "curves", "factors"):
        fig = plots.figure(kind, spec, trials)
        fig.canvas.draw()
        sizes = legend_sizes(fig)
        assert sizes, kind
        tick = float(fig.axes[0].get_yticklabels()[0].get_fontsize())
        assert min(sizes) >= 9 and min(sizes) >= tick - 1, (kind, sizes, tick)
        for ax in fig.axes:
            assert inside(legend_of(ax).get_window_extent(renderer(fig)), fig), kind
    factors = plots.figure("factors", spec, trials)
    factors.canvas.draw()
    (ax,) = factors.axes
    legend_box = legend_of(ax).get_window_extent(renderer(factors))
    assert legend_box.x0 >= ax.bbox.x1  # beside the lines, not over them
    assert len(legend_of(ax).get_texts()) == 6  # every tensor of the 3-layer model


def test_the_sensitivity_legend_explains_its_markers() -> None:
    spec = make_spec("key")
    trials = sweep(["sgd", "adam"], [1e-3, 1e-2], [1.0])
    trials.append(trial("sgd", 0.05, "pruned", 0.2))
    fig = plots.figure("sensitivity", spec, trials)
    (ax,) = fig.axes
    texts = [text.get_text() for text in legend_of(ax).get_texts()]
    assert texts[:2] == ["sgd", "adam"]
    assert {"pruned", "final seeds: mean ± std"} <= set(texts)
    assert any(text.startswith("diverged") for text in texts)


def test_render_saves_the_measured_figure() -> None:
    spec = make_spec(LONG_NAME)
    trials = sweep(["sgd", "adam"], [1e-3, 1e-2, 0.1], [1.0])
    svg = plots.render("sensitivity", spec, trials, "svg").decode()
    assert '<g id="diverged-sgd">' in svg and '<g id="diverged-adam">' in svg
    assert plots.render("curves", spec, trials, "png").startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="plot: must be one of"):
        plots.figure("nope", spec, trials)
