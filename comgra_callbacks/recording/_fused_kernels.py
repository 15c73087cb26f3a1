"""The numba kernels of :mod:`.fused` (imported only by it, only when numba is installed).

Module-level functions, so that numba's on-disk cache (``cache=True``: ``__pycache__`` next to this file)
finds them again in the next process instead of compiling them anew (~5 s).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from comgra_callbacks.recording.fused import BLOCK

LANES = 128  # columns a long row is read as (sums_row_wide)
# rows at least this long are read so: since sums_row vectorises (block_sums), the lanes are slower below
# ~16 000 items (2 048: 1.21 against 0.63 ns an item), level up to ~128 000, and 4-13 % faster from 2**18 on
WIDE_ROW = 128 * LANES
FAST = {"reassoc", "nsz", "contract"}  # re-association (SIMD sums); NaN and inf keep their meaning
jit = numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=FAST)
plain = numba.njit(nogil=True, cache=True, boundscheck=False)
inline = numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")  # expanded where it is called


@inline
def order(u: Any, shift: Any, mask: Any) -> Any:
    """A float's bits as a signed integer that orders like the float, in the bits' own width: numpy's ufuncs
    keep it, where numba's operators widen integers to int64 (which AVX2 cannot min and max in vectors)."""
    return np.bitwise_xor(u, np.bitwise_and(np.right_shift(u, shift), mask))


@jit
def add_rows(x: Any, bits: Any, i0: int, i1: int, c: Any, s: Any, q: Any, a: Any, z: Any, lo: Any, hi: Any, shift: Any, mask: Any) -> None:
    """Rows ``i0:i1`` of ``x`` (items, k) into each neuron's accumulators, and its bounds (``bits``: x's
    integer view, compared in :func:`order`), in the same pass: a row at a time, x is read as one stream,
    which the hardware prefetches (taking four rows per pass over the accumulators was twice as fast on data
    in the cache, and 1.5x slower on the step's tensors, which come from memory)."""
    one, none = x.dtype.type(1), x.dtype.type(0)
    for i in range(i0, i1):
        row, brow = x[i], bits[i]
        for j in range(row.shape[0]):
            v = row[j]
            w = v - c[j]  # about a first estimate of the mean: no cancellation where the mean dwarfs the spread
            s[j] += w
            q[j] += w * w
            a[j] += abs(v)
            z[j] += one if v != none else none  # in x's dtype: mixed types would not vectorise
            u = order(brow[j], shift, mask)
            lo[j] = u if u < lo[j] else lo[j]
            hi[j] = u if u > hi[j] else hi[j]


@jit
def fold(src: Any, dst: Any) -> None:
    for j in range(src.shape[0]):
        dst[j] += src[j]
        src[j] = 0


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


@jit
def shift_rows(x: Any, first: int, c: Any) -> None:
    """c: the mean of each neuron's first ``first`` items (0 without items), what its sums are taken about."""
    c[:] = 0
    for i in range(first):
        row = x[i]
        for j in range(row.shape[0]):
            c[j] += row[j]
    if first > 0:
        for j in range(c.shape[0]):
            c[j] /= first


@plain
def over_rows(x: Any, bits: Any, shift: int, mask: Any, out: Any) -> None:
    """x (g, items, k), ``bits`` its integer view: out (g, 7, k) float64, zeroed (what sums_torch gives, the
    sums and squares about the mean of each neuron's first BLOCK items, which goes into out[:, 6])."""
    g, n, k = x.shape
    acc = [np.zeros(k, dtype=x.dtype) for _ in range(4)]  # separate arrays: LLVM then proves they don't overlap
    lo = np.full((g, k), mask, dtype=bits.dtype)
    hi = np.full((g, k), ~mask, dtype=bits.dtype)
    c = np.zeros(k, dtype=x.dtype)
    first = min(n, BLOCK)
    for b in range(g):
        shift_rows(x[b], first, c)
        low, high = lo[b], hi[b]
        for i0 in range(0, n, BLOCK):
            add_rows(x[b], bits[b], i0, min(i0 + BLOCK, n), c, acc[0], acc[1], acc[2], acc[3], low, high, shift, mask)
            for m in range(4):
                fold(acc[m], out[b, m])
        for j in range(k):
            out[b, 6, j] = c[j]
    bounds_out(x, lo, hi, shift, mask, out)
    if n == 0:  # no items: the bounds of nothing
        out[:, 4, :] = np.inf
        out[:, 5, :] = -np.inf


@jit
def block_sums(blk: Any, bb: Any, c: Any, shift: Any, mask: Any, low: Any, high: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
    """The sums of one block of a row (at most ``BLOCK`` items) in its dtype, and the bounds so far updated.

    A loop over a block of its own (a slice, from 0 to its length) is what LLVM vectorises: the same loop
    over ``range(i0, min(i0 + BLOCK, n))`` of the whole row stayed scalar (measured: 1.3-1.9 ns an item on
    rows of 128-1 000 items, 0.4-0.6 ns so; the same sums to the bit on rows of 128 and 512)."""
    one, none = blk.dtype.type(1), blk.dtype.type(0)
    bs, bq, ba, bz = none, none, none, none
    for i in range(blk.shape[0]):
        v = blk[i]
        w = v - c
        bs += w
        bq += w * w
        ba += abs(v)
        bz += one if v != none else none  # in x's dtype: mixed types would not vectorise
        u = order(bb[i], shift, mask)
        low = min(low, u)
        high = max(high, u)
    return bs, bq, ba, bz, low, high


@jit
def sums_row(row: Any, bits: Any, c: Any, shift: Any, mask: Any) -> tuple[float, float, float, float, Any, Any]:
    """Sum and sum of squares about ``c`` (in the row's dtype), sum of absolute values and non-zero count of
    one contiguous row, and its smallest and largest ordered bits (``bits``: the row's integer view), in one
    pass. Each ``BLOCK`` items are summed in the row's dtype (:func:`block_sums`: SIMD lanes twice as wide as
    float64's for float32) and folded into float64 totals, as :func:`add_rows` does."""
    s = 0.0
    q = 0.0
    a = 0.0
    z = 0.0
    low = mask
    high = np.bitwise_not(mask)
    for i0 in range(0, row.shape[0], BLOCK):
        bs, bq, ba, bz, low, high = block_sums(row[i0 : i0 + BLOCK], bits[i0 : i0 + BLOCK], c, shift, mask, low, high)
        s += np.float64(bs)
        q += np.float64(bq)
        a += np.float64(ba)
        z += np.float64(bz)
    return s, q, a, z, low, high


@jit
def shift_of(row: Any) -> Any:
    """The mean of a row's first BLOCK items (0 without items), in the row's dtype: what its sums are taken
    about (and what is stored as its ``shift``, so that the sums and the shift agree to the bit)."""
    first = min(row.shape[0], BLOCK)
    c = 0.0
    for i in range(first):
        c += np.float64(row[i])
    return row.dtype.type(c / first if first > 0 else 0.0)


@plain
def sums_row_wide(row: Any, bits: Any, c: Any, shift: Any, mask: Any) -> tuple[float, float, float, float, Any, Any]:
    """:func:`sums_row` of a long row, read as ``LANES`` columns by :func:`add_rows` (all about the same ``c``),
    whose sums are then added up: from memory, on rows of 2**18 items or more, 4-13 % faster than
    :func:`sums_row`'s blocks (which it was 3-4x before those vectorised). The float32 sums still cover at most
    ``BLOCK`` items of a lane before they are folded into float64."""
    n = row.shape[0]
    full = n // LANES
    x2 = row[: full * LANES].reshape((full, LANES))
    b2 = bits[: full * LANES].reshape((full, LANES))
    acc = [np.zeros(LANES, dtype=row.dtype) for _ in range(4)]
    tot = [np.zeros(LANES) for _ in range(4)]
    cv = np.full(LANES, c, dtype=row.dtype)
    lo = np.full(LANES, mask, dtype=bits.dtype)
    hi = np.full(LANES, np.bitwise_not(mask), dtype=bits.dtype)
    for i0 in range(0, full, BLOCK):
        add_rows(x2, b2, i0, min(i0 + BLOCK, full), cv, acc[0], acc[1], acc[2], acc[3], lo, hi, shift, mask)
        for m in range(4):
            fold(acc[m], tot[m])
    s, q, a, z, low, high = sums_row(row[full * LANES :], bits[full * LANES :], c, shift, mask)  # the rest of the row
    for j in range(LANES):
        s += tot[0][j]
        q += tot[1][j]
        a += tot[2][j]
        z += tot[3][j]
        low = lo[j] if lo[j] < low else low
        high = hi[j] if hi[j] > high else high
    return s, q, a, z, low, high


@plain
def over_cols(x: Any, bits: Any, shift: Any, mask: Any, out: Any) -> None:
    """x (g, k, items), ``bits`` its integer view: out (g, 7, k) float64 (what sums_torch gives, about the mean
    of each neuron's first BLOCK items, in out[:, 6]); each row is read once, for its sums and its bounds."""
    g, k, n = x.shape
    lo = np.full((g, k), mask, dtype=bits.dtype)
    hi = np.full((g, k), ~mask, dtype=bits.dtype)
    for b in range(g):
        for j in range(k):
            c = shift_of(x[b, j])
            if n >= WIDE_ROW:
                s, q, a, z, lo[b, j], hi[b, j] = sums_row_wide(x[b, j], bits[b, j], c, shift, mask)
            else:
                s, q, a, z, lo[b, j], hi[b, j] = sums_row(x[b, j], bits[b, j], c, shift, mask)
            out[b, 0, j] = s
            out[b, 1, j] = q
            out[b, 2, j] = a
            out[b, 3, j] = z
            out[b, 6, j] = c
    bounds_out(x, lo, hi, shift, mask, out)
    if n == 0:  # no items: the bounds of nothing
        out[:, 4, :] = np.inf
        out[:, 5, :] = -np.inf


@plain
def derive(sums: Any, items: float, share: float, c0: int, partials: Any, code: Any, neurons: Any) -> None:
    """What ``stats.partials_from_sums`` and ``stats.neurons_from_partials`` give, for one group's sums
    ``(g, 7, k)`` (each column with ``items`` items), written into the step's columns ``c0`` on (``b * k + j``):
    ``partials`` (9, columns) float64, ``code`` (columns,) (0 exact, 1 ``m2`` lost precision, 2 non-finite)
    and ``neurons`` (4, columns) float32. The same formulas in the same order; tests/test_stats.py holds
    both to one reference."""
    g, _, k = sums.shape
    n = items
    several = n > 1
    for b in range(g):
        for j in range(k):
            c = c0 + b * k + j
            shifted = sums[b, 0, j]
            squares = sums[b, 1, j]
            m2 = squares - shifted * shifted / n if several else 0.0
            total = shifted + n * sums[b, 6, j]
            if not (np.isfinite(total) and np.isfinite(squares)):
                code[c] = 2
            elif several and not (m2 >= share * squares):
                code[c] = 1
            else:
                code[c] = 0
            m2 = m2 if m2 > 0 else 0.0
            partials[0, c] = n
            partials[1, c] = total
            partials[2, c] = m2
            partials[3, c] = sums[b, 2, j]
            partials[4, c] = sums[b, 4, j]
            partials[5, c] = sums[b, 5, j]
            partials[6, c] = n - sums[b, 3, j]
            partials[7, c] = 0.0
            partials[8, c] = 0.0
            if n > 0:
                mean = total / n
                neurons[0, c] = mean
                neurons[1, c] = np.sqrt(m2 / (n - 1 if n > 1 else 1.0))
                neurons[2, c] = sums[b, 2, j] / n
                neurons[3, c] = np.sqrt(m2 + n * mean * mean)
            else:
                for m in range(4):
                    neurons[m, c] = np.nan


@plain
def rows_derived(x: Any, bits: Any, shift: int, mask: Any, out: Any, share: float, c0: int, partials: Any, code: Any, neurons: Any) -> None:
    """over_rows, then derive (one call: numba's dispatch costs ~20 us a call)."""
    over_rows(x, bits, shift, mask, out)
    derive(out, float(x.shape[1]), share, c0, partials, code, neurons)


@plain
def cols_derived(x: Any, bits: Any, shift: int, mask: Any, out: Any, share: float, c0: int, partials: Any, code: Any, neurons: Any) -> None:
    """over_cols, then derive."""
    over_cols(x, bits, shift, mask, out)
    derive(out, float(x.shape[2]), share, c0, partials, code, neurons)

