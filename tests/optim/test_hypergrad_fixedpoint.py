"""Exact fixed-point arithmetic and the information buffer: reversibility and its cost in bits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optim.hypergrad.fixedpoint import (
    GAMMA_BITS,
    RADIX_BITS,
    FixedArray,
    InfoBuffer,
    fraction_numerator,
    fraction_value,
)

gammas = st.floats(min_value=1e-4, max_value=0.9999)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    steps=st.lists(gammas, min_size=1, max_size=60),
    scale=st.sampled_from([1e-12, 1e-3, 1.0, 100.0]),
)
def test_multiplications_and_additions_reverse_bit_for_bit(
    seed: int, steps: list[float], scale: float
) -> None:
    rng = np.random.default_rng(seed)
    x = FixedArray.from_float(rng.normal(size=37) * scale)
    start = x.ints.copy()
    buffer = InfoBuffer(37)
    numerators = [fraction_numerator(g) for g in steps]
    additions = [rng.normal(size=37) * scale for _ in steps]
    for n, a in zip(numerators, additions, strict=True):
        x.mul_fraction(n, buffer)
        x.sub(a)
    for n, a in zip(reversed(numerators), reversed(additions), strict=True):
        x.add(a)
        x.div_fraction(n, buffer)
    np.testing.assert_array_equal(x.ints, start)
    assert buffer.is_empty()


def test_multiplication_is_close_to_the_real_product() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=1000)
    x = FixedArray.from_float(values)
    n = fraction_numerator(0.9)
    x.mul_fraction(n, InfoBuffer(1000))
    error = np.abs(x.to_float() - values * fraction_value(n))
    assert error.max() <= n * 2.0**-RADIX_BITS + 2.0**-RADIX_BITS
    assert error.max() > 0  # the popped bits are not the exact product's


def test_buffer_grows_by_log2_of_one_over_gamma_bits() -> None:
    rng = np.random.default_rng(1)
    x = FixedArray.from_float(rng.normal(size=500))
    buffer = InfoBuffer(500)
    numerators = [fraction_numerator(g) for g in rng.uniform(0.5, 0.99, size=300)]
    for n in numerators:
        x.mul_fraction(n, buffer)
    expected = 500 * sum(math.log2(2**GAMMA_BITS / n) for n in numerators)
    assert buffer.info_bits() == pytest.approx(expected, rel=0.01)
    assert buffer.nbytes() == 500 * 8 + 4 * buffer.words
    assert 32 * buffer.words <= expected


def test_fraction_is_the_nearest_representable_momentum() -> None:
    n = fraction_numerator(0.9)
    assert abs(fraction_value(n) - 0.9) <= 2.0 ** -(GAMMA_BITS + 1)
    assert fraction_numerator(1e-12) == 2
    assert fraction_numerator(1 - 1e-12) == 2**GAMMA_BITS - 1
    with pytest.raises(ValueError, match="momentum"):
        fraction_numerator(1.0)


def test_popping_more_than_was_pushed_is_an_error() -> None:
    buffer = InfoBuffer(3)
    with pytest.raises(RuntimeError, match="information buffer"):
        buffer.pop_uniform(GAMMA_BITS)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 2.0 ** (63 - RADIX_BITS)])
def test_values_outside_the_fixed_point_range_overflow(bad: float) -> None:
    with pytest.raises(OverflowError, match="fixed point"):
        FixedArray.from_float(np.array([0.5, bad]))
