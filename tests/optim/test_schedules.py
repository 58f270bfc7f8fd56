"""Learning-rate schedules (`optim.schedules`): the invariants of the formulas, property-tested
over random lengths, warm-ups, floors and milestones, and the schedule applied to an optimizer
through `LambdaLR` as the runner applies it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optim.schedules import SCHEDULES, Schedule

_TOTAL = st.integers(min_value=1, max_value=5000)
_FLOOR = st.floats(min_value=0.0, max_value=1.0)
_FACTOR = st.floats(min_value=1e-3, max_value=1.0)


@st.composite
def _with_warmup(draw: st.DrawFn) -> tuple[int, int]:
    """(total steps, warm-up steps shorter than training)."""
    total = draw(st.integers(min_value=2, max_value=5000))
    return total, draw(st.integers(min_value=1, max_value=total - 1))


@st.composite
def _milestones(draw: st.DrawFn) -> tuple[float, ...]:
    points = draw(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=4, unique=True))
    return tuple(sorted(points))


@settings(max_examples=200, deadline=None)
@given(total=_TOTAL, data=st.data())
def test_constant_is_one_at_every_step(total: int, data: st.DataObject) -> None:
    schedule = Schedule(total)
    assert schedule.is_constant
    step = data.draw(st.integers(0, total))
    assert schedule(step) == 1.0


@settings(max_examples=200, deadline=None)
@given(lengths=_with_warmup(), name=st.sampled_from(["constant", "cosine", "linear"]), f=_FLOOR)
def test_the_warmup_rises_linearly_and_reaches_one_at_its_end(
    lengths: tuple[int, int], name: str, f: float
) -> None:
    total, warmup = lengths
    schedule = Schedule(total, name, warmup, floor=f)  # type: ignore[arg-type]
    ramp = [schedule(s) for s in range(warmup)]
    assert ramp[0] == pytest.approx(1 / warmup) and ramp[0] > 0  # no step at rate 0
    assert ramp[-1] == 1.0  # the warm-up's last step runs at the full rate
    assert all(b > a for a, b in itertools.pairwise(ramp))
    assert all(r == pytest.approx((s + 1) / warmup) for s, r in enumerate(ramp))
    assert schedule(warmup) == 1.0  # the decay starts from the peak


@settings(max_examples=200, deadline=None)
@given(total=_TOTAL, f=_FLOOR, data=st.data())
def test_cosine_ends_at_its_floor_and_never_rises(
    total: int, f: float, data: st.DataObject
) -> None:
    warmup = data.draw(st.integers(0, total - 1))
    schedule = Schedule(total, "cosine", warmup, floor=f)
    assert schedule(total) == pytest.approx(f, abs=1e-12)  # after the last step: the floor
    decay = [schedule(s) for s in range(warmup, total + 1)]
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(decay))
    assert all(f - 1e-12 <= m <= 1.0 for m in decay)
    middle = warmup + (total - warmup) / 2
    if middle == int(middle):  # halfway through the decay: halfway between peak and floor
        assert schedule(int(middle)) == pytest.approx((1 + f) / 2, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(total=_TOTAL, f=_FLOOR, data=st.data())
def test_linear_decays_by_equal_steps_to_its_floor(
    total: int, f: float, data: st.DataObject
) -> None:
    warmup = data.draw(st.integers(0, total - 1))
    schedule = Schedule(total, "linear", warmup, floor=f)
    assert schedule(total) == pytest.approx(f, abs=1e-12)
    decay = [schedule(s) for s in range(warmup, total + 1)]
    drops = [a - b for a, b in itertools.pairwise(decay)]
    assert all(d == pytest.approx((1 - f) / (total - warmup), abs=1e-12) for d in drops)


@settings(max_examples=100, deadline=None)
@given(total=st.integers(10, 2000), milestones=_milestones(), factor=_FACTOR)
def test_step_drops_by_its_factor_at_each_milestone_and_only_there(
    total: int, milestones: tuple[float, ...], factor: float
) -> None:
    schedule = Schedule(total, "step", milestones=milestones, factor=factor)
    assert schedule(0) == 1.0
    for step in range(1, total + 1):
        landing = sum(math.ceil(mu * total) == step for mu in milestones)  # first step at μ·T
        assert schedule(step) / schedule(step - 1) == pytest.approx(factor**landing, rel=1e-9)
    assert schedule(total) == pytest.approx(factor ** len(milestones), rel=1e-12)


def test_milestones_on_one_step_drop_together() -> None:
    schedule = Schedule(10, "step", milestones=(0.51, 0.55), factor=0.5)
    assert [schedule(s) for s in (5, 6)] == [1.0, 0.25]


def test_a_milestone_inside_the_warmup_multiplies_the_ramp() -> None:
    schedule = Schedule(100, "step", warmup_steps=20, milestones=(0.1,), factor=0.1)
    assert schedule(9) == pytest.approx(10 / 20)
    assert schedule(10) == pytest.approx(11 / 20 * 0.1)
    assert schedule(19) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "exponential"}, "name"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 11}, "warmup_steps"),
        ({"floor": 1.5}, "floor"),
        ({"factor": 0.0}, "factor"),
        ({"milestones": (0.5, 0.5)}, "milestones"),
        ({"milestones": (1.0,)}, "milestones"),
    ],
)
def test_a_bad_schedule_is_refused_naming_its_field(changes: dict, field: str) -> None:
    arguments = {"total_steps": 10, **changes}
    with pytest.raises(ValueError, match=f"schedule.{field}"):
        Schedule(**arguments)


def test_every_name_with_a_warmup_is_not_constant() -> None:
    for name in SCHEDULES:
        milestones = (0.5,) if name == "step" else ()
        assert not Schedule(10, name, 2, milestones=milestones).is_constant  # type: ignore[arg-type]
    assert Schedule(10, "cosine", floor=1.0).is_constant


def test_lambda_lr_sets_each_step_to_base_times_the_multiplier() -> None:
    """The runner's use: `LambdaLR(optimizer, schedule)`, stepped after each optimizer step,
    gives step s the rate `lr · m(s)`, for every group's own base rate."""
    weight, bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [weight]}, {"params": [bias], "lr": 0.5}], lr=0.1)
    schedule = Schedule(12, "cosine", warmup_steps=3, floor=0.1)
    rates = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(12):
        assert optimizer.param_groups[0]["lr"] == 0.1 * schedule(step)
        assert optimizer.param_groups[1]["lr"] == 0.5 * schedule(step)
        optimizer.step()
        rates.step()
