"""Exact fixed-point arrays and the information buffer that makes multiplication reversible.

Maclaurin, Duvenaud, Adams 2015, "Gradient-based Hyperparameter Optimization through
Reversible Learning" (arXiv 1502.03492), section 3: hold weights and velocities as integers
(`value = int · 2**-RADIX_BITS`) so that additions are exactly undoable, and approximate every
momentum decay `γ` by a fraction `n/d` so that the only lossy operation, `v ← γ·v`, becomes

    x = q·d + r  (r = x mod d)   →   x' = q·n + s,

where `r` is pushed into a per-parameter information buffer and `s ∈ [0, n)` is popped back
out of it ("the bits the multiplication destroys are stored, the bits it frees are reused").
Undoing it runs the same steps backwards: `q, s = divmod(x', n)`, push `s`, pop `r`, `x = q·d+r`.
The buffer grows by `log2(d/n) = log2(1/γ)` bits per parameter per step (0.15 bits at γ = 0.9).

Choices where the paper is silent or where we differ:

- `RADIX_BITS = 52` as in the paper: resolution 2.2e-16; |value| must stay below
  2**(62-52) = 1024 (beyond, `OverflowError`, which training reports as divergence).
- `d = 2**GAMMA_BITS` with `GAMMA_BITS = 16` (the paper's ≈2**16): γ is quantised to a multiple
  of 1.5e-5, `n` clamped to [2, d − 1] so that 0 < γ < 1. The popped `s` is not `r·n/d` but
  any value in [0, n), so `γ·v` is off by up to `n` grid units (≤ 2**-36 ≈ 1.5e-11) — the price
  of storing only log2(1/γ) bits; a larger `d` would trade that error for a finer γ.
- The paper keeps one Python big integer per parameter (`B ← B·d + r`; `s = B mod n`,
  `B ← B div n`), which costs O(size of B) per step. We keep the same information with
  range asymmetric numeral systems (rANS, Duda 2013, arXiv 1311.2540) as used for bits-back
  coding by Townsend, Bird, Barber 2019 (arXiv 1901.04866), vectorised: each parameter owns a
  uint64 head in [2**32, 2**64) and all parameters share one stack of 32-bit words. `r` is
  pushed as a uniform symbol of 2**GAMMA_BITS values; `s` is popped from a distribution over
  `n` values whose integer frequencies (⌊2**32/n⌋ or one more) sum to 2**32 — uniform to
  within 1 part in 2**16, so popping frees log2(n) bits up to a negligible fraction of a bit.
  Every push/pop is O(1) per parameter and the encode/decode pair is an exact bijection, so a
  reversed run restores the buffer to its empty state (head 2**32, no words) as well as every
  weight.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "GAMMA_BITS",
    "RADIX_BITS",
    "FixedArray",
    "InfoBuffer",
    "fraction_numerator",
    "fraction_value",
]

RADIX_BITS = 52
GAMMA_BITS = 16
_D = 1 << GAMMA_BITS
_SCALE = float(1 << RADIX_BITS)
_LIMIT = float(1 << (62 - RADIX_BITS))  # |value| bound that keeps sums inside int64
_LOW = np.uint64(1 << 32)  # rANS head lower bound L; the head lives in [L, 2**32·L)
_WORD = 32
_WORD_MASK = np.uint64(0xFFFFFFFF)
_POP_BITS = 32  # precision of the near-uniform distribution `s` is popped from


def fraction_numerator(gamma: float) -> int:
    """`n` with `n / 2**GAMMA_BITS` the representable value nearest to `gamma`, in [2, d-1]."""
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"momentum: must be in (0, 1), got {gamma!r}")
    return min(max(round(gamma * _D), 2), _D - 1)


def fraction_value(n: int) -> float:
    """The momentum actually applied for numerator `n`: `n / 2**GAMMA_BITS` (exact in float)."""
    return n / _D


def _below_n_table(n: int) -> tuple[int, int, int]:
    """Frequencies of the near-uniform distribution over [0, n): (f0, e, boundary).

    Symbols s < e get frequency f0 + 1, the others f0; they sum to 2**_POP_BITS.
    """
    total = 1 << _POP_BITS
    f0 = total // n
    e = total - f0 * n
    return f0, e, e * (f0 + 1)


class InfoBuffer:
    """Per-element information store: a rANS head per element plus one shared stack of words.

    `push_*` and `pop_*` are exact inverses when called in reverse (LIFO) order.
    """

    def __init__(self, size: int) -> None:
        self.head = np.full(size, _LOW, dtype=np.uint64)
        self._tail = np.zeros(1024, dtype=np.uint32)
        self._words = 0

    # -- the shared word stack -------------------------------------------------------------
    def _append(self, words: np.ndarray) -> None:
        need = self._words + words.size
        if need > self._tail.size:
            grown = np.zeros(max(need, 2 * self._tail.size), dtype=np.uint32)
            grown[: self._words] = self._tail[: self._words]
            self._tail = grown
        self._tail[self._words : need] = words
        self._words = need

    def _take(self, count: int) -> np.ndarray:
        if count > self._words:
            raise RuntimeError(
                f"information buffer: asked for {count} words, holds {self._words}; "
                "pops must mirror earlier pushes"
            )
        self._words -= count
        return self._tail[self._words : self._words + count].astype(np.uint64)

    # -- rANS encode / decode ------------------------------------------------------------------
    def _encode(self, start: np.ndarray, freq: np.ndarray | int, bits: int) -> None:
        x = self.head
        over = x >= (np.uint64(freq) if isinstance(freq, int) else freq) << np.uint64(64 - bits)
        if over.any():
            self._append((x[over] & _WORD_MASK).astype(np.uint32))
            x = x.copy()
            x[over] >>= np.uint64(_WORD)
        if isinstance(freq, int) and freq == 1:
            self.head = (x << np.uint64(bits)) + start
        else:
            self.head = ((x // freq) << np.uint64(bits)) + (x % freq) + start

    def _renormalise(self, x: np.ndarray) -> None:
        under = x < _LOW
        count = int(under.sum())
        if count:
            x[under] = (x[under] << np.uint64(_WORD)) | self._take(count)
        self.head = x

    def push_uniform(self, values: np.ndarray, bits: int) -> None:
        """Store `values`, each in [0, 2**bits), at a cost of `bits` bits each."""
        self._encode(values.astype(np.uint64), 1, bits)

    def pop_uniform(self, bits: int) -> np.ndarray:
        """Inverse of `push_uniform(values, bits)`: returns `values` (uint64)."""
        values = self.head & np.uint64((1 << bits) - 1)
        self._renormalise(self.head >> np.uint64(bits))
        return values

    def push_below(self, values: np.ndarray, n: int) -> None:
        """Store `values`, each in [0, n), at a cost of about log2(n) bits each."""
        f0, e, _ = _below_n_table(n)
        s = values.astype(np.uint64)
        small = s < np.uint64(e)
        freq = np.where(small, np.uint64(f0 + 1), np.uint64(f0))
        start = s * np.uint64(f0) + np.minimum(s, np.uint64(e))
        self._encode(start, freq, _POP_BITS)

    def pop_below(self, n: int) -> np.ndarray:
        """Inverse of `push_below(values, n)`; on fresh bits it yields values in [0, n)."""
        f0, e, boundary = _below_n_table(n)
        c = self.head & np.uint64((1 << _POP_BITS) - 1)
        low = c < np.uint64(boundary)
        # both branches are evaluated; the unused one may wrap around (harmless for uint64)
        s = np.where(
            low, c // np.uint64(f0 + 1), np.uint64(e) + (c - np.uint64(boundary)) // np.uint64(f0)
        )
        freq = np.where(low, np.uint64(f0 + 1), np.uint64(f0))
        start = s * np.uint64(f0) + np.minimum(s, np.uint64(e))
        self._renormalise(freq * (self.head >> np.uint64(_POP_BITS)) + c - start)
        return s

    # -- accounting ------------------------------------------------------------------------------
    @property
    def words(self) -> int:
        """32-bit words on the shared stack."""
        return self._words

    def nbytes(self) -> int:
        """Bytes of information held: the heads plus the words in use on the stack."""
        return int(self.head.nbytes) + 4 * self._words

    def info_bits(self) -> float:
        """Bits of information stored beyond the empty buffer."""
        head_bits = float(np.log2(self.head.astype(np.float64)).sum()) - 32.0 * self.head.size
        return head_bits + 32.0 * self._words

    def is_empty(self) -> bool:
        """True when the buffer holds exactly what a fresh one holds."""
        return self._words == 0 and bool((self.head == _LOW).all())


class FixedArray:
    """An array of exact fixed-point numbers: `value = ints · 2**-RADIX_BITS` (int64)."""

    def __init__(self, ints: np.ndarray) -> None:
        if ints.dtype != np.int64:
            raise ValueError(f"fixed point: ints must be int64, got {ints.dtype}")
        self.ints = ints

    @staticmethod
    def to_ints(values: np.ndarray) -> np.ndarray:
        """Round float64 values to the fixed-point grid; OverflowError when out of range."""
        if not bool(np.all(np.abs(values) < _LIMIT)):  # also catches NaN
            bad = values[~(np.abs(values) < _LIMIT)][0]
            raise OverflowError(f"fixed point: value {bad!r} outside ±{_LIMIT:g}")
        return np.rint(values * _SCALE).astype(np.int64)

    @classmethod
    def from_float(cls, values: np.ndarray | torch.Tensor) -> FixedArray:
        array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
        return cls(cls.to_ints(np.asarray(array, dtype=np.float64).ravel()))

    def to_float(self) -> np.ndarray:
        return self.ints.astype(np.float64) / _SCALE

    def copy(self) -> FixedArray:
        return FixedArray(self.ints.copy())

    def add(self, values: np.ndarray) -> None:
        """`self += values` (rounded onto the grid); undone exactly by `sub(values)`."""
        self.ints = self.ints + self.to_ints(values)
        if not bool(np.all(np.abs(self.ints) < (1 << 62))):
            raise OverflowError("fixed point: sum outside the representable range")

    def sub(self, values: np.ndarray) -> None:
        """`self -= values`; undone exactly by `add(values)`."""
        self.ints = self.ints - self.to_ints(values)
        if not bool(np.all(np.abs(self.ints) < (1 << 62))):
            raise OverflowError("fixed point: difference outside the representable range")

    def mul_fraction(self, n: int, buffer: InfoBuffer) -> None:
        """`self ← self · n / 2**GAMMA_BITS`, remainder bits kept in `buffer`."""
        r = self.ints & (_D - 1)
        q = self.ints >> GAMMA_BITS  # floor division by d (arithmetic shift)
        buffer.push_uniform(r, GAMMA_BITS)
        s = buffer.pop_below(n)
        self.ints = q * n + s.astype(np.int64)

    def div_fraction(self, n: int, buffer: InfoBuffer) -> None:
        """Exact inverse of `mul_fraction(n, buffer)`."""
        q, s = np.divmod(self.ints, n)  # floor semantics: 0 <= s < n
        buffer.push_below(s, n)
        r = buffer.pop_uniform(GAMMA_BITS)
        self.ints = q * _D + r.astype(np.int64)
