"""Statistics of recorded tensors, computed where the tensor lives, off the training thread.

The training thread only *snapshots* tensors (a clone, so in-place operations later in the forward pass
cannot change what was recorded). The writer thread then turns a step's snapshots into statistics:

* CPU tensors: with numpy on the tensor's memory (no copy), ~2 µs per call, in parallel with training.
* CUDA tensors: with torch on the device; all of a record's results are concatenated and moved to the host
  in one transfer.

Both backends compute the same numbers (tests compare them). Definitions, for the finite elements of the
tensor (``nan_count`` / ``inf_count`` count the others): ``mean``; ``std`` (correction 1, 0 for one
element); ``abs_mean``; ``min``; ``max``; ``l2`` (Euclidean norm); ``zero_frac`` (over all elements);
``numel``; and for an update ``update_ratio`` = ‖update‖ / ‖weight before the update‖.

Per-neuron statistics (``mean``, ``std``, ``abs_mean``) reduce a 2-D view ``(items, neurons)`` over items:
for activations the neurons are the last dimension, for parameters the first.

>>> import numpy as np
>>> s = stats_numpy(np.array([1.0, 2.0, np.nan, 0.0], dtype=np.float32))
>>> named = dict(zip(STAT_NAMES, s.round(3).tolist()))
>>> named["mean"], named["nan_count"], named["zero_frac"]
(1.0, 1.0, 0.25)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from comgra_callbacks.store.format import NEURON_STAT_NAMES, STAT_INDEX, STAT_NAMES

N_STATS = len(STAT_NAMES)
N_NEURON_STATS = len(NEURON_STAT_NAMES)
_I = STAT_INDEX


# ------------------------------------------------------------------------------------------ numpy
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


# ------------------------------------------------------------------------------------------ torch
def stats_torch(t: Any, reference_l2: Any | None = None) -> Any:
    """Batch statistics on the tensor's device: a ``(len(STAT_NAMES),)`` float32 tensor (no host sync)."""
    import torch

    x = t.detach().reshape(-1)
    x = x.to(torch.float64) if not x.is_floating_point() else x.float()
    n = x.numel()
    out = torch.full((N_STATS,), float("nan"), dtype=torch.float32, device=x.device)
    out[_I["numel"]] = float(n)
    if n == 0:
        out[_I["nan_count"]] = 0.0
        out[_I["inf_count"]] = 0.0
        return out
    finite = torch.isfinite(x)
    m = finite.sum()
    nan_count = torch.isnan(x).sum()
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    safe_m = m.clamp(min=1).to(x.dtype)
    mean = xf.sum() / safe_m
    dev = torch.where(finite, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    ss = (dev * dev).sum()
    std = torch.where(m > 1, torch.sqrt(ss / (m - 1).clamp(min=1).to(x.dtype)), torch.zeros((), dtype=x.dtype, device=x.device))
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    l2 = torch.sqrt((ss + m.to(x.dtype) * mean * mean).clamp(min=0))
    nan = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    has = m > 0
    values = [
        torch.where(has, mean, nan),
        torch.where(has, std, nan),
        torch.where(has, xf.abs().sum() / safe_m, nan),
        torch.where(has, torch.where(finite, x, inf).min(), nan),
        torch.where(has, torch.where(finite, x, -inf).max(), nan),
        torch.where(has, l2, nan),
        (x == 0).sum().to(x.dtype) / n,
        nan_count.to(x.dtype),
        (n - m - nan_count).to(x.dtype),
    ]
    out[: len(values)] = torch.stack(values).float()
    if reference_l2 is not None:
        ratio = torch.where(reference_l2 > 0, l2 / reference_l2.clamp(min=1e-38), torch.where(l2 > 0, inf, torch.zeros_like(l2)))
        out[_I["update_ratio"]] = torch.where(has, ratio, nan).float()
    return out


def neurons_torch(t2: Any) -> Any:
    """Per-neuron statistics over axis 0 of a 2-D tensor, on its device: ``(3, t2.shape[1])`` float32."""
    import torch

    x = t2.detach()
    x = x.to(torch.float64) if not x.is_floating_point() else x.float()
    finite = torch.isfinite(x)
    count = finite.sum(dim=0)
    safe = count.clamp(min=1).to(x.dtype)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xf = torch.where(finite, x, zero)
    mean = xf.sum(dim=0) / safe
    dev = torch.where(finite, x - mean, zero)
    var = (dev * dev).sum(dim=0) / (count - 1).clamp(min=1).to(x.dtype)
    abs_mean = xf.abs().sum(dim=0) / safe
    out = torch.stack([mean, var.sqrt(), abs_mean])
    return torch.where(count > 0, out, torch.full_like(out, float("nan"))).float()


# --------------------------------------------------------------------------------------- layout
def neuron_matrix_shape(shape: tuple[int, ...], *, is_parameter: bool) -> tuple[int, int] | None:
    """The 2-D ``(items, neurons)`` view used for per-neuron statistics, or None for a scalar.

    >>> neuron_matrix_shape((8, 5, 16), is_parameter=False)
    (40, 16)
    >>> neuron_matrix_shape((256, 64), is_parameter=True)   # one neuron per output unit
    (64, 256)
    >>> neuron_matrix_shape((8,), is_parameter=False)       # a per-sample vector: one neuron
    (8, 1)
    >>> neuron_matrix_shape((10,), is_parameter=True)       # a bias: one neuron per element
    (1, 10)
    """
    if len(shape) == 0:
        return None
    numel = math.prod(shape)
    if is_parameter:
        out = shape[0]
        return (numel // out if out else 0, out)
    if len(shape) == 1:
        return (shape[0], 1)
    width = shape[-1]
    return (numel // width if width else 0, width)


def neuron_matrix_numpy(a: np.ndarray, *, is_parameter: bool) -> np.ndarray | None:
    """``a`` viewed as ``(items, neurons)`` (a copy only for parameters, which are transposed)."""
    shape = neuron_matrix_shape(tuple(a.shape), is_parameter=is_parameter)
    if shape is None:
        return None
    if is_parameter:
        return a.reshape(a.shape[0], -1).T
    return a.reshape(shape)


def neuron_matrix_torch(t: Any, *, is_parameter: bool) -> Any:
    shape = neuron_matrix_shape(tuple(t.shape), is_parameter=is_parameter)
    if shape is None:
        return None
    if is_parameter:
        return t.reshape(t.shape[0], -1).T
    return t.reshape(shape)
