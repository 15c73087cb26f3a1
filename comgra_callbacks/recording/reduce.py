"""Statistics of a recorded step's tensors, computed with torch where they live, each tensor read once.

Every tensor is viewed as ``(items, neurons)`` (:func:`neuron_layout`: its per-neuron view when per-neuron
statistics are kept, else one neuron of all its elements) and read once for its plain sums
(:func:`comgra_callbacks.stats.sums_torch`); partial sums, batch and per-neuron statistics all follow from
them, for every tensor of the step at once (the definitions: :mod:`comgra_callbacks.stats`). The hot path
pays per operation (microseconds of dispatch each), so small tensors with the same layout are stacked and
reduced as one group; a tensor of ``GROUP_MAX_NUMEL`` elements or more is reduced alone, without the copy a
stack makes; on the CPU all of it runs on one torch thread (:func:`cpu_threads`; measured:
docs/benchmarks.md). A non-finite value, or a mean so large against the spread that the sum of squares
would lose the variance, sends its tensor (rare) to the kernel that describes it exactly.

>>> import torch
>>> rows = stats_rows([torch.tensor([1.0, 2.0, float("nan"), 0.0]), torch.tensor([[3.0, 4.0]])])
>>> named = dict(zip(STAT_NAMES, rows[0].tolist()))
>>> named["mean"], named["nan_count"], named["zero_frac"], rows[1, STAT_INDEX["l2"]].item()
(1.0, 1.0, 0.25, 5.0)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from comgra_callbacks import stats as spec
from comgra_callbacks.stats import N_NEURON_STATS, N_STATS, STAT_INDEX, STAT_NAMES

__all__ = ["N_NEURON_STATS", "N_STATS", "STAT_INDEX", "STAT_NAMES", "reduce_tensors", "stats_rows", "neuron_rows", "stats_torch"]

GROUP_MAX_NUMEL = 1 << 16  # tensors this large are reduced alone (stacking them would copy them)
THREADED_MIN_NUMEL = 1 << 22  # CPU groups this large are reduced with torch's threads, smaller ones on one


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (None: unchanged), then restored.

    The reductions of a step are hundreds of short operations over tensors of at most a few MB; each
    parallel operation ends at a barrier that waits for every thread of the pool, and on a machine whose
    cores are busy (a data loader, a writer process, someone else's job) one preempted thread stalls it for
    a scheduler slice. Measured on the 2-core machine (docs/benchmarks.md): one thread was as fast or faster
    for every kernel up to 2 MB when idle, and 10-100x faster under load."""
    import torch

    before = torch.get_num_threads()
    outer = _OUTER_THREADS.__dict__.setdefault("stack", [])
    outer.append(before)
    try:
        if n is None or n == before:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    finally:
        outer.pop()


_OUTER_THREADS = threading.local()  # .stack: the thread counts cpu_threads() replaced on this thread, outermost first


def default_threads() -> int:
    """torch's thread count outside every :func:`cpu_threads` block."""
    import torch

    outer = getattr(_OUTER_THREADS, "stack", None)
    return outer[0] if outer else torch.get_num_threads()


@dataclass(frozen=True)
class Layout:
    """How a tensor is read: as ``shape`` (3-D, a view where possible) reduced over axis ``dim``."""

    shape: tuple[int, int, int]
    dim: int
    neurons: bool


def neuron_layout(t: Any, *, neurons: bool, is_parameter: bool = False, axis: int | None = None) -> tuple[Any, Layout]:
    """The float tensor to reduce and its layout: the per-neuron view of :func:`neuron_matrix` when
    ``neurons`` (parameters: ``(1, out, rest)`` over axis 2, no copy), else all elements as one neuron."""
    x = spec.as_float_torch(t)
    shape = neuron_matrix_shape(tuple(x.shape), is_parameter=is_parameter, axis=axis) if neurons else None
    if shape is None:
        return x.reshape(1, 1, -1), Layout((1, 1, x.numel()), 2, False)
    if is_parameter:
        view = x.reshape(1, shape[1], shape[0])
        return view, Layout(tuple(view.shape), 2, True)
    matrix = neuron_matrix(x, is_parameter=False, axis=axis)
    return matrix.reshape(1, *shape), Layout((1, *shape), 1, True)


def reduce_tensors(
    tensors: list[Any], layouts: list[tuple[bool, bool, int | None]] | None = None, *, synchronous: bool | None = None,
) -> tuple[Any, list[Any]]:
    """Batch statistics ``(len(tensors), N_STATS)`` float32 (on the first tensor's device, ``update_ratio``
    NaN) and, per tensor, its per-neuron statistics ``(N_NEURON_STATS, neurons)`` or None.

    ``layouts``: per tensor ``(neurons wanted, is a parameter, neuron axis)`` (default: no per-neuron
    statistics). On the CPU (``synchronous``, the default there) a tensor whose sums show a non-finite value
    is reduced again over its finite elements; elsewhere nothing waits for the device: the masked partial sums
    of each group are computed too and chosen on the device."""
    import torch

    if not tensors:
        return torch.empty((0, N_STATS), dtype=torch.float32), []
    device = tensors[0].device
    wanted = layouts or [(False, False, None)] * len(tensors)
    views: list[tuple[Any, Layout]] = [
        neuron_layout(t, neurons=neurons, is_parameter=is_parameter, axis=axis) for t, (neurons, is_parameter, axis) in zip(tensors, wanted)
    ]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (view, layout) in enumerate(views):
        alone = (i,) if view.numel() >= GROUP_MAX_NUMEL else ()
        groups.setdefault((view.device, view.dtype, layout, *alone), []).append(i)
    n = len(tensors)
    sync = synchronous if synchronous is not None else device.type == "cpu"
    threads = default_threads()
    with cpu_threads(1 if device.type == "cpu" else None):
        pieces, seg, counts, spans = [], [], [], [0] * n  # spans[i]: tensor i's first column
        column = 0
        for members in groups.values():
            view, layout = views[members[0]]
            large = view.device.type == "cpu" and sum(views[i][0].numel() for i in members) >= THREADED_MIN_NUMEL
            with cpu_threads(threads if large else None):
                x = torch.cat([views[i][0] for i in members]) if len(members) > 1 else view
                r = spec.sums_torch(x, layout.dim) if sync else _device_partials(x, layout.dim)  # (g, R, k)
            k = r.shape[2]
            pieces.append(r.to(device).transpose(0, 1).reshape(r.shape[1], -1))
            seg.append(torch.as_tensor(members, device=device).repeat_interleave(k))
            counts.append(torch.full((len(members) * k,), float(x.shape[layout.dim]), dtype=torch.float64, device=device))  # items per column
            for i in members:
                spans[i] = column
                column += k
        flat = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
        segments = torch.cat(seg) if len(seg) > 1 else seg[0]
        if sync:
            item_counts = torch.cat(counts) if len(counts) > 1 else counts[0]
            flat = _exact(flat, item_counts, segments, views, spans, n)
        else:
            flat = flat.double()
        numel = torch.tensor([float(t.numel()) for t in tensors], dtype=torch.float64, device=device)
        combined = _combine_all(flat, segments, n, device)  # (n, N_PARTIALS)
        rows = spec.batch_from_partials(combined[:, :, None], numel, torch).float()  # one derivation for the step
        return rows, _neuron_blocks(flat, views, spans)


def _device_partials(x: Any, dim: int) -> Any:
    """Partial sums of a group on an accelerator, chosen there without a host synchronisation: the deviation
    kernel, or the masked one for a tensor with a non-finite value."""
    import torch

    p = spec.partials_torch(x, dim)
    sums = p[:, 1].sum(-1) + p[:, 2].sum(-1)
    return torch.where(torch.isfinite(sums)[:, None, None], p.double(), spec.masked_partials_torch(x, dim))


def _exact(sums: Any, items: Any, segments: Any, views: list[tuple[Any, Layout]], spans: list[int], n: int) -> Any:
    """Partial sums ``(N_PARTIALS, columns)`` from the plain sums of every column of the step; a tensor with
    a non-finite value or a precision loss in its ``m2`` (:func:`~comgra_callbacks.stats.partials_from_sums`;
    one host synchronisation for the step tells which) is reduced again by the kernel that describes it."""
    import torch

    flat, code = spec.partials_from_sums(sums, items)
    verdict = torch.zeros(n, dtype=code.dtype, device=code.device).scatter_reduce_(0, segments, code, "amax").tolist()
    for i, v in enumerate(verdict):
        if v:  # a large offset: sums of deviations; NaN, inf, or beyond float32: the finite part, in float64
            view, layout = views[i]
            kernel = spec.partials_torch if v == 1 else spec.masked_partials_torch
            p = kernel(view, layout.dim)[0].double()  # (N_PARTIALS, k)
            flat[:, spans[i] : spans[i] + p.shape[1]] = p.to(flat.device)
    return flat


def _combine_all(flat: Any, seg: Any, n: int, device: Any) -> Any:
    """Every tensor's partial sums combined over its neurons, ``(n, N_PARTIALS)`` float64: what
    :func:`~comgra_callbacks.stats.combine_neurons` gives per tensor, for the whole step in ~15 operations
    (segment sums by tensor) instead of ~20 per group."""
    import torch

    P = spec._P
    out = torch.zeros((n, flat.shape[0]), dtype=torch.float64, device=device).index_add_(0, seg, flat.T)
    count, total = flat[P["count"]], flat[P["sum"]]
    n_all = out[:, P["count"]]
    mean = out[:, P["sum"]] / torch.where(n_all > 0, n_all, torch.ones_like(n_all))
    neuron_mean = total / torch.where(count > 0, count, torch.ones_like(count))
    spread = torch.where(count > 0, count * (neuron_mean - mean[seg]) ** 2, torch.zeros_like(count))  # Chan et al.
    out[:, P["m2"]] += torch.zeros_like(n_all).index_add_(0, seg, spread)
    out[:, P["min"]] = torch.full_like(n_all, math.inf).scatter_reduce_(0, seg, flat[P["min"]], "amin")
    out[:, P["max"]] = torch.full_like(n_all, -math.inf).scatter_reduce_(0, seg, flat[P["max"]], "amax")
    return out


def _neuron_blocks(flat: Any, views: list[tuple[Any, Layout]], spans: list[int]) -> list[Any]:
    """Per-neuron statistics of every tensor that keeps them, derived in one call for the step."""
    import torch

    wanted = [i for i, (_, layout) in enumerate(views) if layout.neurons]
    blocks: list[Any] = [None] * len(views)
    if not wanted:
        return blocks
    widths = [_neurons(views[i]) for i in wanted]
    columns = torch.cat([torch.arange(spans[i], spans[i] + k, device=flat.device) for i, k in zip(wanted, widths)])
    derived = spec.neurons_from_partials(flat[:, columns], torch)  # (N_NEURON_STATS, sum of widths)
    offset = 0
    for i, k in zip(wanted, widths):
        blocks[i] = derived[:, offset : offset + k]
        offset += k
    return blocks


def _neurons(view: tuple[Any, Layout]) -> int:
    """How many neurons (columns) a 3-D view has: the axis that is not reduced."""
    x, layout = view
    return x.shape[2 if layout.dim == 1 else 1]


def stats_rows(tensors: list[Any], *, synchronous: bool | None = None) -> Any:
    """Batch statistics of many tensors: a ``(len(tensors), N_STATS)`` float32 tensor (see :func:`reduce_tensors`)."""
    return reduce_tensors(tensors, synchronous=synchronous)[0]


def stats_torch(t: Any) -> Any:
    """Batch statistics of one tensor over its finite elements, by the general (masked) path only:
    ``(N_STATS,)`` float32, no host synchronisation."""
    import torch

    x = spec.as_float_torch(t).reshape(1, 1, -1)
    return spec.batch_from_partials(spec.masked_partials_torch(x, 2), float(x.numel()), torch)[0].float()


def neuron_rows(matrices: list[Any], *, synchronous: bool | None = None) -> list[Any]:
    """Per-neuron statistics of 2-D ``(items, neurons)`` views: one ``(N_NEURON_STATS, neurons)`` float32 each."""
    import torch

    out: list[Any] = []
    for m in matrices:
        x = spec.as_float_torch(m).reshape(1, *m.shape)
        if synchronous if synchronous is not None else m.device.type == "cpu":
            k = x.shape[2]
            sums = spec.sums_torch(x, 1)[0]
            segments = torch.zeros(k, dtype=torch.int64, device=x.device)
            p = _exact(sums, torch.full((k,), float(x.shape[1]), dtype=torch.float64, device=x.device), segments, [(x, Layout(tuple(x.shape), 1, True))], [0], 1)
        else:
            p = _device_partials(x, 1)[0]
        out.append(spec.neurons_from_partials(p, torch))
    return out


# ------------------------------------------------------------------------------------- views
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
