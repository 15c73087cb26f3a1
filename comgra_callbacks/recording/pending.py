"""A recorded step on its way to the store: packed on the training thread, unpacked on the writer's.

Why the statistics are computed on the training thread: on a recorded step the work is a few grouped
reductions over tensors that are already in memory (and, on an accelerator, already on the device). Doing
it on the writer thread instead was measured to cost training *more*: every torch operation of the
training step releases the GIL and must win it back, and a busy Python thread next to it makes each of
those hand-offs slow (docs/benchmarks.md). So :func:`pack` computes everything with torch where the
tensors live, concatenates the results into one buffer and starts a single copy to the host; the writer
thread only cuts that buffer into records (:meth:`PackedStep.materialize`) and appends them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comgra_callbacks.recording import reduce
from comgra_callbacks.recording.sampling import kept_samples
from comgra_callbacks.stats import update_ratio
from comgra_callbacks.store.attribution import counts_row_torch, has_statistics
from comgra_callbacks.store.format import STAT_INDEX, SeriesKey
from comgra_callbacks.store.messages import unpack_entries
from comgra_callbacks.store.writer import HostRecord

FULL = -1  # Snapshot.samples value: keep the whole tensor

series_key = functools.lru_cache(maxsize=1 << 16)(SeriesKey)
"""``SeriesKey(node, role, iteration, view)``, made once per series and then looked up (0.14 against 0.8 us:
a recorded step names ~40-200 series, the same ones every step; a key is immutable, so sharing it is safe)."""


@dataclass
class Snapshot:
    """One tensor of one series.

    Attributes:
        key: node, role, iteration and view.
        tensor: a private copy, or the recorded tensor itself when it is known not to change before the step
            ends (see ``Recorder._value``).
        dtype: torch dtype name of the recorded tensor.
        is_parameter: per-neuron statistics go along the first axis for parameters.
        neurons: whether to keep per-neuron statistics.
        samples: how many leading samples to keep (0: none, ``FULL``: the whole tensor).
        reference: for an update, the weight before it (for ``update_ratio``).
        version: the tensor's ``_version`` when it was recorded (None for a copy).
        neuron_axis: for an activation, the axis holding its neurons (None: the last axis, or one neuron
            for a vector).
        deferred: for an update: ``tensor`` is the weight after the step (not a copy) and the update is
            ``tensor - reference``, computed where the step is reduced: by the writer process in its buffer
            (a raw step of CPU tensors), else by :func:`resolve_updates` when the step is submitted. It saves
            the training thread a pass over the weights and an allocation per parameter. Only set when the
            step's value snapshot of the same weight is ``reference`` itself (the plan of a raw step relies on it).
    """

    key: SeriesKey
    tensor: Any
    dtype: str
    is_parameter: bool = False
    neurons: bool = True
    samples: int = 0
    reference: Any = None
    version: int | None = None
    neuron_axis: int | None = None
    deferred: bool = False


@dataclass
class PackedStep:
    """A step's results in one host buffer, and where each series' pieces are in it."""

    record: HostRecord
    host: Any  # a CPU tensor (its copy may still be in flight when ``event`` is set)
    layout: list[tuple[SeriesKey, str, tuple[int, int] | None, tuple[int, ...] | None]]
    event: Any = None
    nbytes: int = 0

    def materialize(self) -> HostRecord:
        """On the writer thread: wait for the copy, cut the buffer into entries (numpy views, no copy).

        The buffer holds the statistics of every series as one ``(series, n_stats)`` block, then each
        series' per-neuron statistics and samples, in order."""
        if self.event is not None:
            self.event.synchronize()
        self.record.entries.extend(unpack_entries(self.host.numpy(), self.layout, copy=False))
        self.host = None
        return self.record


@dataclass
class PendingStep:
    """A step being recorded: where it is in training and its snapshots (on the training thread only)."""

    step: int
    step_type: str
    epoch: int
    batch_idx: int
    time: float
    reason: str | None
    snapshots: list[Snapshot] = field(default_factory=list)
    sample_index: Any = None
    batch_size: int | None = None


def pack(pending: PendingStep) -> PackedStep:
    """Compute every statistic of the step where its tensors live and start one copy to the host."""
    snaps = pending.snapshots
    on_cpu = all(s.tensor.is_cpu for s in snaps)
    with reduce.cpu_threads(1 if on_cpu else None):  # short operations: one thread (see reduce.cpu_threads)
        resolve_updates(snaps)
        return _pack(pending)


def updated(snap: Snapshot) -> Any:
    """A deferred update's difference (the weight after the step minus the weight before it)."""
    import torch

    with torch.no_grad():
        return snap.tensor.to(snap.reference.dtype) - snap.reference


def resolve_updates(snaps: list[Snapshot]) -> None:
    """Turn the step's deferred updates (:attr:`Snapshot.deferred`) into their differences, in place: before
    anything reads them as updates on this side, and before the weights change again."""
    for snap in snaps:
        if snap.deferred:
            snap.tensor, snap.deferred = updated(snap), False


def _pack(pending: PendingStep) -> PackedStep:
    import torch

    snaps = pending.snapshots
    stats, neurons = _statistics(snaps)
    _update_ratios(snaps, stats)
    index = pending.sample_index
    # on the CPU the buffer is put together by numpy: ~1 us a piece where torch's reshape and cat take ~10
    on_cpu = stats.device.type == "cpu"
    flat_piece = (lambda t: t.numpy().reshape(-1)) if on_cpu else (lambda t: t.reshape(-1))
    pieces: list[Any] = [flat_piece(stats)]
    layout = []
    for i, snap in enumerate(snaps):
        neuron_shape = sample_shape = None
        if i in neurons:
            block = neurons[i]
            neuron_shape = (block.shape[0], block.shape[1])
            pieces.append(flat_piece(block))
        if snap.samples:
            chosen = _chosen_samples(snap, index, pending.batch_size)
            sample_shape = tuple(chosen.shape)
            pieces.append(flat_piece(chosen.to(device=stats.device, dtype=torch.float32)))
        layout.append((snap.key, snap.dtype, neuron_shape, sample_shape))
    flat = torch.from_numpy(np.concatenate(pieces)) if on_cpu else torch.cat(pieces)
    host, event = _to_host(flat)
    record = HostRecord(pending.step, pending.step_type, pending.epoch, pending.batch_idx, pending.time, pending.reason or "schedule")
    packed = PackedStep(record, host, layout, event, nbytes=int(flat.numel()) * 4)
    pending.snapshots = []  # the tensors are no longer needed
    return packed


def _statistics(snaps: list[Snapshot]) -> tuple[Any, dict[int, Any]]:
    """Batch statistics ``(len(snaps), N_STATS)`` and the per-neuron blocks by snapshot index; series that
    get no statistics (``attribution:*``, see :func:`~comgra_callbacks.store.attribution.has_statistics`)
    only their counts."""
    import torch

    # each tensor read once: batch and per-neuron statistics from the same partial sums
    chosen = [i for i, s in enumerate(snaps) if has_statistics(s.key.view)]
    rows, blocks = reduce.reduce_tensors([snaps[i].tensor for i in chosen], [(snaps[i].neurons, snaps[i].is_parameter, snaps[i].neuron_axis) for i in chosen])
    if len(chosen) == len(snaps):
        return rows, {i: b for i, b in enumerate(blocks) if b is not None}
    device = rows.device if chosen else snaps[0].tensor.device
    stats = torch.empty((len(snaps), rows.shape[1]), dtype=torch.float32, device=device)
    if chosen:
        stats[torch.as_tensor(chosen, device=device)] = rows.to(device)
    for i in sorted(set(range(len(snaps))) - set(chosen)):
        stats[i] = counts_row_torch(snaps[i].tensor.detach()).to(device)
    return stats, {i: b for i, b in zip(chosen, blocks) if b is not None}


def _to_host(flat: Any) -> tuple[Any, Any]:
    import torch

    if flat.device.type == "cpu":
        return flat, None
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=torch.cuda.is_available() and flat.device.type == "cuda")
    host.copy_(flat, non_blocking=True)
    event = None
    if flat.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return host, event


def _update_ratios(snaps: list[Snapshot], stats: Any) -> None:
    """‖update‖ / ‖weight before‖, reusing the weight's norm from the same step when it was recorded; all
    updates of the step in one vectorised :func:`~comgra_callbacks.stats.update_ratio` (~50 per step of a
    transformer: one operation each cost ~5 ms)."""
    import torch

    l2 = STAT_INDEX["l2"]
    value_row = {s.key.node: i for i, s in enumerate(snaps) if s.key.view == "value" and s.is_parameter}
    rows = [i for i, snap in enumerate(snaps) if snap.reference is not None]
    if not rows:
        return
    weights = [value_row.get(snaps[i].key.node) for i in rows]
    ref_l2 = stats[[j if j is not None else 0 for j in weights], l2]
    for position, (i, j) in enumerate(zip(rows, weights)):
        if j is None:  # the weight is not recorded this step: its norm from the kept copy
            ref_l2[position] = torch.linalg.vector_norm(snaps[i].reference.detach().float()).to(stats.device)
    stats[rows, STAT_INDEX["update_ratio"]] = update_ratio(stats[rows, l2], ref_l2).to(stats.dtype)


def _chosen_samples(snap: Snapshot, index: Any, batch_size: int | None) -> Any:
    return kept_samples(snap.tensor.detach(), snap.samples, index, is_parameter=snap.is_parameter, batch_size=batch_size)


def estimate_bytes(pending: PendingStep) -> int:
    """About how many bytes a step will take in the store (before compression), from its snapshots' detail."""
    total = 0
    for snap in pending.snapshots:
        total += reduce.N_STATS * 4
        shape = tuple(snap.tensor.shape)
        if snap.neurons and shape:
            matrix = reduce.neuron_matrix_shape(shape, is_parameter=snap.is_parameter, axis=snap.neuron_axis)
            total += reduce.N_NEURON_STATS * (matrix[1] if matrix else 1) * 4
        if snap.samples:
            per = math.prod(shape[1:]) if shape else 1
            total += 4 * (math.prod(shape) if snap.samples == FULL or not shape else min(snap.samples, shape[0]) * per)
    return total
