"""The one definition of every recorded statistic: names, order, edge cases, and the kernels (torch, numpy).

A tensor is read once, as a 2-D view ``(items, neurons)`` (per-neuron statistics: the neurons of an activation
are its last axis, or the channels; of a parameter its output units; a tensor without per-neuron statistics is
one neuron). Its **partial sums** are computed per neuron in one set of reductions, and every statistic is
derived from them (:func:`batch_from_partials`, :func:`neurons_from_partials`); nothing reads the tensor again.
Kernels: numpy (:func:`partials_numpy`); torch on the CPU, plain sums (:func:`sums_torch`) turned into partial
sums (:func:`partials_from_sums`), with :func:`partials_torch` (deviations) where the sum of squares would
lose the variance and :func:`masked_partials_torch` for non-finite values; on an accelerator the last two.

Partial sums, per neuron, over its items (``PARTIAL_NAMES``, in this order):

* ``count``: finite elements; ``sum``, ``m2`` (sum of squared deviations from the neuron's own mean) and
  ``abs_sum`` over them; ``min`` / ``max`` over them (+inf / -inf without any);
* ``zeros``, ``nans``, ``infs``: counts over all elements.

Batch statistics (``STAT_NAMES``), over the finite elements unless said otherwise:

* ``mean``; ``std`` with correction 1 (0 for one finite element); ``abs_mean``; ``min``; ``max``; ``l2``
  (Euclidean norm); all NaN when no element is finite; the variance combines the neurons' ``m2`` exactly
  (Chan et al.'s pairwise formula), so a large offset costs no precision;
* ``zero_frac`` (over all elements; NaN for an empty tensor), ``nan_count``, ``inf_count``, ``numel``;
* ``update_ratio``: ‖update‖ / ‖weight before the update‖ (inf for a zero weight and a non-zero update, 0
  for both zero), filled in by the caller; NaN otherwise.

Per-neuron statistics (``NEURON_STAT_NAMES``): ``mean``, ``std`` (correction 1; 0 for one item), ``abs_mean``
and ``l2`` (the square root of the neuron's sum of squares, e.g. the per-output-unit norm of an update), over
the finite items; NaN for a neuron without a finite item. Stores written before ``l2`` existed read it as NaN.

Edge cases, the same in every kernel and on every path (tests/test_stats.py): integer and bool tensors are
read as float64 / float32, half and bfloat16 as float32; derivation is in float64, so values near the
float32 limit (1e30) give finite statistics; an empty tensor has ``numel`` 0, zero counts and NaN elsewhere.

>>> import numpy as np
>>> p = partials_numpy(np.array([[1.0, 2.0], [3.0, np.nan]]))          # 2 items x 2 neurons
>>> row = batch_from_partials(p[None], 4, np)[0]
>>> [float(row[STAT_INDEX[k]]) for k in ("mean", "nan_count", "numel")]
[2.0, 1.0, 4.0]
>>> [round(v, 4) for v in neurons_from_partials(p, np)[NEURON_STAT_INDEX["l2"]].tolist()]   # sqrt(1 + 9), sqrt(4)
[3.1623, 2.0]
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

STAT_NAMES = (
    "mean",
    "std",
    "abs_mean",
    "min",
    "max",
    "l2",
    "zero_frac",
    "nan_count",
    "inf_count",
    "numel",
    "update_ratio",
)
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}
NEURON_STAT_NAMES = ("mean", "std", "abs_mean", "l2")
NEURON_STAT_INDEX = {name: i for i, name in enumerate(NEURON_STAT_NAMES)}
LEGACY_NEURON_STAT_NAMES = ("mean", "std", "abs_mean")  # stores written before per-neuron l2
PARTIAL_NAMES = ("count", "sum", "m2", "abs_sum", "min", "max", "zeros", "nans", "infs")
N_STATS = len(STAT_NAMES)
N_NEURON_STATS = len(NEURON_STAT_NAMES)
N_PARTIALS = len(PARTIAL_NAMES)
_P = {name: i for i, name in enumerate(PARTIAL_NAMES)}


# ------------------------------------------------------------------------------ derivation (numpy or torch)
def _where(xp: Any, cond: Any, a: Any, b: Any) -> Any:
    return xp.where(cond, a, b)  # numpy and torch agree on where, stack(x, axis), amin(x, axis), sqrt, *_like


def batch_from_partials(p: Any, numel: Any, xp: Any) -> Any:
    """Batch statistics ``(g, N_STATS)`` float64 from partial sums ``(g, N_PARTIALS, neurons)`` (``xp``: numpy
    or torch; ``numel``: all elements of each tensor, a number or a ``(g,)`` array)."""
    p = np.asarray(p, dtype=np.float64) if xp is np else p.double()  # float64 as it is, not copied
    count, total, m2, abs_sum = p[:, _P["count"]], p[:, _P["sum"]], p[:, _P["m2"]], p[:, _P["abs_sum"]]
    n = count.sum(-1)
    one, nan = xp.ones_like(n), xp.full_like(n, math.nan)
    safe = _where(xp, n > 0, n, one)
    mean = total.sum(-1) / safe
    neuron_mean = total / _where(xp, count > 0, count, xp.ones_like(count))
    m2_all = m2.sum(-1) + (count * (neuron_mean - mean[:, None]) ** 2).sum(-1)  # Chan et al.: exact, no offset loss
    m2_all = _where(xp, m2_all > 0, m2_all, xp.zeros_like(n))
    std = _where(xp, n > 1, xp.sqrt(m2_all / _where(xp, n > 1, n - 1, one)), xp.zeros_like(n))
    l2 = xp.sqrt(m2_all + n * mean * mean)
    low, high = xp.amin(p[:, _P["min"]], -1), xp.amax(p[:, _P["max"]], -1)
    columns = [_where(xp, n > 0, c, nan) for c in (mean, std, abs_sum.sum(-1) / safe, low, high, l2)]
    numel = xp.full_like(n, float(numel)) if isinstance(numel, (int, float)) else numel + xp.zeros_like(n)
    zero_frac = p[:, _P["zeros"]].sum(-1) / _where(xp, numel > 0, numel, one)
    columns += [_where(xp, numel > 0, zero_frac, nan), p[:, _P["nans"]].sum(-1), p[:, _P["infs"]].sum(-1), numel, nan]
    return xp.stack(columns, -1)


def combine_columns(p: Any, segments: Any, xp: Any) -> Any:
    """The partial sums ``(N_PARTIALS, columns)`` of many tensors' neurons combined per tensor: ``(n,
    N_PARTIALS)`` float64, as if each tensor were one neuron (``m2`` by Chan et al.'s exact pairwise formula);
    their batch statistics then derive in one call (:func:`batch_from_partials` of ``[..., None]``).

    ``segments`` (:class:`Segments`) says which columns belong to which tensor; numpy reduces each tensor's
    run of columns with ``reduceat``, torch with ``index_add_`` / ``scatter_reduce_`` (no host sync)."""
    p = np.asarray(p, dtype=np.float64) if xp is np else p.double()  # float64 as it is, not copied
    count, total = p[_P["count"]], p[_P["sum"]]
    out = segments.reduce(p, "sum", xp).T.copy() if xp is np else segments.reduce(p, "sum", xp).T.contiguous()
    n_all = out[:, _P["count"]]
    mean = out[:, _P["sum"]] / _where(xp, n_all > 0, n_all, xp.ones_like(n_all))
    neuron_mean = total / _where(xp, count > 0, count, xp.ones_like(count))
    with np.errstate(over="ignore", invalid="ignore"):  # the branch where() does not take may overflow
        of = segments.column_tensor(xp, None if xp is np else p.device)
        spread = _where(xp, count > 0, count * (neuron_mean - mean[of]) ** 2, xp.zeros_like(count))
    out[:, _P["m2"]] += segments.reduce(spread[None], "sum", xp)[0]
    out[:, _P["min"]] = segments.reduce(p[_P["min"]][None], "min", xp)[0]
    out[:, _P["max"]] = segments.reduce(p[_P["max"]][None], "max", xp)[0]
    return out


class Segments:
    """Which tensor each column of a step's partial sums belongs to: every tensor's columns are one run,
    ``widths[i]`` long from column ``starts[i]`` (runs may come in any order; a width may be 0)."""

    def __init__(self, starts: list[int], widths: list[int]) -> None:
        self.n = len(starts)
        self.columns = sum(widths)
        tensor_of = np.zeros(self.columns, dtype=np.int64)
        for i, (start, width) in enumerate(zip(starts, widths)):
            tensor_of[start : start + width] = i
        self.tensor_of = tensor_of
        present = [i for i in sorted(range(self.n), key=starts.__getitem__) if widths[i] > 0]
        self.present = np.array(present, dtype=np.int64)  # tensors with columns, in column order ...
        self.first = np.array([starts[i] for i in present], dtype=np.int64)  # ... and where each run starts
        self._on: dict[Any, Any] = {}

    def column_tensor(self, xp: Any, device: Any = None) -> Any:
        """Per column, its tensor (an index array of ``xp``; torch: on ``device``, made once)."""
        if xp is np:
            return self.tensor_of
        key = ("tensor_of", str(device))
        if key not in self._on:
            self._on[key] = xp.as_tensor(self.tensor_of, device=device)
        return self._on[key]

    def reduce(self, values: Any, how: str, xp: Any) -> Any:
        """``values`` ``(rows, columns)`` reduced over each tensor's columns: ``(rows, n)``; a tensor without
        columns gets the identity (0 for sums, +inf for ``min``, -inf for ``max``)."""
        identity = {"sum": 0.0, "min": math.inf, "max": -math.inf}[how]
        if xp is np:
            out = np.full((values.shape[0], self.n), identity, dtype=np.float64)
            if len(self.present):
                ufunc = {"sum": np.add, "min": np.minimum, "max": np.maximum}[how]
                out[:, self.present] = ufunc.reduceat(values, self.first, axis=1)
            return out
        index = self.column_tensor(xp, values.device)
        out = xp.full((values.shape[0], self.n), identity, dtype=xp.float64, device=values.device)
        if how == "sum":
            return out.index_add_(1, index, values)
        return out.scatter_reduce_(1, index.expand(values.shape[0], -1), values, {"min": "amin", "max": "amax"}[how])


def neurons_from_partials(p: Any, xp: Any) -> Any:
    """Per-neuron statistics ``(..., N_NEURON_STATS, neurons)`` float32 from partial sums ``(..., N_PARTIALS, neurons)``."""
    p = np.asarray(p, dtype=np.float64) if xp is np else p.double()  # float64 as it is, not copied
    count, total, m2 = p[..., _P["count"], :], p[..., _P["sum"], :], p[..., _P["m2"], :]
    one = xp.ones_like(count)
    safe = _where(xp, count > 0, count, one)
    mean = total / safe
    m2 = _where(xp, m2 > 0, m2, xp.zeros_like(m2))
    std = xp.sqrt(m2 / _where(xp, count > 1, count - 1, one))
    block = [mean, std, p[..., _P["abs_sum"], :] / safe, xp.sqrt(m2 + count * mean * mean)]
    nan = xp.full_like(count, math.nan)
    out = xp.stack([_where(xp, count > 0, b, nan) for b in block], -2)
    return out.astype(np.float32) if xp is np else out.float()


# -------------------------------------------------------------------------------------- numpy kernel
def as_float_numpy(a: np.ndarray) -> np.ndarray:
    """float32 and float64 as they are; every other dtype as float64 (exact for the integers of a batch)."""
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def partials_numpy(a2: np.ndarray) -> np.ndarray:
    """Partial sums ``(N_PARTIALS, neurons)`` float64 of a 2-D ``(items, neurons)`` array, over its items."""
    x = as_float_numpy(a2)
    items, k = x.shape
    out = np.zeros((N_PARTIALS, k), dtype=np.float64)
    out[_P["min"]], out[_P["max"]] = np.inf, -np.inf
    if items == 0 or k == 0:
        return out
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, or beyond float32: the masked path below
        total = x.sum(axis=0, dtype=np.float64)
    if np.isfinite(total).all():
        mean = total / items
        dev = x - mean.astype(x.dtype)
        out[_P["count"]] = items
        out[_P["sum"]] = total
        with np.errstate(over="ignore"):
            out[_P["m2"]] = np.einsum("ij,ij->j", dev, dev, dtype=np.float64)
        out[_P["abs_sum"]] = np.abs(x).sum(axis=0, dtype=np.float64)
        out[_P["min"]], out[_P["max"]] = x.min(axis=0), x.max(axis=0)
        out[_P["zeros"]] = items - np.count_nonzero(x, axis=0)
        if np.isfinite(out[_P["m2"]]).all():
            return out
    return _masked_partials_numpy(x)


def _masked_partials_numpy(x: np.ndarray) -> np.ndarray:
    """The general path (non-finite values, or sums beyond float32): over the finite elements, in float64."""
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    count = finite.sum(axis=0)
    xf = np.where(finite, x, 0.0)
    mean = xf.sum(axis=0) / np.maximum(count, 1)
    dev = np.where(finite, x - mean, 0.0)
    out = np.empty((N_PARTIALS, x.shape[1]), dtype=np.float64)
    out[_P["count"]] = count
    out[_P["sum"]] = xf.sum(axis=0)
    out[_P["m2"]] = (dev * dev).sum(axis=0)
    out[_P["abs_sum"]] = np.abs(xf).sum(axis=0)
    out[_P["min"]] = np.where(finite, x, np.inf).min(axis=0)
    out[_P["max"]] = np.where(finite, x, -np.inf).max(axis=0)
    out[_P["zeros"]] = (x == 0).sum(axis=0)
    out[_P["nans"]] = np.isnan(x).sum(axis=0)
    out[_P["infs"]] = np.isinf(x).sum(axis=0)
    return out


def stats_numpy(a: np.ndarray) -> np.ndarray:
    """Batch statistics of an array, ``(N_STATS,)`` float32 (``update_ratio`` NaN)."""
    x = np.asarray(a).reshape(-1, 1)  # one neuron of all the elements
    return batch_from_partials(partials_numpy(x)[None], x.size, np)[0].astype(np.float32)


def update_ratio(l2: Any, ref_l2: Any) -> Any:
    """‖update‖ / ‖weight before the update‖, with the edge cases of the specification: inf for a zero weight
    and a non-zero update, 0 for both zero (NaN stays NaN over a positive weight, 0 over a zero one).

    The one definition for both paths: floats in the writer process (numpy, never torch), 0-d tensors on the
    training side. Floats give a float; numpy arrays an array; torch tensors (either argument; a float beside
    one becomes a tensor on its device) a tensor, computed with ``where`` on the device: no host sync.
    Arrays broadcast against each other.

    >>> update_ratio(1.0, 2.0), update_ratio(1.0, 0.0), update_ratio(0.0, 0.0)
    (0.5, inf, 0.0)
    >>> update_ratio(np.array([1.0, 1.0, 0.0]), np.array([4.0, 0.0, 0.0])).tolist()
    [0.25, inf, 0.0]
    """
    torch = _torch_if_tensor(l2, ref_l2)
    if torch is None and isinstance(l2, (int, float, np.number)) and isinstance(ref_l2, (int, float, np.number)):
        l2, ref_l2 = float(l2), float(ref_l2)  # in float64, like the derivation
        if ref_l2 > 0:
            return l2 / ref_l2
        return math.inf if l2 > 0 else 0.0
    if torch is not None:
        device = next(x.device for x in (l2, ref_l2) if isinstance(x, torch.Tensor))
        l2, ref_l2 = (x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device=device) for x in (l2, ref_l2))
        xp: Any = torch
    else:
        l2, ref_l2, xp = np.asarray(l2), np.asarray(ref_l2), np
    positive = ref_l2 > 0
    ratio = l2 / _where(xp, positive, ref_l2, xp.ones_like(ref_l2))  # no division by zero, even where unused
    edge = _where(xp, l2 > 0, xp.full_like(ratio, math.inf), xp.zeros_like(ratio))
    return _where(xp, positive, ratio, edge)


def _torch_if_tensor(*values: Any) -> Any:
    """The torch module when one of ``values`` is a torch tensor, else None. Looked up among the imported
    modules, never imported: the writer process computes with numpy only and must not pay for torch."""
    torch = sys.modules.get("torch")
    if torch is not None and any(isinstance(v, torch.Tensor) for v in values):
        return torch
    return None


# -------------------------------------------------------------------------------------- torch kernel
def as_float_torch(t: Any) -> Any:
    """The torch twin of :func:`as_float_numpy` (half and bfloat16 as float32: numpy has no bfloat16)."""
    import torch

    x = t.detach()
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32) if x.is_floating_point() or x.dtype == torch.bool or x.element_size() < 4 else x.to(torch.float64)


def partials_torch(x: Any, dim: int) -> Any:
    """Partial sums ``(g, N_PARTIALS, neurons)`` of a float 3-D tensor over its axis ``dim`` (1 or 2; the
    items), assuming finite values: non-finite ones (or sums beyond the dtype's range) show as a non-finite
    ``sum`` or ``m2``, and the caller then takes :func:`masked_partials_torch`.

    Only plain sums, ``amin`` and ``amax`` reduce, each over one scratch buffer the size of ``x`` that is
    reused for the deviations, the absolute values and the signs: measured on this project's CPU, a sum over
    the items axis of an ``(items, neurons)`` activation is 10-20x faster than ``vector_norm`` or a boolean
    count over it (docs/benchmarks.md)."""
    import torch

    items = x.shape[dim]
    total = x.sum(dim)
    scratch = torch.sub(x, (total / max(items, 1)).unsqueeze(dim))
    m2 = scratch.mul_(scratch).sum(dim)
    abs_sum = torch.abs(x, out=scratch).sum(dim)
    nonzero = torch.sign(x, out=scratch).abs_().sum(dim)
    if items == 0:
        low, high = torch.full_like(total, math.inf), torch.full_like(total, -math.inf)
    else:
        low, high = x.amin(dim), x.amax(dim)
    none = torch.zeros_like(total)
    return torch.stack([torch.full_like(total, float(items)), total, m2, abs_sum, low, high, items - nonzero, none, none], 1)


# what sums_torch and the one-pass kernel read, per neuron: the sum and the squares are about ``shift``, a value
# near the neuron's mean (the one-pass kernel: the mean of its first 64 items; sums_torch: 0), so that a mean far
# from 0 costs them no precision (partials_from_sums)
SUM_NAMES = ("sum", "squares", "abs_sum", "nonzero", "min", "max", "shift")


def sums_torch(x: Any, dim: int) -> Any:
    """Plain sums ``(g, len(SUM_NAMES), neurons)`` of a float 3-D tensor over its axis ``dim`` (the items;
    ``shift`` 0), in the fewest passes measured on this project's CPU; :func:`partials_from_sums` turns them into partial
    sums. Passes: the sum; the squares (one ``vector_norm`` where ``dim`` is the contiguous axis, else
    ``mul`` into a scratch buffer and a sum); ``abs`` into the scratch and a sum; ``sign`` of that in place
    and a sum (the non-zero count); ``amin``; ``amax``. ``aminmax``, ``var``, ``vector_norm`` over a
    strided axis and boolean counts were 3-40x slower (docs/benchmarks.md)."""
    import torch

    items = x.shape[dim]
    total = x.sum(dim)
    scratch = torch.empty_like(x)
    if dim == x.dim() - 1 and x.is_contiguous():
        squares = torch.linalg.vector_norm(x, 2, dim).pow_(2)
    else:
        squares = torch.mul(x, x, out=scratch).sum(dim)
    abs_sum = torch.abs(x, out=scratch).sum(dim)
    nonzero = torch.sign(scratch, out=scratch).sum(dim)
    if items == 0:
        low, high = torch.full_like(total, math.inf), torch.full_like(total, -math.inf)
    else:
        low, high = x.amin(dim), x.amax(dim)
    return torch.stack([total, squares, abs_sum, nonzero, low, high, torch.zeros_like(total)], 1)


CANCELLATION_SHARE = 0.1  # m2 from the sum of squares is kept where it is at least this share of that sum


def partials_from_sums(sums: Any, items: Any, xp: Any = None) -> tuple[Any, Any]:
    """Partial sums ``(N_PARTIALS, columns)`` float64 from :func:`sums_torch`'s ``(len(SUM_NAMES), columns)``
    (``items``: each column's item count), and a code per column: 0 exact, 1 ``m2`` lost precision, 2 a
    non-finite value (or a sum beyond float32). ``xp``: numpy or torch (the default), as ``sums`` is.

    With ``S`` and ``Q`` the sum and the sum of squares about the column's ``shift`` ``c``, the sum is
    ``S + items * c`` and ``m2`` is ``Q - S**2 / items``. That difference loses precision where the mean is
    far from ``c`` against the spread (``c`` = 0 and a large offset; the one-pass kernel shifts by the mean of
    the first 64 items, so rarely): below ``CANCELLATION_SHARE`` of ``Q`` the relative error could pass ~10x float32
    rounding, and the caller takes :func:`partials_torch` (sums of deviations) for the tensor instead; for
    code 2, :func:`masked_partials_torch`. NaN and inf make the sums non-finite, so they are found without
    counting them."""
    if xp is None:
        import torch as xp
    sums = np.asarray(sums, dtype=np.float64) if xp is np else sums.double()
    items = np.asarray(items, dtype=np.float64) if xp is np else items.double()
    shifted, squares, abs_sum, nonzero, low, high, shift = (sums[i] for i in range(len(SUM_NAMES)))
    several = items > 1
    zeros = xp.zeros_like(shifted)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: a non-finite column, code 2 below
        m2 = _where(xp, several, squares - shifted * shifted / _where(xp, several, items, xp.ones_like(items)), zeros)
        total = shifted + items * shift
    finite = xp.isfinite(total) & xp.isfinite(squares)
    trusted = (m2 >= CANCELLATION_SHARE * squares) | ~several
    code = xp.where(finite, xp.where(trusted, 0, 1), 2)
    partials = xp.stack([items, total, _where(xp, m2 > 0, m2, zeros), abs_sum, low, high, items - nonzero, zeros, zeros])
    return partials, code


def masked_partials_torch(x: Any, dim: int) -> Any:
    """Partial sums over the finite elements, in float64 (the general, slower path)."""
    import torch

    x = x.double()
    finite = torch.isfinite(x)
    count = finite.sum(dim).double()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xf = torch.where(finite, x, zero)
    total = xf.sum(dim)
    mean = total / count.clamp(min=1)
    dev = torch.where(finite, x - mean.unsqueeze(dim), zero)
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    if x.shape[dim] == 0:
        low, high = torch.full_like(total, math.inf), torch.full_like(total, -math.inf)
    else:
        low, high = torch.where(finite, x, inf).amin(dim), torch.where(finite, x, -inf).amax(dim)
    return torch.stack([
        count, total, (dev * dev).sum(dim), xf.abs().sum(dim), low, high,
        (x == 0).sum(dim).double(), torch.isnan(x).sum(dim).double(), torch.isinf(x).sum(dim).double(),
    ], 1)
