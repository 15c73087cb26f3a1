"""Statistics of recorded tensors, computed with torch where the tensors live, for a whole step at once.

The hot path pays per operation (microseconds of dispatch each), so tensors are grouped: all tensors of a
step with the same number of elements (same device) are stacked into one ``(k, n)`` matrix, and each
statistic is one reduction over the group. Only fast reductions are used (``sum``, ``amin``, ``amax``,
a 2-norm, ``sign().abs().sum()`` to count non-zeros). A non-finite value makes its row's sums non-finite;
such rows (rare) are recomputed over their finite elements by :func:`stats_torch`.

Definitions, for the finite elements of the tensor (``nan_count`` / ``inf_count`` count the others):
``mean``; ``std`` (correction 1, 0 for one element); ``abs_mean``; ``min``; ``max``; ``l2`` (Euclidean
norm); ``zero_frac`` (over all elements); ``numel``; and for an update ``update_ratio`` =
‖update‖ / ‖weight before the update‖ (filled in by the caller).

Per-neuron statistics (``mean``, ``std``, ``abs_mean``) reduce a 2-D view ``(items, neurons)`` over items:
for activations the neurons are the last dimension (the channels, axis 1, of convolution-like outputs: the
recorder says which), for parameters the first.

>>> import torch
>>> rows = stats_rows([torch.tensor([1.0, 2.0, float("nan"), 0.0]), torch.tensor([[3.0, 4.0]])])
>>> named = dict(zip(STAT_NAMES, rows[0].tolist()))
>>> named["mean"], named["nan_count"], named["zero_frac"], rows[1, STAT_INDEX["l2"]].item()
(1.0, 1.0, 0.25, 5.0)
"""

from __future__ import annotations

import math
from typing import Any

from comgra_callbacks.store.format import NEURON_STAT_NAMES, STAT_INDEX, STAT_NAMES

N_STATS = len(STAT_NAMES)
N_NEURON_STATS = len(NEURON_STAT_NAMES)
_I = STAT_INDEX
_COLUMNS = ("mean", "std", "abs_mean", "min", "max", "l2", "zero_frac", "nan_count", "inf_count", "numel")


def _as_float(t: Any) -> Any:
    import torch

    x = t.detach()
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32) if x.is_floating_point() or x.dtype == torch.bool or x.element_size() < 4 else x.to(torch.float64)


def stats_rows(tensors: list[Any], *, synchronous: bool | None = None) -> Any:
    """Batch statistics of many tensors: a ``(len(tensors), len(STAT_NAMES))`` float32 tensor on the device
    of the first tensor (``update_ratio`` NaN).

    On the CPU (``synchronous``, the default there) a row whose sums show a non-finite value is recomputed
    over its finite elements. Elsewhere nothing waits for the device: the masked statistics of each group
    are computed too and chosen row by row on the device."""
    import torch

    if not tensors:
        return torch.empty((0, N_STATS), dtype=torch.float32)
    device = tensors[0].device
    groups: dict[tuple[Any, int, Any], list[int]] = {}
    for i, t in enumerate(tensors):
        x = _as_float(t)
        groups.setdefault((x.device, x.numel(), x.dtype), []).append(i)
    rows: list[Any] = [None] * len(tensors)
    for (dev, n, _), members in groups.items():
        if n == 0:
            for i in members:
                rows[i] = stats_torch(tensors[i]).to(device)
            continue
        flat = [_as_float(tensors[i]).reshape(-1) for i in members]
        x = torch.stack(flat) if len(flat) > 1 else flat[0].unsqueeze(0)
        block = _group_stats(x, n)
        if synchronous if synchronous is not None else dev.type == "cpu":
            bad = (~torch.isfinite(block[:, 0] + block[:, 1])).nonzero().reshape(-1)
            if len(bad):  # NaN or inf in those tensors: describe their finite part
                block[bad] = _masked_group_stats(x[bad])
        else:  # on an accelerator, stay asynchronous: compute the masked statistics and choose on the device
            keep = torch.isfinite(block[:, 0] + block[:, 1]).unsqueeze(1)
            block = torch.where(keep, block, _masked_group_stats(x))
        for j, i in enumerate(members):
            rows[i] = block[j].to(device)
    return torch.stack(rows)


def _group_stats(x: Any, n: int) -> Any:
    """Statistics of each row of ``x`` ``(k, n)``, assuming finite values (non-finite ones show in the sums)."""
    import torch

    total = x.sum(dim=1)
    mean = total / n
    deviation = torch.linalg.vector_norm(x - mean.unsqueeze(1), dim=1)
    std = deviation / math.sqrt(n - 1) if n > 1 else torch.zeros_like(mean)
    abs_mean = x.abs().sum(dim=1) / n
    low, high = x.amin(dim=1), x.amax(dim=1)
    nonzero = x.sign().abs().sum(dim=1)
    l2 = torch.sqrt(deviation * deviation + n * mean * mean)
    zeros = torch.zeros_like(mean)
    out = torch.stack([mean, std, abs_mean, low, high, l2, (n - nonzero) / n, zeros, zeros, torch.full_like(mean, float(n))], dim=1)
    nan = torch.full((x.shape[0], N_STATS - out.shape[1]), float("nan"), dtype=out.dtype, device=out.device)
    return torch.cat([out, nan], dim=1).float()


def _masked_group_stats(x: Any) -> Any:
    """Statistics of each row of ``x`` ``(k, n)`` over its finite elements (the general, slower path)."""
    import torch

    n = x.shape[1]
    finite = torch.isfinite(x)
    m = finite.sum(dim=1).to(x.dtype)  # finite elements per row
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xf = torch.where(finite, x, zero)
    safe = m.clamp(min=1)
    mean = xf.sum(dim=1) / safe
    dev = torch.where(finite, x - mean.unsqueeze(1), zero)
    ss = (dev * dev).sum(dim=1)
    std = torch.where(m > 1, torch.sqrt(ss / (m - 1).clamp(min=1)), zero)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    low = torch.where(finite, x, inf).amin(dim=1)
    high = torch.where(finite, x, -inf).amax(dim=1)
    nan_count = torch.isnan(x).sum(dim=1).to(x.dtype)
    columns = [
        mean,
        std,
        xf.abs().sum(dim=1) / safe,
        low,
        high,
        torch.sqrt((ss + m * mean * mean).clamp(min=0)),
    ]
    nan = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    columns = [torch.where(m > 0, c, nan) for c in columns]  # undefined without a finite element
    columns += [(x == 0).sum(dim=1).to(x.dtype) / n, nan_count, n - m - nan_count, torch.full_like(mean, float(n))]
    out = torch.stack(columns, dim=1)
    pad = torch.full((x.shape[0], N_STATS - out.shape[1]), float("nan"), dtype=out.dtype, device=out.device)
    return torch.cat([out, pad], dim=1).float()


def stats_torch(t: Any) -> Any:
    """Batch statistics of one tensor over its finite elements: ``(len(STAT_NAMES),)`` float32 (no host sync).

    The slow, general path: used for tensors holding non-finite values and for empty ones.
    """
    import torch

    x = t.detach().reshape(-1)
    x = x.to(torch.float64) if not x.is_floating_point() else x.float()
    n = x.numel()
    out = torch.full((N_STATS,), float("nan"), dtype=torch.float32, device=x.device)
    out[_I["numel"]] = float(n)
    out[_I["nan_count"]] = 0.0
    out[_I["inf_count"]] = 0.0
    if n == 0:
        return out
    finite = torch.isfinite(x)
    m = finite.sum()
    nan_count = torch.isnan(x).sum()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xf = torch.where(finite, x, zero)
    safe_m = m.clamp(min=1).to(x.dtype)
    mean = xf.sum() / safe_m
    dev = torch.where(finite, x - mean, zero)
    ss = (dev * dev).sum()
    std = torch.where(m > 1, torch.sqrt(ss / (m - 1).clamp(min=1).to(x.dtype)), zero)
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
    return out


# ------------------------------------------------------------------------------------- neurons
def neuron_rows(matrices: list[Any], *, synchronous: bool | None = None) -> list[Any]:
    """Per-neuron statistics of 2-D ``(items, neurons)`` views, grouped by shape: one ``(3, neurons)``
    float32 tensor each. Non-finite values are left out of each neuron's statistics (checked on the host
    on the CPU, chosen on the device elsewhere, as in :func:`stats_rows`)."""
    import torch

    out: list[Any] = [None] * len(matrices)
    groups: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((m.device, tuple(m.shape)), []).append(i)
    for (device, _), members in groups.items():
        x = torch.stack([_as_float(matrices[i]) for i in members])  # (k, items, neurons)
        block = _fast_neurons(x)
        if synchronous if synchronous is not None else device.type == "cpu":
            if not bool(torch.isfinite(block[:, 0]).all()):
                block = _masked_neurons(x)
        else:
            block = torch.where(torch.isfinite(block[:, :1]), block, _masked_neurons(x))
        for j, i in enumerate(members):
            out[i] = block[j]
    return out


def _fast_neurons(x: Any) -> Any:
    """Per-neuron mean, std, abs mean over axis 1 of ``(k, items, neurons)``, assuming finite values."""
    import torch

    items = x.shape[1]
    mean = x.sum(dim=1) / items
    deviation = torch.linalg.vector_norm(x - mean.unsqueeze(1), dim=1)
    std = deviation / math.sqrt(items - 1) if items > 1 else torch.zeros_like(mean)
    return torch.stack([mean, std, x.abs().sum(dim=1) / items], dim=1).float()


def _masked_neurons(x: Any) -> Any:
    import torch

    finite = torch.isfinite(x)
    count = finite.sum(dim=1)  # (k, neurons)
    safe = count.clamp(min=1).to(x.dtype)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xf = torch.where(finite, x, zero)
    mean = xf.sum(dim=1) / safe
    dev = torch.where(finite, x - mean.unsqueeze(1), zero)
    var = (dev * dev).sum(dim=1) / (count - 1).clamp(min=1).to(x.dtype)
    abs_mean = xf.abs().sum(dim=1) / safe
    block = torch.stack([mean, var.sqrt(), abs_mean], dim=1)  # (k, 3, neurons)
    return torch.where((count > 0).unsqueeze(1), block, torch.full_like(block, float("nan"))).float()


def neuron_matrix_shape(shape: tuple[int, ...], *, is_parameter: bool, axis: int | None = None) -> tuple[int, int] | None:
    """The 2-D ``(items, neurons)`` view used for per-neuron statistics, or None for a scalar.

    ``axis`` is the activation axis that holds the neurons (default: the last one); parameters always
    have theirs on the first axis (one neuron per output unit).

    >>> neuron_matrix_shape((8, 5, 16), is_parameter=False)
    (40, 16)
    >>> neuron_matrix_shape((8, 16, 5, 5), is_parameter=False, axis=1)   # channels of a convolution
    (200, 16)
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
    width = shape[-1 if axis is None else axis]
    return (numel // width if width else 0, width)


def neuron_matrix(t: Any, *, is_parameter: bool, axis: int | None = None) -> Any:
    """``t`` viewed as ``(items, neurons)`` (a copy when the neurons are not on the last axis); None for a scalar."""
    shape = neuron_matrix_shape(tuple(t.shape), is_parameter=is_parameter, axis=axis)
    if shape is None:
        return None
    if is_parameter:
        return t.reshape(t.shape[0], -1).T
    if axis is not None and t.dim() > 1 and axis % t.dim() != t.dim() - 1:
        return t.movedim(axis, -1).reshape(shape)
    return t.reshape(shape)
