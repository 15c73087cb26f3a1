"""A recorded step on its way to the store: snapshots taken on the training thread, reduced on the writer's.

:class:`PendingStep` is what :class:`~comgra_callbacks.store.background.BackgroundWriter` queues. Its
:meth:`PendingStep.materialize` runs on the writer thread and computes the statistics (see
:mod:`comgra_callbacks.recording.reduce`): CPU snapshots with numpy, CUDA snapshots with torch on the device
followed by one transfer of all of the step's results.
"""

from __future__ import annotations

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


def _sample_slice(t: Any, samples: int) -> Any:
    if samples == FULL or t.ndim == 0:
        return t
    return t[:samples]


@dataclass
class PendingStep:
    """A recorded step: its place in training and its snapshots."""

    step: int
    step_type: str
    epoch: int
    batch_idx: int
    time: float
    reason: str
    snapshots: list[Snapshot] = field(default_factory=list)
    backend: str = "auto"  # "auto": numpy for CPU tensors, torch for others; "torch": torch for all

    @property
    def nbytes(self) -> int:
        total = 0
        for snap in self.snapshots:
            total += snap.tensor.numel() * snap.tensor.element_size()
        return total

    def materialize(self) -> HostRecord:
        entries: list[HostEntry | None] = [None] * len(self.snapshots)
        on_cpu = [i for i, snap in enumerate(self.snapshots) if self.backend == "auto" and snap.tensor.device.type == "cpu"]
        on_device = [i for i in range(len(self.snapshots)) if self.backend != "auto" or self.snapshots[i].tensor.device.type != "cpu"]
        if on_cpu:
            for i, entry in zip(on_cpu, self._numpy_entries([self.snapshots[i] for i in on_cpu])):
                entries[i] = entry
        if on_device:
            for i, entry in zip(on_device, self._torch_entries([self.snapshots[i] for i in on_device])):
                entries[i] = entry
        record = HostRecord(self.step, self.step_type, self.epoch, self.batch_idx, self.time, self.reason)
        record.entries = [e for e in entries if e is not None]
        self.snapshots = []  # release the tensors as soon as they are reduced
        return record

    @staticmethod
    def _numpy_entries(snaps: list[Snapshot]) -> list[HostEntry]:
        arrays = [snap.tensor.numpy() for snap in snaps]
        stats = [reduce.stats_numpy(a) for a in arrays]
        value_l2 = {snap.key.node: float(row[STAT_INDEX["l2"]]) for snap, row in zip(snaps, stats) if snap.key.view == "value" and snap.is_parameter}
        entries = []
        for snap, a, row in zip(snaps, arrays, stats):
            if snap.reference is not None:
                ref_l2 = value_l2.get(snap.key.node)
                if ref_l2 is None:
                    ref = snap.reference.numpy().reshape(-1).astype(np.float64)
                    ref_l2 = float(np.sqrt(np.dot(ref, ref)))
                l2 = float(row[STAT_INDEX["l2"]])
                row[STAT_INDEX["update_ratio"]] = l2 / ref_l2 if ref_l2 > 0 else (np.inf if l2 > 0 else 0.0)
            neurons = None
            if snap.neurons:
                matrix = reduce.neuron_matrix_numpy(a, is_parameter=snap.is_parameter)
                if matrix is not None:
                    bad = row[STAT_INDEX["nan_count"]] + row[STAT_INDEX["inf_count"]] > 0
                    neurons = reduce.neurons_numpy(matrix, has_nonfinite=bool(bad))
            samples = None
            if snap.samples:
                samples = np.array(_sample_slice(a, snap.samples), dtype=np.float32, copy=True)
            entries.append(HostEntry(snap.key, row, neurons, samples, snap.dtype))
        return entries

    @staticmethod
    def _torch_entries(snaps: list[Snapshot]) -> list[HostEntry]:
        """Reduce on the device, then move every result to the host in one transfer."""
        import torch

        pieces: list[Any] = []
        layout: list[tuple[int, tuple[int, int] | None, tuple[int, ...] | None]] = []
        for snap in snaps:
            t = snap.tensor
            ref_l2 = None
            if snap.reference is not None:
                ref_l2 = torch.linalg.vector_norm(snap.reference.detach().reshape(-1).to(torch.float64))
            pieces.append(reduce.stats_torch(t, ref_l2))
            neuron_shape = None
            if snap.neurons:
                matrix = reduce.neuron_matrix_torch(t, is_parameter=snap.is_parameter)
                if matrix is not None:
                    values = reduce.neurons_torch(matrix)
                    neuron_shape = tuple(values.shape)
                    pieces.append(values.reshape(-1))
            sample_shape = None
            if snap.samples:
                chosen = _sample_slice(t, snap.samples)
                sample_shape = tuple(chosen.shape)
                pieces.append(chosen.reshape(-1).to(torch.float32))
            layout.append((reduce.N_STATS, neuron_shape, sample_shape))
        host = torch.cat([p.reshape(-1).to(torch.float32) for p in pieces]).cpu().numpy()
        entries = []
        offset = 0
        for snap, (n_stats, neuron_shape, sample_shape) in zip(snaps, layout):
            stats = host[offset : offset + n_stats]
            offset += n_stats
            neurons = None
            if neuron_shape is not None:
                size = neuron_shape[0] * neuron_shape[1]
                neurons = host[offset : offset + size].reshape(neuron_shape)
                offset += size
            samples = None
            if sample_shape is not None:
                size = int(np.prod(sample_shape)) if sample_shape else 1
                samples = host[offset : offset + size].reshape(sample_shape)
                offset += size
            entries.append(HostEntry(snap.key, stats, neurons, samples, snap.dtype))
        return entries
