"""Statistics of a recorded step's tensors, computed with torch where they live, each tensor read once.

Every tensor is viewed as ``(items, neurons)`` (:func:`neuron_layout`: its per-neuron view when per-neuron
statistics are kept, else one neuron of all its elements) and read once for its plain sums
(:func:`comgra_callbacks.stats.sums_torch`); partial sums, batch and per-neuron statistics all follow from
them, for every tensor of the step at once (the definitions: :mod:`comgra_callbacks.stats`). The hot path
pays per operation (microseconds of dispatch each), so small tensors with the same layout are stacked and
reduced as one group; a tensor of ``GROUP_MAX_NUMEL`` elements or more is reduced alone, without the copy a
stack makes. The grouping and the index tensors of a step are planned once per set of shapes (:func:`_plan`).
On the CPU every operation runs on one torch thread (:func:`cpu_threads`), and the groups of a large step
are shared between the training thread and one helper thread where that is faster (:func:`share_work`,
:class:`Sharing`; measured: docs/benchmarks.md). A non-finite value, or a mean so large against the spread
that the sum of squares would lose the variance, sends its tensor (rare) to the kernel that describes it
exactly; a tensor that needed the deviations once is reduced from them on later steps directly.

>>> import torch
>>> rows = stats_rows([torch.tensor([1.0, 2.0, float("nan"), 0.0]), torch.tensor([[3.0, 4.0]])])
>>> named = dict(zip(STAT_NAMES, rows[0].tolist()))
>>> named["mean"], named["nan_count"], named["zero_frac"], rows[1, STAT_INDEX["l2"]].item()
(1.0, 1.0, 0.25, 5.0)
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comgra_callbacks import stats as spec
from comgra_callbacks.recording import fused
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


FUSED_MIN_NUMEL = 1 << 20  # a CPU step this large is read by the one-pass kernel (recording/fused.py), if numba is there
SHARED_MIN_NUMEL = 1 << 20  # a CPU step with this many elements may be reduced by two threads (share_work) ...
SHARE_ENV = "COMGRA_SHARE_REDUCTIONS"  # ... "1" always (when torch has one thread too), "0" never; unset: learnt (Sharing)
FORCE_SHARING: bool | None = {"1": True, "0": False}.get(os.environ.get(SHARE_ENV, ""))


class _Helper:
    """The second thread of :func:`share_work`, started on first use (a daemon: it holds nothing)."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="comgra-reduce", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.tasks.get()()


_HELPER: list[_Helper] = []  # the process's helper, once started
_HELPER_LOCK = threading.Lock()


def share_work(fn: Callable[[Any], Any], items: list[Any], cost: Callable[[Any], int] | None = None) -> list[Any]:
    """``[fn(item) for item in items]``, computed by the calling thread and one helper thread together.

    Both take the next item from one shared counter (largest ``cost`` first), so neither waits for the other
    except for the item the helper holds when the list runs out: on a busy machine, where the helper may not
    get a core for a while, the calling thread simply does everything (and does not wait for a helper that
    never started). torch's operations release the GIL while they compute, so on an idle second core the
    reductions of a large step take about half the time (measured: docs/benchmarks.md). The helper runs with
    the thread count the calling thread had when it started it (one, inside ``cpu_threads(1)``)."""
    if len(items) < 2:
        return [fn(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost is not None else list(range(len(items)))
    results: list[Any] = [None] * len(items)
    counter = itertools.count()
    lock = threading.Lock()
    state = {"started": False, "cancelled": False}
    done = threading.Event()
    failure: list[BaseException] = []

    def drain() -> None:
        for position in counter:  # next() of a count is atomic under the GIL
            if position >= len(order):
                return
            results[order[position]] = fn(items[order[position]])

    def helper() -> None:
        with lock:
            if state["cancelled"]:
                return
            state["started"] = True
        try:
            drain()
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)
        finally:
            done.set()

    with _HELPER_LOCK:
        if not _HELPER:
            _HELPER.append(_Helper())
    _HELPER[0].tasks.put(helper)
    drain()
    with lock:
        state["cancelled"] = not state["started"]
        wait = state["started"]
    if wait:
        done.wait()
    if failure:
        raise failure[0]
    return results


class Sharing:
    """Whether :func:`share_work` is faster than one thread for a recurring piece of work, learnt from its
    wall times: on an idle second core sharing halves the reductions of a large step, but where the other
    core is busy (a data loader, the writer process, another job) the helper is preempted, holding the GIL,
    and sharing is slower than one thread (measured: docs/benchmarks.md). Each way is tried three times (the
    first time is not counted: it pays for compiling and warming caches), then the faster by a moving
    average is used, and the other is tried again every ``EXPLORE`` calls, so the choice follows the
    machine's load."""

    EXPLORE = 8
    WEIGHT = 0.3  # of the newest time in the moving average

    def __init__(self) -> None:
        self.mean: dict[bool, float] = {}
        self.seen = {True: 0, False: 0}
        self.calls = 0

    def pick(self) -> bool:
        self.calls += 1
        if min(self.seen.values()) < 3:
            return self.seen[True] <= self.seen[False]
        best = self.mean[True] < self.mean[False]
        return (not best) if self.calls % self.EXPLORE == 0 else best

    def observe(self, shared: bool, seconds: float) -> None:
        self.seen[shared] += 1
        if self.seen[shared] == 1:
            return  # the first time: compilation, allocation, cold caches
        old = self.mean.get(shared)
        self.mean[shared] = seconds if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * seconds


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
    ``neurons`` (parameters: ``(1, out, rest)`` over axis 2, no copy; one item per neuron, a bias: ``(1, 1, out)``
    over axis 1, which the kernels read across the neurons, where rows of one item cost ~30 ns an element),
    else all elements as one neuron."""
    x = spec.as_float_torch(t)
    shape = neuron_matrix_shape(tuple(x.shape), is_parameter=is_parameter, axis=axis) if neurons else None
    if shape is None:
        return x.reshape(1, 1, -1), Layout((1, 1, x.numel()), 2, False)
    if is_parameter:
        if shape[0] == 1:  # one item per neuron (a bias, a norm's weight): read across the neurons (~30x faster)
            view = x.reshape(1, 1, shape[1])
            return view, Layout(tuple(view.shape), 1, True)
        view = x.reshape(1, shape[1], shape[0])
        return view, Layout(tuple(view.shape), 2, True)
    matrix = neuron_matrix(x, is_parameter=False, axis=axis)
    return matrix.reshape(1, *shape), Layout((1, *shape), 1, True)


def _items_in_memory_order(x: Any, *, neurons_last: bool) -> Any:
    """``x``, or a view of it with its item axes in the order of its memory where that view is contiguous (the
    neurons, with ``neurons_last``, stay the last axis): statistics do not depend on the order of the items,
    and a transposed tensor (attention's ``(batch, sequence, d)`` made from ``(sequence, batch, d)``, and its
    gradient) is then read where it lies instead of copied by ``reshape``."""
    if x.dim() < 2 or x.is_contiguous():
        return x
    axes = range(x.dim() - 1) if neurons_last else range(x.dim())
    order = sorted(axes, key=lambda a: -x.stride(a))
    y = x.permute(*order, x.dim() - 1) if neurons_last else x.permute(*order)
    return y if y.is_contiguous() else x


def reduce_tensors(
    tensors: list[Any], layouts: list[tuple[bool, bool, int | None]] | None = None, *, synchronous: bool | None = None,
) -> tuple[Any, list[Any]]:
    """Batch statistics ``(len(tensors), N_STATS)`` float32 (on the first tensor's device, ``update_ratio``
    NaN) and, per tensor, its per-neuron statistics ``(N_NEURON_STATS, neurons)`` or None.

    ``layouts``: per tensor ``(neurons wanted, is a parameter, neuron axis)`` (default: no per-neuron
    statistics). On the CPU (``synchronous``, the default there) a tensor whose sums show a non-finite value
    is reduced again over its finite elements; elsewhere nothing waits for the device: the masked partial sums
    of each group are computed too and chosen on the device. The bookkeeping of a step (views, groups,
    columns) is planned once per set of shapes and reused (:func:`_plan`): a training run records the same
    tensors step after step."""
    import torch

    if not tensors:
        return torch.empty((0, N_STATS), dtype=torch.float32), []
    device = tensors[0].device
    wanted = layouts or [(False, False, None)] * len(tensors)
    sync = synchronous if synchronous is not None else device.type == "cpu"
    plan = _plan(tensors, wanted)
    floats = (torch.float32, torch.float64)

    def view(i: int) -> tuple[Any, Layout]:  # made where it is read (on either thread of share_work)
        layout = plan.layouts[i]
        if plan.moved[i]:
            return neuron_layout(tensors[i], neurons=True, axis=wanted[i][2])
        x = tensors[i].detach()
        if x.dtype not in floats:  # read as it is
            x = spec.as_float_torch(x)
        if not wanted[i][1] and not x.is_contiguous():  # an activation or its gradient: its items in any order
            x = _items_in_memory_order(x, neurons_last=layout.neurons)
        return x.reshape(layout.shape), layout

    threads = default_threads()
    on_cpu = device.type == "cpu"
    # a large CPU step is shared by two threads (share_work); otherwise one thread, except for a huge group
    forced = FORCE_SHARING
    shareable = on_cpu and (forced if forced is not None else threads > 1 and plan.numel_total >= SHARED_MIN_NUMEL)
    shared = shareable and (forced if forced is not None else plan.sharing.pick())

    given: dict[int, Any] = {}  # tensors reduced from deviations at once (plan.deviations)
    host: tuple[Any, ...] = _host_arrays(plan.segments.columns) if sync else ()
    use_fused = sync and on_cpu and plan.numel_total >= FUSED_MIN_NUMEL and fused.available()

    # the kernels' calls prepared here first (views, stacks, arrays: Python, under the GIL), so that the two
    # threads of share_work then run kernels that release the GIL, instead of taking turns at the Python
    def stacked(g: int) -> Any:  # a group's tensors as one 3-D tensor (a view for a group of one)
        members = plan.groups[g]
        return torch.cat([view(i)[0] for i in members]) if len(members) > 1 else view(members[0])[0]

    ready: dict[int, Callable[[], None]] = _prepared_calls(plan, stacked, host) if use_fused and shared else {}

    def reduce_group(g: int) -> Any:
        call = ready.get(g)
        if call is not None:
            call()
            return None
        if not shared and on_cpu and plan.sizes[g] >= THREADED_MIN_NUMEL:
            with cpu_threads(threads):  # never switched on the helper thread
                return group_sums(g)
        return group_sums(g)  # no context manager on the way: a step's ~100 groups each pay for what is here

    def group_sums(g: int) -> Any:
        members = plan.groups[g]
        layout = plan.layouts[members[0]]
        x = stacked(g)
        if not sync:
            return _device_partials(x, layout.dim)  # (g, N_PARTIALS, k)
        if members[0] in plan.deviations:  # its m2 lost precision from plain sums before: skip them
            given[members[0]] = spec.partials_torch(x, layout.dim)[0].double()
            return torch.zeros((1, len(spec.SUM_NAMES), _width(layout)), dtype=torch.float64, device=x.device)
        if use_fused and fused.derived_fused(x, layout.dim, plan.spans[members[0]], *host):
            return None  # one pass (numba), derived into the step's columns in the same call
        return spec.sums_torch(x, layout.dim).double()  # (g, len(SUM_NAMES), k)

    with cpu_threads(1 if device.type == "cpu" else None):
        indices = list(range(len(plan.groups)))
        started = time.perf_counter()
        reduced = share_work(reduce_group, indices, cost=plan.sizes.__getitem__) if shared else [reduce_group(g) for g in indices]
        if shareable:
            plan.sharing.observe(shared, time.perf_counter() - started)
        if sync:  # the sums are on the host now: the rest is a few numpy operations over the step's columns
            rows, blocks = _host_epilogue(reduced, plan, view, given, host)
            if on_cpu:
                return torch.from_numpy(rows), [None if b is None else torch.from_numpy(b) for b in blocks]
            return torch.from_numpy(rows).to(device), [None if b is None else torch.from_numpy(b).to(device) for b in blocks]
        pieces = [r.transpose(0, 1).reshape(r.shape[1], -1) for r in reduced]
        flat = (torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]).double()
        combined = spec.combine_columns(flat, plan.segments, torch)  # (n, N_PARTIALS)
        numel = torch.tensor(plan.numel, dtype=torch.float64, device=device)
        rows = spec.batch_from_partials(combined[:, :, None], numel, torch).float()  # one derivation for the step
        return rows, _neuron_blocks(flat, plan, torch)


PREPARED_COPY_MAX = 64 << 20  # bytes of stacked small tensors prepared at once (the rest are stacked where read)


def _prepared_calls(plan: _Plan, stacked: Callable[[int], Any], host: tuple[Any, ...]) -> dict[int, Callable[[], None]]:
    """The one-pass kernel's call of each group that reads its tensors where they are (a view, or a stack of
    small ones, at most ``PREPARED_COPY_MAX`` bytes of those in all; ``stacked``: a group's tensors as one),
    prepared on this thread: ~10-20 us of Python a group. Groups whose view is a copy (neurons moved to the
    last axis) or that need the deviations are left to ``group_sums``, so that a step's copies of large
    tensors never all exist at once."""
    calls: dict[int, Callable[[], None]] = {}
    copied = 0
    for g, members in enumerate(plan.groups):
        if members[0] in plan.deviations or any(plan.moved[i] for i in members):
            continue
        if len(members) > 1:
            if copied + plan.sizes[g] * 4 > PREPARED_COPY_MAX:
                continue
            copied += plan.sizes[g] * 4
        call = fused.derive_call(stacked(g), plan.layouts[members[0]].dim, plan.spans[members[0]], *host)
        if call is not None:
            calls[g] = call
    return calls


def _host_arrays(columns: int) -> tuple[Any, Any, Any]:
    """The step's partial sums ``(N_PARTIALS, columns)``, codes and per-neuron statistics ``(N_NEURON_STATS,
    columns)`` on the host, filled in by the groups' kernels (:func:`~.fused.derived_fused`) or by
    :func:`_host_epilogue`."""
    return (np.empty((spec.N_PARTIALS, columns)), np.zeros(columns, dtype=np.int64), np.empty((N_NEURON_STATS, columns), dtype=np.float32))


def _host_epilogue(
    reduced: list[Any], plan: _Plan, view: Callable[[int], tuple[Any, Layout]], given: dict[int, Any], host: tuple[Any, ...],
) -> tuple[Any, list[Any]]:
    """Batch statistics ``(n, N_STATS)`` float32 and the per-neuron blocks (numpy views) of the step.

    ``reduced``: per group, None where its kernel derived its columns already (the one-pass kernel), else its
    plain sums ``(g, len(SUM_NAMES), k)``, derived here in numpy (one call over every column when no group
    was derived: ~1 us of dispatch per operation where torch's took ~10, and ``reduceat`` per tensor instead
    of a transposed ``index_add_``; measured in docs/benchmarks.md). Then the tensors whose code says so are
    reduced again by the kernel that describes them (:func:`_fix_inexact`), and the step's columns are
    combined per tensor."""
    partials, code, neurons = host
    plain = [g for g, r in enumerate(reduced) if r is not None]
    redo: list[tuple[int, int]] = []  # column ranges whose per-neuron statistics are still to be derived
    by_column = [reduced[g].cpu().numpy().transpose(1, 0, 2) for g in plain]  # (SUM_NAMES, g, k) each
    if len(plain) == len(reduced):  # torch's kernels everywhere: one derivation over every column
        sums = np.concatenate([a.reshape(a.shape[0], -1) for a in by_column], axis=1)
        redo.append((0, plan.segments.columns))
        partials[:], code[:] = spec.partials_from_sums(sums, plan.items, np)
    else:  # a few groups beside the kernel's: each over its own columns
        for g, a in zip(plain, by_column):
            start = plan.spans[plan.groups[g][0]]
            stop = start + a.shape[1] * a.shape[2]
            redo.append((start, stop))
            partials[:, start:stop], code[start:stop] = spec.partials_from_sums(a.reshape(a.shape[0], -1), plan.items[start:stop], np)
    redo += _fix_inexact(partials, code, plan, view, given)
    for start, stop in redo:
        neurons[:, start:stop] = spec.neurons_from_partials(partials[:, start:stop], np)
    combined = spec.combine_columns(partials, plan.segments, np)  # (n, N_PARTIALS)
    rows = spec.batch_from_partials(combined[:, :, None], np.asarray(plan.numel), np).astype(np.float32)
    blocks: list[Any] = [None] * len(plan.layouts)
    for i, k in zip(plan.neuron_tensors, plan.widths):
        blocks[i] = neurons[:, plan.spans[i] : plan.spans[i] + k]
    return rows, blocks


@dataclass
class _Plan:
    """How a step's tensors are reduced, worked out once per set of shapes (:func:`_plan`)."""

    layouts: list[Layout]
    moved: list[bool]  # the neurons are not on the last axis: the view is a copy (neuron_layout)
    groups: list[list[int]]  # tensors reduced together, in column order
    sizes: list[int]  # elements per group
    spans: list[int]  # each tensor's first column
    numel: list[float]  # elements per tensor
    numel_total: int
    neuron_tensors: list[int]  # the tensors with per-neuron statistics ...
    widths: list[int]  # ... and their neurons
    group_of: list[int]  # each tensor's group
    segments: spec.Segments  # each tensor's columns
    items: Any  # per column, the items it sums (numpy float64)
    deviations: set[int] = field(default_factory=set)  # tensors alone in their group whose m2 needs deviations
    sharing: Sharing = field(default_factory=lambda: Sharing())  # whether share_work pays for this step


_PLANS: dict[tuple[Any, ...], _Plan] = {}  # the last few plans, by the shapes and layouts of the step
_PLANS_KEPT = 16


def _plan(tensors: list[Any], wanted: list[tuple[bool, bool, int | None]]) -> _Plan:
    key = (GROUP_MAX_NUMEL, *((tuple(t.shape), t.dtype, t.device, *w) for t, w in zip(tensors, wanted)))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    views = [neuron_layout(t, neurons=n, is_parameter=p, axis=a) for t, (n, p, a) in zip(tensors, wanted)]
    by_key: dict[tuple[Any, ...], list[int]] = {}
    for i, (view, layout) in enumerate(views):
        alone = (i,) if view.numel() >= GROUP_MAX_NUMEL else ()
        by_key.setdefault((view.device, view.dtype, layout, *alone), []).append(i)
    groups = list(by_key.values())
    layouts = [layout for _, layout in views]
    spans, column = [0] * len(tensors), 0
    for members in groups:
        for i in members:
            spans[i] = column
            column += _width(layouts[i])
    moved = [bool(n and not p and a is not None and t.dim() > 1 and a % t.dim() != t.dim() - 1) for t, (n, p, a) in zip(tensors, wanted)]
    neuron_tensors = [i for i, layout in enumerate(layouts) if layout.neurons]
    group_of = [0] * len(tensors)
    for g, members in enumerate(groups):
        for i in members:
            group_of[i] = g
    widths = [_width(layout) for layout in layouts]
    segments = spec.Segments(spans, widths)
    items = np.array([float(layout.shape[layout.dim]) for layout in layouts], dtype=np.float64)[segments.tensor_of]
    plan = _Plan(
        layouts, moved, groups, [sum(views[i][0].numel() for i in m) for m in groups], spans, [float(t.numel()) for t in tensors],
        sum(v.numel() for v, _ in views), neuron_tensors, [widths[i] for i in neuron_tensors], group_of, segments, items,
    )
    if len(_PLANS) >= _PLANS_KEPT:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plan
    return plan


def _width(layout: Layout) -> int:
    """How many neurons (columns) a layout has: the axis that is not reduced."""
    return layout.shape[2 if layout.dim == 1 else 1]


def _device_partials(x: Any, dim: int) -> Any:
    """Partial sums of a group on an accelerator, chosen there without a host synchronisation: the deviation
    kernel, or the masked one for a tensor with a non-finite value."""
    import torch

    p = spec.partials_torch(x, dim)
    sums = p[:, 1].sum(-1) + p[:, 2].sum(-1)
    return torch.where(torch.isfinite(sums)[:, None, None], p.double(), spec.masked_partials_torch(x, dim))


def _fix_inexact(partials: Any, code: Any, plan: _Plan, view: Callable[[int], tuple[Any, Layout]], given: dict[int, Any]) -> list[tuple[int, int]]:
    """The partial sums of the tensors whose plain sums do not describe them exactly, replaced (in place), and
    the column ranges replaced. By ``code`` (:func:`~comgra_callbacks.stats.partials_from_sums`): a tensor
    whose ``m2`` lost precision is reduced from deviations (and, alone in its group, from them directly on
    later steps: ``plan.deviations``), one with a non-finite value over its finite elements in float64.
    ``given``: tensors already reduced from deviations (``partials_torch``, ``(N_PARTIALS, k)``), used as they
    are unless they show a non-finite value."""
    verdicts = plan.segments.reduce(code[None].astype(np.float64), "max", np)[0]  # per tensor (-inf: no columns)
    spans, replaced = plan.spans, []
    for i, p in given.items():
        p = p.cpu().numpy()
        partials[:, spans[i] : spans[i] + p.shape[1]] = p
        verdicts[i] = 0 if np.isfinite(p[1].sum() + p[2].sum()) else 2
        replaced.append((spans[i], spans[i] + p.shape[1]))
    for i in np.flatnonzero(verdicts > 0).tolist():
        # a large offset: sums of deviations; NaN, inf, or beyond float32: the finite part, in float64
        x, layout = view(i)
        kernel = spec.partials_torch if verdicts[i] == 1 else spec.masked_partials_torch
        p = kernel(x, layout.dim)[0].double().cpu().numpy()  # (N_PARTIALS, k)
        partials[:, spans[i] : spans[i] + p.shape[1]] = p
        replaced.append((spans[i], spans[i] + p.shape[1]))
        if verdicts[i] == 1 and len(plan.groups[plan.group_of[i]]) == 1:
            plan.deviations.add(i)
    return replaced


def _neuron_blocks(flat: Any, plan: _Plan, xp: Any) -> list[Any]:
    """Per-neuron statistics of every tensor that keeps them, derived in one call for the step (views of it)."""
    blocks: list[Any] = [None] * len(plan.layouts)
    if not plan.widths:
        return blocks
    # every column is derived (no gather: the columns without per-neuron statistics are few, ~1 per tensor)
    derived = spec.neurons_from_partials(flat, xp)  # (N_NEURON_STATS, columns)
    for i, k in zip(plan.neuron_tensors, plan.widths):
        blocks[i] = derived[:, plan.spans[i] : plan.spans[i] + k]
    return blocks


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
    return [reduce_tensors([m], [(True, False, None)], synchronous=synchronous)[1][0] for m in matrices]


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
