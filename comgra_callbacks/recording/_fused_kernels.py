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
def add_rows(x: Any, i0: int, i1: int, s: Any, q: Any, a: Any, z: Any, one: Any, none: Any) -> None:
    for i in range(i0, i1):
        row = x[i]
        for j in range(row.shape[0]):
            w = row[j]
            s[j] += w
            q[j] += w * w
            a[j] += abs(w)
            z[j] += one if w != none else none  # in x's dtype: mixed types would not vectorise


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
def over_rows(x: Any, bits: Any, shift: int, mask: Any, out: Any, lo: Any, hi: Any) -> None:
    """x (g, items, k): out (g, 4, k) float64 sums; lo / hi (g, k) ordered bits."""
    g, n, k = x.shape
    acc = [
        np.zeros(k, dtype=x.dtype) for _ in range(4)
    ]  # separate arrays: LLVM then proves they don't overlap
    one, none = x.dtype.type(1), x.dtype.type(0)
    for b in range(g):
        for i0 in range(0, n, BLOCK):
            add_rows(x[b], i0, min(i0 + BLOCK, n), acc[0], acc[1], acc[2], acc[3], one, none)
            for c in range(4):
                fold(acc[c], out[b, c])
        bounds_rows(bits[b], shift, mask, lo[b], hi[b])


@jit
def sums_cols(x: Any, out: Any) -> None:
    """x (g, k, items) contiguous items: out (g, 4, k) float64."""
    g, k, n = x.shape
    for b in range(g):
        for j in range(k):
            row = x[b, j]
            s = 0.0
            q = 0.0
            a = 0.0
            z = 0.0
            for i in range(n):
                w = np.float64(row[i])
                s += w
                q += w * w
                a += abs(w)
                z += 1.0 if w != 0 else 0.0
            out[b, 0, j] = s
            out[b, 1, j] = q
            out[b, 2, j] = a
            out[b, 3, j] = z


@plain
def bounds_cols(bits: Any, shift: int, mask: Any, lo: Any, hi: Any) -> None:
    g, k, n = bits.shape
    for b in range(g):
        for j in range(k):
            row = bits[b, j]
            low = lo[b, j]
            high = hi[b, j]
            for i in range(n):
                v = row[i]
                v = v ^ ((v >> shift) & mask)
                low = min(low, v)
                high = max(high, v)
            lo[b, j] = low
            hi[b, j] = high


def over_cols(x: Any, bits: Any, shift: int, mask: Any, out: Any, lo: Any, hi: Any) -> None:
    """x (g, k, items): out (g, 4, k) float64 sums; lo / hi (g, k) ordered bits."""
    sums_cols(x, out)
    bounds_cols(bits, shift, mask, lo, hi)
