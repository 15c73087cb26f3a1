"""Which individual samples of a batch are kept: the first k, fixed dataset items, or chosen by a criterion.

A selector returns positions in the batch; the same positions are kept for every node of the step, so
"sample 2" is the same input everywhere in the graph. The positions are recorded too, as the node
``sample_index`` (and, for :class:`Indices`, the dataset indices as ``sample_dataset_index``).

>>> import torch
>>> TopK("per_sample_loss", k=2).select({}, {"per_sample_loss": torch.tensor([0.1, 0.9, 0.5, 0.7])}, 4, 3)
(tensor([1, 3]), None)
>>> Balanced("label", per_category=1).select({"label": torch.tensor([2, 0, 2, 1, 0])}, {}, 5, 4)
(tensor([1, 3, 0]), None)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from comgra_callbacks.errors import ConfigError, ConfigTypeError, RecordingError
from comgra_callbacks.store.messages import FULL


def kept_samples(a: Any, samples: int, index: Any, *, is_parameter: bool, batch_size: int | None) -> Any:
    """The samples kept of one tensor (numpy array or torch tensor; the same rule on the training side and in
    the writer process): all of it for ``samples == FULL`` or a 0-d tensor; for an activation with the batch
    as its first axis and a selector's positions ``index``, those rows, in that order; else the first
    ``samples`` rows (a parameter has no samples, so its leading rows stand in). ``samples`` is positive or
    ``FULL``; nothing is copied (a torch ``index`` moves to the tensor's device, without a sync).

    >>> import numpy as np
    >>> a = np.arange(8).reshape(4, 2)
    >>> kept_samples(a, 1, np.array([3, 0]), is_parameter=False, batch_size=4).tolist()
    [[6, 7], [0, 1]]
    >>> kept_samples(a, 1, np.array([3, 0]), is_parameter=True, batch_size=4).tolist()
    [[0, 1]]
    """
    if samples == FULL or a.ndim == 0:
        return a
    if index is not None and not is_parameter and batch_size is not None and a.shape[0] == batch_size:
        if hasattr(a, "index_select"):  # torch
            return a.index_select(0, index.to(a.device))
        return a[index]
    return a[:samples]


def batch_field(batch: Any, field: str | int, owner: str) -> Any:
    """``batch[field]`` for mappings and sequences, ``batch.field`` for objects; a clear error otherwise."""
    try:
        if isinstance(batch, Mapping):
            return batch[field]
        if isinstance(field, int) and isinstance(batch, (tuple, list)):
            return batch[field]
        if isinstance(field, str) and hasattr(batch, field):
            return getattr(batch, field)
        if hasattr(batch, "__getitem__") and not isinstance(batch, (tuple, list)):
            return batch[field]
    except (KeyError, IndexError, TypeError):
        pass
    keys = list(batch.keys()) if isinstance(batch, Mapping) else f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise RecordingError(f"`{owner}`: the batch has no field {field!r}; it has {keys}.")


class SampleSelector:
    """Base class: ``select(batch, values, batch_size, k)`` returns ``(positions or None, dataset ids or None)``;
    ``None`` positions mean the first ``k``. ``values`` maps node names to the tensors recorded in the step."""

    def select(self, batch: Any, values: Mapping[str, Any], batch_size: int, k: int) -> tuple[Any, Any]:
        return None, None


class First(SampleSelector):
    """The first ``k`` samples of the batch (the default)."""

    def __repr__(self) -> str:
        return "First()"


class Indices(SampleSelector):
    """The samples whose dataset index is one of ``indices``, whenever the batch holds them; the batch must
    carry the dataset index of each sample in ``field``. A batch holding none of them keeps no samples.

    Args:
        field: where the batch carries dataset indices (a dict key, attribute name, or tuple position).
        indices: the dataset indices to follow through training.
    """

    def __init__(self, field: str | int, indices: Iterable[int]) -> None:
        if not isinstance(field, (str, int)) or isinstance(field, bool):
            raise ConfigTypeError(f"`Indices(field=...)`: expected a batch key, attribute name or position, got {field!r}.")
        self.field = field
        self.indices = sorted({int(i) for i in indices})
        if not self.indices:
            raise ConfigError("`Indices(indices=...)`: expected at least one dataset index, got none.")

    def select(self, batch: Any, values: Mapping[str, Any], batch_size: int, k: int) -> tuple[Any, Any]:
        import torch

        ids = torch.as_tensor(batch_field(batch, self.field, "Indices(field=...)")).reshape(-1).cpu()
        wanted = torch.tensor(self.indices, dtype=ids.dtype)
        positions = torch.nonzero(torch.isin(ids, wanted)).reshape(-1)
        return positions, ids[positions]

    def __repr__(self) -> str:
        return f"Indices({self.field!r}, {self.indices})"


class TopK(SampleSelector):
    """The ``k`` samples with the largest (or smallest) value of a per-sample vector recorded in the step,
    e.g. ``record("per_sample_loss", loss_vector)``: the outliers are what is kept. Chosen on the device,
    without a synchronisation.

    Args:
        node: the recorded node holding one value per sample, shape ``(B,)``.
        k: how many (default: the callback's ``n_samples``).
        largest: False keeps the smallest instead.
    """

    def __init__(self, node: str, k: int | None = None, largest: bool = True) -> None:
        if not isinstance(node, str) or not node:
            raise ConfigTypeError(f"`TopK(node=...)`: expected the name of a recorded per-sample vector, got {node!r}.")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise ConfigError(f"`TopK(k=...)`: expected a positive int or None, got {k!r}.")
        self.node, self.k, self.largest = node, k, bool(largest)

    def select(self, batch: Any, values: Mapping[str, Any], batch_size: int, k: int) -> tuple[Any, Any]:
        import torch

        vector = values.get(self.node)
        if vector is None:
            raise RecordingError(f"`TopK(node={self.node!r})`: no tensor named {self.node!r} was recorded in this step; recorded: {sorted(values)[:10]}.")
        flat = vector.detach().reshape(-1).float()
        if flat.numel() != batch_size:
            raise RecordingError(f"`TopK(node={self.node!r})`: expected one value per sample ({batch_size}), got shape {tuple(vector.shape)}.")
        count = min(self.k or k, flat.numel())
        return torch.topk(flat, count, largest=self.largest).indices, None

    def __repr__(self) -> str:
        return f"TopK({self.node!r}, k={self.k}, largest={self.largest})"


class Balanced(SampleSelector):
    """The same number of samples from each category: ``labels`` is a batch field (e.g. ``"label"``) or a
    function ``batch -> labels``, one label per sample; up to ``per_category`` samples per label are kept,
    in order of label.

    Args:
        labels: where the per-sample category comes from.
        per_category: samples kept per category.
    """

    def __init__(self, labels: str | int | Callable[[Any], Any], per_category: int = 1) -> None:
        if not (callable(labels) or isinstance(labels, (str, int))) or isinstance(labels, bool):
            raise ConfigTypeError(f"`Balanced(labels=...)`: expected a batch field or a function batch -> labels, got {labels!r}.")
        if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category <= 0:
            raise ConfigError(f"`Balanced(per_category=...)`: expected a positive int, got {per_category!r}.")
        self.labels, self.per_category = labels, per_category

    def select(self, batch: Any, values: Mapping[str, Any], batch_size: int, k: int) -> tuple[Any, Any]:
        import torch

        raw = self.labels(batch) if callable(self.labels) else batch_field(batch, self.labels, "Balanced(labels=...)")
        labels = [x.item() if hasattr(x, "item") else x for x in (raw.reshape(-1).tolist() if hasattr(raw, "reshape") else list(raw))]
        if len(labels) != batch_size:
            raise RecordingError(f"`Balanced(labels=...)`: expected one label per sample ({batch_size}), got {len(labels)}.")
        chosen: dict[Any, list[int]] = {}
        for position, label in enumerate(labels):
            taken = chosen.setdefault(label, [])
            if len(taken) < self.per_category:
                taken.append(position)
        order = sorted(chosen, key=lambda label: (str(type(label)), label))
        return torch.tensor([p for label in order for p in chosen[label]], dtype=torch.long), None

    def __repr__(self) -> str:
        name = getattr(self.labels, "__name__", repr(self.labels))
        return f"Balanced({name}, per_category={self.per_category})"


def as_selector(spec: Any, owner: str) -> SampleSelector:
    """``"first"`` or a selector object."""
    if spec is None or spec == "first":
        return First()
    if isinstance(spec, SampleSelector):
        return spec
    raise ConfigTypeError(f"`{owner}(samples=...)`: expected 'first' or a sample selector (Indices, TopK, Balanced), got {spec!r}.")
