"""How a recorded step travels through the writer's ring: which tensors are copied whole, which are reduced
on the training side, and how a step larger than the ring is cut into parts.

The writer process reduces what it receives whole: on the training thread a copy is all the work. A step
larger than the ring (a 27 M-parameter model needs 309 MiB per step for its values, gradients and updates,
more than the default 256 MiB ring) goes in parts of at most half the ring, so that the writer reduces one
while the next is copied; the writer process joins them into one record. Only a tensor too large for half
the ring is reduced where it lives (:func:`~.pending.pack`, the accelerator path) so that just its results
travel; a single result still too large (huge samples) loses its samples, then its per-neuron statistics.
Each of these says so once, with the ``max_queue_mb`` that avoids it.

Where the statistics are computed is :func:`reduce_in_writer`'s choice: raw tensors travel only when the
writer process has a core that torch does not use; otherwise :func:`~.pending.pack` reduces the step on the
training thread and only results (and kept samples) travel. Measured (docs/benchmarks.md): on the
transformer workload with torch on both cores, a writer process reducing next to training made the forward
pass of a recorded step 10x slower; reduced on the training thread, one pass of partial sums per tensor.
On the 27 M-parameter model of docs/reliability.md with one torch thread, the writer process wins (the old
torch kernels took 4.9-6.8 s a step there against 0.7-0.9 s for copy and writer).

>>> need_mib(309 << 20), need_mib(66_000)
(310, 1)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from comgra_callbacks.recording.pending import FULL, PackedStep, PendingStep, Snapshot
from comgra_callbacks.recording.reduce import N_STATS
from comgra_callbacks.store.messages import RawItem

REDUCE_GROUP_BYTES = 64 << 20  # reduced together (pack stacks tensors of one size: bounded extra memory)
ALIGN = 64
NUMPY_DTYPES = {"float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}

Warn = Callable[[str, str], None]  # (key, message): warn once per key
REDUCE_ENV = "COMGRA_REDUCE"  # "writer" or "training": overrides reduce_in_writer (for measurements)


def reduce_in_writer() -> bool:
    """Where a recorded step's statistics are computed (measured: docs/benchmarks.md, "Where the statistics
    are computed"). In the writer process when it has a core of its own: torch uses fewer threads than the
    machine has cores, so the copy into the ring is all the training thread pays. Otherwise on the training
    thread, with torch's own (multi-threaded) kernels, and only the results travel: a writer process
    crunching numpy on a core that torch's threads also use slows every operation of training (its thread
    pool waits for the preempted thread), far more than the reductions themselves cost."""
    import torch

    chosen = os.environ.get(REDUCE_ENV, "").strip().lower()
    if chosen in ("writer", "training"):
        return chosen == "writer"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores


@dataclass
class Part:
    """One message's worth of a step: snapshots copied whole (``raw``) or reduced here (``reduce``), by index
    into the step's snapshots; or results ready to copy (``packed``)."""

    raw: list[int] | None = None
    reduce: list[int] | None = None
    packed: PackedStep | None = None


def need_mib(nbytes: int) -> int:
    """The smallest ``max_queue_mb`` that holds ``nbytes`` in one piece (with room for alignment)."""
    return max(1, math.ceil((nbytes + 4096) / (1 << 20)))


def ring_nbytes(snap: Snapshot) -> int:
    """Bytes of the snapshot in the ring when copied whole (dtypes numpy lacks travel as float32)."""
    t = snap.tensor
    size = t.element_size() if str(t.dtype).replace("torch.", "") in NUMPY_DTYPES else 4
    return int(t.numel()) * size


def _aligned(nbytes: int) -> int:
    return ((nbytes + ALIGN - 1) // ALIGN) * ALIGN


def plan_raw(pending: PendingStep, capacity: int, warn: Warn, run: str) -> list[Part]:
    """Cut a step of CPU tensors into parts that each fit the ring (one part when the step fits)."""
    snaps = pending.snapshots
    raw = [ring_nbytes(s) for s in snaps]
    total = sum(_aligned(n) + ALIGN for n in raw)
    limit = capacity
    if total > capacity:
        limit = capacity // 2
        warn(
            "split",
            f"comgra: a recorded step of run {run!r} needs {total / (1 << 20):.1f} MiB in the writer's buffer, more than "
            f"max_queue_mb ({capacity >> 20} MiB); it is sent in parts, and training waits while the writer takes "
            f"each. HINT: max_queue_mb={need_mib(total)} sends it at once.",
        )
    reduce = {i for i in range(len(snaps)) if _aligned(raw[i]) + ALIGN > limit}  # too large to copy whole
    if reduce:
        warn(
            "reduce",
            f"comgra: {len(reduce)} tensor(s) of run {run!r} do not fit half the writer's buffer (max_queue_mb="
            f"{capacity >> 20}); their statistics are computed on the training thread, which is slow. "
            f"HINT: max_queue_mb={need_mib(total)} lets the writer process compute them.",
        )
    parts: list[Part] = []
    group: list[int] = []
    used = 0
    for i in range(len(snaps)):
        if i in reduce:
            continue
        size = _aligned(raw[i]) + ALIGN  # each dtype block of a part is aligned: room for it
        if group and used + size > limit:
            parts.append(Part(raw=group))
            group, used = [], 0
        group.append(i)
        used += size
    if group or not reduce:
        parts.append(Part(raw=group))
    group, used = [], 0
    for i in sorted(reduce):
        if group and used + raw[i] > REDUCE_GROUP_BYTES:
            parts.append(Part(reduce=group))
            group, used = [], 0
        group.append(i)
        used += raw[i]
    if group:
        parts.append(Part(reduce=group))
    return parts


def ring_dtype(tensor: Any) -> Any:
    """The dtype a tensor travels in: its own, or float32 where numpy lacks it (bfloat16, float16, ...)."""
    import torch

    return tensor.dtype if str(tensor.dtype).replace("torch.", "") in NUMPY_DTYPES else torch.float32


def raw_signature(snaps: list[Snapshot]) -> tuple[Any, ...]:
    """What a step's raw plan depends on: for each snapshot its series, dtypes, shape and what is kept."""
    return tuple((s.key, s.dtype, s.tensor.dtype, s.tensor.shape, s.is_parameter, s.neurons, s.samples, s.reference is None, s.neuron_axis, s.deferred) for s in snaps)


@dataclass
class RawPart:
    """One part of a step copied whole into the ring: the step's tensors ``indices``, in one block per ring
    dtype ``(dtype, positions in indices, start, bytes)``, ``total`` bytes from the part's base; ``items``:
    its layout (``layout``: the id the writer process knows it by, 0 before it was sent); ``converted``:
    the positions whose tensor is widened to float32 on the way; ``resolve``: the positions of deferred
    updates whose weight before the step is not in this part (their difference is taken on the way)."""

    indices: list[int]
    blocks: list[tuple[Any, list[int], int, int]]
    total: int
    items: tuple[RawItem, ...]
    converted: frozenset[int]
    resolve: frozenset[int] = frozenset()
    layout: int = 0


def describe_raw(pending: PendingStep, indices: list[int]) -> RawPart:
    """Where the tensors ``indices`` of a step go in the ring (one block per dtype) and how the writer
    process reads them (the layout)."""
    snaps = [pending.snapshots[i] for i in indices]
    ring_dtypes = [ring_dtype(s.tensor) for s in snaps]
    by_dtype: dict[Any, list[int]] = {}
    for position, dtype in enumerate(ring_dtypes):
        by_dtype.setdefault(dtype, []).append(position)
    blocks = []
    total = 0
    offsets = [0] * len(snaps)  # relative to the part's base
    for dtype, members in by_dtype.items():
        itemsize = dtype.itemsize
        size = sum(snaps[j].tensor.numel() for j in members) * itemsize
        blocks.append((dtype, members, total, size))
        position = total
        for j in members:
            offsets[j] = position
            position += snaps[j].tensor.numel() * itemsize
        total += _aligned(size)
    here = {s.key.node: j for j, s in enumerate(snaps) if s.key.view == "value" and s.is_parameter}
    elsewhere = {s.key.node for s in pending.snapshots if s.key.view == "value" and s.is_parameter}
    items = []
    resolve = set()
    for j, (snap, dtype) in enumerate(zip(snaps, ring_dtypes)):
        k = snap.key
        ref = subtract = None
        if snap.reference is not None:
            ref = here.get(k.node, -1 if k.node in elsewhere else None)  # -1: in another part of the step
        if snap.deferred:  # the writer process takes the difference from the weight before, if it travels here
            before = here.get(k.node)
            if before is not None and snaps[before].tensor is snap.reference and ring_dtypes[before] == dtype:
                subtract = before
            else:
                resolve.add(j)
        samples = FULL if snap.samples == FULL else int(snap.samples)
        axis = None if snap.neuron_axis is None else int(snap.neuron_axis)
        items.append(RawItem(
            k.node, k.role, k.iteration, k.view, snap.dtype, str(dtype).replace("torch.", ""), tuple(snap.tensor.shape), offsets[j],
            snap.is_parameter, bool(snap.neurons), samples, ref, axis, subtract,
        ))
    converted = frozenset(j for j, (snap, dtype) in enumerate(zip(snaps, ring_dtypes)) if snap.tensor.dtype != dtype)
    return RawPart(list(indices), blocks, total, tuple(items), converted, frozenset(resolve))


def split_packed(packed: PackedStep, capacity: int, warn: Warn, run: str) -> list[PackedStep]:
    """Results of a step (:func:`~.pending.pack`) in pieces that each fit the ring (itself when it fits).

    A piece is a PackedStep of the same record whose ``host`` is a numpy float32 buffer laid out as ``pack``
    lays out its own: the statistics of its series, then each series' per-neuron statistics and samples."""
    import numpy as np

    if packed.event is not None:
        packed.event.synchronize()
        packed.event = None
    flat = packed.host if isinstance(packed.host, np.ndarray) else packed.host.numpy()
    if flat.nbytes <= capacity:
        return [packed]
    limit = capacity // 2
    n = len(packed.layout)
    stats = flat[: n * N_STATS].reshape(n, N_STATS)
    offset = n * N_STATS
    entries = []  # (layout entry, neurons slice or None, samples slice or None)
    for key, dtype, neuron_shape, sample_shape in packed.layout:
        pieces: list[Any] = []
        for shape in (neuron_shape, sample_shape):
            size = math.prod(shape) if shape is not None else 0
            pieces.append(flat[offset : offset + size] if shape is not None else None)
            offset += size
        neurons, samples = pieces
        entry_bytes = 4 * (N_STATS + (0 if neurons is None else neurons.size) + (0 if samples is None else samples.size))
        if entry_bytes > limit and samples is not None:
            warn(
                f"samples:{key.node}",
                f"comgra: the samples of {key.node!r} in run {run!r} take {samples.nbytes / (1 << 20):.1f} MiB, more than the "
                f"writer's buffer takes at once (max_queue_mb={capacity >> 20}); they are not kept. "
                f"HINT: max_queue_mb={need_mib(flat.nbytes)} keeps them.",
            )
            samples, sample_shape = None, None
            entry_bytes = 4 * (N_STATS + (0 if neurons is None else neurons.size))
        if entry_bytes > limit and neurons is not None:
            warn(
                f"neurons:{key.node}",
                f"comgra: the per-neuron statistics of {key.node!r} in run {run!r} do not fit the writer's buffer "
                f"(max_queue_mb={capacity >> 20}); they are not kept. HINT: max_queue_mb={need_mib(flat.nbytes)} keeps them.",
            )
            neurons, neuron_shape = None, None
        entries.append(((key, dtype, neuron_shape, sample_shape), neurons, samples))
    out: list[PackedStep] = []
    group: list[int] = []
    used = 0

    def emit() -> None:
        blocks = [stats[group].reshape(-1)]
        for j in group:
            blocks.extend(p for p in entries[j][1:] if p is not None)
        out.append(PackedStep(packed.record, np.concatenate(blocks).astype(np.float32, copy=False), [entries[j][0] for j in group]))

    for j, (_, neurons, samples) in enumerate(entries):
        size = 4 * (N_STATS + (0 if neurons is None else neurons.size) + (0 if samples is None else samples.size))
        if group and used + size > limit:
            emit()
            group, used = [], 0
        group.append(j)
        used += size
    if group:
        emit()
    packed.host = None
    return out
