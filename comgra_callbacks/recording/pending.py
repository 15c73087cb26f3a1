"""A recorded step on its way to the store: snapshots taken on the training thread, reduced on the writer's.

:class:`PendingStep` is what :class:`~comgra_callbacks.store.background.BackgroundWriter` queues. Its
:meth:`PendingStep.materialize` runs on the writer thread in two phases:

1. batch statistics of every snapshot (see :mod:`comgra_callbacks.recording.reduce`): CPU snapshots with
   numpy, others with torch on their device and one transfer of all results;
2. for an *armed* step, the policy's triggers look at those statistics and decide whether it is kept;
   only a kept step pays for per-neuron statistics and samples (again one transfer on a device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comgra_callbacks.recording import reduce
from comgra_callbacks.store.format import STAT_INDEX, SeriesKey
from comgra_callbacks.store.writer import HostEntry, HostRecord

FULL = -1  # Snapshot.samples value: keep the whole tensor


@dataclass
class Snapshot:
    """One tensor of one series, owned by the recorder (never changed after it was taken).

    Attributes:
        key: node, role, iteration and view.
        tensor: the snapshot.
        dtype: torch dtype name of the recorded tensor.
        is_parameter: per-neuron statistics go along the first axis for parameters.
        neurons: whether to keep per-neuron statistics.
        samples: how many leading samples to keep (0: none, ``FULL``: the whole tensor).
        reference: for an update, the weight before it (for ``update_ratio``).
    """

    key: SeriesKey
    tensor: Any
    dtype: str
    is_parameter: bool = False
    neurons: bool = True
    samples: int = 0
    reference: Any = None


@dataclass
class PendingStep:
    """A recorded (or armed) step: its place in training and its snapshots.

    ``reason`` is why it is kept (``"schedule"``, ``"forced"``, a trigger's name); None for an armed step
    whose fate the policy decides from its statistics. ``sample_index`` holds the batch positions chosen
    by a sample selector (None: the first samples), applied to tensors whose first axis is the batch.
    """

    step: int
    step_type: str
    epoch: int
    batch_idx: int
    time: float
    reason: str | None
    snapshots: list[Snapshot] = field(default_factory=list)
    backend: str = "auto"  # "auto": numpy for CPU tensors, torch for others; "torch": torch for all
    policy: Any = None
    parameters: frozenset[str] = frozenset()
    sample_index: Any = None
    batch_size: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshots (what the queue bound counts; zero once materialized)."""
        return sum(s.tensor.numel() * s.tensor.element_size() for s in self.snapshots)

    def materialize(self) -> HostRecord | None:
        """Statistics, the keep decision, then neurons and samples; None when an armed step is dropped."""
        snaps, self.snapshots = self.snapshots, []  # release the tensors as soon as this returns
        on_device = [self.backend != "auto" or s.tensor.device.type != "cpu" for s in snaps]
        stats = _numpy_stats([s for s, d in zip(snaps, on_device) if not d])
        device_stats = _torch_stats([s for s, d in zip(snaps, on_device) if d])
        rows: list[np.ndarray] = []
        for d in on_device:
            rows.append(device_stats.pop(0) if d else stats.pop(0))
        _update_ratios(snaps, rows)
        if self.policy is not None:
            from comgra_callbacks.recording.triggers import StepSummary

            summary = StepSummary.from_entries([HostEntry(s.key, r) for s, r in zip(snaps, rows)], self.parameters, self.step)
            self.reason = self.policy.decide(summary, self.reason)
            if self.reason is None:
                return None
        elif self.reason is None:
            self.reason = "schedule"
        index = None if self.sample_index is None else self.sample_index.detach().to("cpu").reshape(-1)
        host_details = _numpy_details([(s, r) for s, r, d in zip(snaps, rows, on_device) if not d], index, self.batch_size)
        device_details = _torch_details([s for s, d in zip(snaps, on_device) if d], index, self.batch_size)
        record = HostRecord(self.step, self.step_type, self.epoch, self.batch_idx, self.time, self.reason)
        for snap, row, d in zip(snaps, rows, on_device):
            neurons, samples = device_details.pop(0) if d else host_details.pop(0)
            record.entries.append(HostEntry(snap.key, row, neurons, samples, snap.dtype))
        if self.policy is not None:
            self.policy.kept(self.step, stored_bytes(record))
        return record


def stored_bytes(record: HostRecord) -> int:
    """About how many bytes the record takes in the store (before compression)."""
    total = 0
    for entry in record.entries:
        total += entry.stats.nbytes
        total += 0 if entry.neurons is None else entry.neurons.nbytes
        total += 0 if entry.samples is None else entry.samples.nbytes
    return total


def _update_ratios(snaps: list[Snapshot], rows: list[np.ndarray]) -> None:
    """‖update‖ / ‖weight before‖, reusing the weight's norm from the same step when it was recorded."""
    value_l2 = {s.key.node: float(r[STAT_INDEX["l2"]]) for s, r in zip(snaps, rows) if s.key.view == "value" and s.is_parameter}
    for snap, row in zip(snaps, rows):
        if snap.reference is None:
            continue
        ref_l2 = value_l2.get(snap.key.node)
        if ref_l2 is None:
            ref = snap.reference.detach().to("cpu").double().reshape(-1)
            ref_l2 = float(ref.dot(ref).sqrt())
        l2 = float(row[STAT_INDEX["l2"]])
        row[STAT_INDEX["update_ratio"]] = l2 / ref_l2 if ref_l2 > 0 else (math.inf if l2 > 0 else 0.0)


def _chosen_samples(t: Any, snap: Snapshot, index: Any, batch_size: int | None) -> Any:
    if snap.samples == FULL or t.ndim == 0:
        return t
    if index is not None and not snap.is_parameter and batch_size is not None and t.shape[0] == batch_size:
        return t[index]
    return t[: snap.samples]


# ------------------------------------------------------------------------------------ numpy (CPU)
def _numpy_stats(snaps: list[Snapshot]) -> list[np.ndarray]:
    return [reduce.stats_numpy(s.tensor.numpy()) for s in snaps]


def _numpy_details(items: list[tuple[Snapshot, np.ndarray]], index: Any, batch_size: int | None) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    index_np = None if index is None else index.numpy()
    out = []
    for snap, row in items:
        a = snap.tensor.numpy()
        neurons = None
        if snap.neurons:
            matrix = reduce.neuron_matrix_numpy(a, is_parameter=snap.is_parameter)
            if matrix is not None:
                bad = row[STAT_INDEX["nan_count"]] + row[STAT_INDEX["inf_count"]] > 0
                neurons = reduce.neurons_numpy(matrix, has_nonfinite=bool(bad))
        samples = None
        if snap.samples:
            samples = np.array(_chosen_samples(a, snap, index_np, batch_size), dtype=np.float32, copy=True)
        out.append((neurons, samples))
    return out


# --------------------------------------------------------------------------------- torch (device)
def _torch_stats(snaps: list[Snapshot]) -> list[np.ndarray]:
    if not snaps:
        return []
    import torch

    host = torch.stack([reduce.stats_torch(s.tensor) for s in snaps]).cpu().numpy()  # one transfer
    return [row.copy() for row in host]


def _torch_details(snaps: list[Snapshot], index: Any, batch_size: int | None) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    if not snaps:
        return []
    import torch

    pieces: list[Any] = []
    layout: list[tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = []
    for snap in snaps:
        neuron_shape = sample_shape = None
        if snap.neurons:
            matrix = reduce.neuron_matrix_torch(snap.tensor, is_parameter=snap.is_parameter)
            if matrix is not None:
                values = reduce.neurons_torch(matrix)
                neuron_shape = tuple(values.shape)
                pieces.append(values.reshape(-1))
        if snap.samples:
            device_index = None if index is None else index.to(snap.tensor.device)
            chosen = _chosen_samples(snap.tensor, snap, device_index, batch_size)
            sample_shape = tuple(chosen.shape)
            pieces.append(chosen.reshape(-1).to(torch.float32))
        layout.append((neuron_shape, sample_shape))
    host = torch.cat([p.to(torch.float32) for p in pieces]).cpu().numpy() if pieces else np.empty(0, np.float32)  # one transfer
    out = []
    offset = 0
    for neuron_shape, sample_shape in layout:
        parts: list[np.ndarray | None] = []
        for shape in (neuron_shape, sample_shape):
            if shape is None:
                parts.append(None)
                continue
            size = math.prod(shape)
            parts.append(host[offset : offset + size].reshape(shape))
            offset += size
        out.append((parts[0], parts[1]))
    return out
