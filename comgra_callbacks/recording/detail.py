"""How much of each tensor a recorded step keeps, and which batch positions made a trigger fire.

Asked by the recorder at the end of a step, once per snapshot (the answer is cached per node and shape): the
``detail=`` rules of :class:`~.recorder.RecorderConfig` (first matching glob wins), ``detail_fn`` above them,
the defaults below them (statistics and per-neuron statistics everywhere, samples of inputs, targets, outputs
and losses), and the size limits (``max_neurons``, ``max_sample_numel``) that turn a choice down with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comgra_callbacks.recording.pending import FULL, Snapshot
from comgra_callbacks.recording.policy import detail_rules
from comgra_callbacks.recording.reduce import neuron_matrix_shape

if TYPE_CHECKING:
    from comgra_callbacks.recording.recorder import RecorderConfig


@dataclass(frozen=True)
class Detail:
    """How much of a tensor is kept: batch statistics always; per-neuron statistics; ``samples`` leading
    samples (``FULL`` = the whole tensor)."""

    neurons: bool = True
    samples: int = 0


class DetailChooser:
    """The detail of each node under one :class:`~.recorder.RecorderConfig`; ``warn(key, message)`` is called
    once per key when a limit turns a choice down."""

    def __init__(self, config: RecorderConfig, warn: Callable[[str, str], None]) -> None:
        self.config = config
        self._warn = warn
        self._rules = detail_rules(config.detail, "detail")
        self._cache: dict[tuple[str, str, tuple[int, ...], bool, bool, int | None], Detail] = {}

    def detail(self, name: str, kind: str, shape: tuple[int, ...], *, is_parameter: bool, triggered: bool = False, axis: int | None = None) -> Detail:
        """The detail kept for a tensor (cached: it is asked for every tensor of every recorded step).

        A step kept by a trigger keeps samples of every node that has a batch axis, whatever ``detail=``
        says for scheduled steps: what tracing an anomaly back to its origin needs."""
        key = (name, kind, shape, is_parameter, triggered, axis)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._decide(name, kind, shape, is_parameter=is_parameter, triggered=triggered, axis=axis)
        return cached

    def _decide(self, name: str, kind: str, shape: tuple[int, ...], *, is_parameter: bool, triggered: bool, axis: int | None) -> Detail:
        config = self.config
        detail = config.detail_fn(name, kind) if config.detail_fn is not None else None
        if detail is None:
            for matches, level in self._rules:
                if matches(name):
                    k = config.n_samples
                    detail = {"stats": Detail(False, 0), "neurons": Detail(True, 0), "samples": Detail(True, k), "full": Detail(True, FULL)}[level]
                    break
        if detail is None:
            with_samples = not is_parameter and kind in ("input", "target", "output", "loss")
            detail = Detail(neurons=config.neurons, samples=config.n_samples if with_samples else 0)
        if triggered and not is_parameter and len(shape) > 0 and detail.samples != FULL:
            detail = Detail(detail.neurons, max(detail.samples, config.n_samples))
        neurons, samples = detail.neurons, detail.samples
        matrix = neuron_matrix_shape(shape, is_parameter=is_parameter, axis=axis)
        if neurons and matrix is not None and matrix[1] > config.max_neurons:
            self._warn(f"neurons:{name}", f"comgra: node {name!r} has {matrix[1]} neurons (> max_neurons={config.max_neurons}); its per-neuron statistics are not kept.")
            neurons = False
        if samples:
            per_sample = 1
            for n in (shape if samples == FULL or not shape else shape[1:]):
                per_sample *= n
            if per_sample > config.max_sample_numel:
                self._warn(f"samples:{name}", f"comgra: one sample of node {name!r} has {per_sample} elements (> max_sample_numel={config.max_sample_numel}); its samples are not kept.")
                samples = 0
        return Detail(neurons, samples)


def culprits(snapshots: list[Snapshot], values: Mapping[str, Any], batch_size: int, n: int) -> list[int]:
    """Batch positions that made a trigger fire: non-finite values anywhere (first), then the ``n`` largest
    entries of a recorded per-sample loss (a vector of the batch's length whose name says loss)."""
    import torch

    found: list[int] = []
    for snap in snapshots:
        t = snap.tensor
        if snap.is_parameter or t.dim() == 0 or t.shape[0] != batch_size or not t.is_floating_point() or not t.numel():
            continue
        bad = ~torch.isfinite(t.reshape(batch_size, -1)).all(dim=1)
        if bool(bad.any()):
            found.extend(int(i) for i in bad.nonzero().reshape(-1).tolist())
    for name, tensor in values.items():
        if "loss" in name and tensor.dim() == 1 and tensor.shape[0] == batch_size and tensor.is_floating_point():
            order = torch.argsort(torch.nan_to_num(tensor.detach().float(), nan=float("inf")), descending=True)
            found.extend(int(i) for i in order[:n].tolist())
            break
    return list(dict.fromkeys(found))
