"""Statistics with numpy, for the writer process (which never imports torch).

The same definitions as :mod:`comgra_callbacks.recording.reduce` (tests hold both to the same numbers):
over the finite elements ``mean``, ``std`` (correction 1), ``abs_mean``, ``min``, ``max``, ``l2``;
``zero_frac`` over all elements; ``nan_count``, ``inf_count``, ``numel``.

>>> s = stats_numpy(np.array([1.0, 2.0, np.nan, 0.0], dtype=np.float32))
>>> named = dict(zip(STAT_NAMES, s.round(3).tolist()))
>>> named["mean"], named["nan_count"], named["zero_frac"]
(1.0, 1.0, 0.25)
"""

from __future__ import annotations

import math

import numpy as np

from comgra_callbacks.store.format import STAT_INDEX, STAT_NAMES

N_STATS = len(STAT_NAMES)
_I = STAT_INDEX


def _as_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float32 or a.dtype == np.float64:
        return a
    return a.astype(np.float64)


def stats_numpy(a: np.ndarray, reference_l2: float | None = None) -> np.ndarray:
    """Batch statistics of an array, ``(len(STAT_NAMES),)`` float32."""
    out = np.full(N_STATS, np.nan, dtype=np.float64)
    x = _as_float(np.asarray(a)).reshape(-1)
    n = x.size
    out[_I["numel"]] = n
    if n == 0:
        out[_I["nan_count"]] = out[_I["inf_count"]] = 0.0
        return out.astype(np.float32)
    total = float(x.sum())  # numpy sums pairwise: float32 accumulation is accurate to ~1e-7 relative
    if math.isfinite(total):
        finite = x
        out[_I["nan_count"]] = 0.0
        out[_I["inf_count"]] = 0.0
    else:  # rare: count the non-finite values and describe the rest
        nan_mask = np.isnan(x)
        inf_mask = np.isinf(x)
        out[_I["nan_count"]] = float(nan_mask.sum())
        out[_I["inf_count"]] = float(inf_mask.sum())
        finite = x[~(nan_mask | inf_mask)]
        total = float(finite.sum())
    out[_I["zero_frac"]] = (n - np.count_nonzero(x)) / n
    m = finite.size
    if m:
        mean = total / m
        dev = finite - finite.dtype.type(mean)
        ss = float(np.dot(dev, dev))
        out[_I["mean"]] = mean
        out[_I["std"]] = math.sqrt(ss / (m - 1)) if m > 1 else 0.0
        out[_I["abs_mean"]] = float(np.abs(finite).sum()) / m
        out[_I["min"]] = float(finite.min())
        out[_I["max"]] = float(finite.max())
        l2 = math.sqrt(max(ss + m * mean * mean, 0.0))
        out[_I["l2"]] = l2
        if reference_l2 is not None:
            out[_I["update_ratio"]] = l2 / reference_l2 if reference_l2 > 0 else np.inf if l2 > 0 else 0.0
    return out.astype(np.float32)


def neurons_numpy(a2: np.ndarray, *, has_nonfinite: bool) -> np.ndarray:
    """Per-neuron statistics over axis 0 of a 2-D array: ``(len(NEURON_STAT_NAMES), a2.shape[1])``."""
    x = _as_float(a2)
    if has_nonfinite:
        mask = np.isfinite(x)
        count = mask.sum(axis=0)
        xf = np.where(mask, x, 0)
        safe = np.maximum(count, 1)
        mean = xf.sum(axis=0, dtype=np.float64) / safe
        dev = np.where(mask, x - mean.astype(x.dtype), 0)
        var = np.einsum("ij,ij->j", dev, dev, dtype=np.float64) / np.maximum(count - 1, 1)
        abs_mean = np.abs(xf).sum(axis=0, dtype=np.float64) / safe
        empty = count == 0
        mean[empty] = var[empty] = abs_mean[empty] = np.nan
    else:
        rows = x.shape[0]
        mean = x.sum(axis=0, dtype=np.float64) / rows
        dev = x - mean.astype(x.dtype)
        var = np.einsum("ij,ij->j", dev, dev, dtype=np.float64) / max(rows - 1, 1)
        abs_mean = np.abs(x).sum(axis=0, dtype=np.float64) / rows
    return np.stack([mean, np.sqrt(var), abs_mean]).astype(np.float32)


def neuron_matrix_numpy(a: np.ndarray, *, is_parameter: bool, axis: int | None = None) -> np.ndarray | None:
    """``a`` viewed as ``(items, neurons)`` (transposed for parameters: one neuron per output unit; the
    neurons on ``axis`` for activations, default the last)."""
    if a.ndim == 0:
        return None
    if is_parameter:
        return a.reshape(a.shape[0], -1).T
    if a.ndim == 1:
        return a.reshape(a.shape[0], 1)
    if axis is not None and axis % a.ndim != a.ndim - 1:
        a = np.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1])
