"""The numba kernels of :mod:`.fused` (imported only by it, only when numba is installed).

Module-level functions, so that numba's on-disk cache (``cache=True``: ``__pycache__`` next to this file)
finds them again in the next process instead of compiling them anew (~5 s).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from comgra_callbacks.recording.fused import BLOCK

FAST = {"reassoc", "nsz", "contract"}  # re-association (SIMD sums); NaN and inf keep their meaning
jit = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=FAST)
plain = numba.njit(nogil=True, cache=True, boundscheck=False)


@jit
def add_rows(x: Any, i0: int, i1: int, c: Any, s: Any, q: Any, a: Any, z: Any, one: Any, none: Any) -> None:
    for i in range(i0, i1):
        row = x[i]
        for j in range(row.shape[0]):
            v = row[j]
            w = v - c[j]  # about the neuron's first item: no cancellation where the mean dwarfs the spread
            s[j] += w
            q[j] += w * w
            a[j] += abs(v)
            z[j] += one if v != none else none  # in x's dtype: mixed types would not vectorise


@jit
def fold(src: Any, dst: Any) -> None:
    for j in range(src.shape[0]):
        dst[j] += src[j]
        src[j] = 0


@plain
def bounds_rows(bits: Any, shift: int, mask: Any, lo: Any, hi: Any) -> None:
    for i in range(bits.shape[0]):
        row = bits[i]
        for j in range(row.shape[0]):
            v = row[j]
            v = v ^ ((v >> shift) & mask)  # the float's order as a signed integer
            lo[j] = min(lo[j], v)
            hi[j] = max(hi[j], v)


@plain
def bounds_out(x: Any, lo: Any, hi: Any, shift: int, mask: Any, out: Any) -> None:
    """The ordered bits of the bounds back to x's floats, into out[:, 4] (min) and out[:, 5] (max)."""
    g, k = lo.shape
    for b in range(g):
        for j in range(k):
            low = lo[b, j]
            lo[b, j] = low ^ ((low >> shift) & mask)
            high = hi[b, j]
            hi[b, j] = high ^ ((high >> shift) & mask)
    low_f = lo.view(x.dtype)
    high_f = hi.view(x.dtype)
    for b in range(g):
        for j in range(k):
            out[b, 4, j] = low_f[b, j]
            out[b, 5, j] = high_f[b, j]


@plain
def over_rows(x: Any, bits: Any, shift: int, mask: Any, out: Any) -> None:
    """x (g, items, k), ``bits`` its integer view: out (g, 7, k) float64, zeroed (what sums_torch gives, the
    sums and squares about each neuron's first item, which goes into out[:, 6])."""
    g, n, k = x.shape
    acc = [np.zeros(k, dtype=x.dtype) for _ in range(4)]  # separate arrays: LLVM then proves they don't overlap
    one, none = x.dtype.type(1), x.dtype.type(0)
    lo = np.full((g, k), mask, dtype=bits.dtype)
    hi = np.full((g, k), ~mask, dtype=bits.dtype)
    c = np.zeros(k, dtype=x.dtype)
    for b in range(g):
        if n > 0:
            c[:] = x[b, 0]
        for i0 in range(0, n, BLOCK):
            i1 = min(i0 + BLOCK, n)
            add_rows(x[b], i0, i1, c, acc[0], acc[1], acc[2], acc[3], one, none)
            bounds_rows(bits[b, i0:i1], shift, mask, lo[b], hi[b])  # the block again, from the cache
            for m in range(4):
                fold(acc[m], out[b, m])
        for j in range(k):
            out[b, 6, j] = c[j]
    bounds_out(x, lo, hi, shift, mask, out)


@jit
def sums_row(row: Any, c: float) -> tuple[float, float, float, float]:
    """Sum and sum of squares about ``c``, sum of absolute values and non-zero count of one contiguous row,
    in float64."""
    s = 0.0
    q = 0.0
    a = 0.0
    z = 0.0
    for i in range(row.shape[0]):
        v = np.float64(row[i])
        w = v - c
        s += w
        q += w * w
        a += abs(v)
        z += 1.0 if v != 0 else 0.0
    return s, q, a, z


@plain
def bounds_row(bits: Any, shift: int, mask: Any) -> tuple[Any, Any]:
    """The smallest and largest ordered bits of one contiguous row."""
    low = mask
    high = ~mask
    for i in range(bits.shape[0]):
        v = bits[i]
        v = v ^ ((v >> shift) & mask)
        low = min(low, v)
        high = max(high, v)
    return low, high


@plain
def over_cols(x: Any, bits: Any, shift: int, mask: Any, out: Any) -> None:
    """x (g, k, items), ``bits`` its integer view: out (g, 7, k) float64 (what sums_torch gives, about each
    neuron's first item, in out[:, 6]); each row is read for its bounds right after its sums, while it is in
    the cache."""
    g, k, n = x.shape
    lo = np.full((g, k), mask, dtype=bits.dtype)
    hi = np.full((g, k), ~mask, dtype=bits.dtype)
    for b in range(g):
        for j in range(k):
            c = np.float64(x[b, j, 0]) if n > 0 else 0.0
            s, q, a, z = sums_row(x[b, j], c)
            out[b, 0, j] = s
            out[b, 1, j] = q
            out[b, 2, j] = a
            out[b, 3, j] = z
            out[b, 6, j] = c
            lo[b, j], hi[b, j] = bounds_row(bits[b, j], shift, mask)
    bounds_out(x, lo, hi, shift, mask, out)
