"""Circuits over training: attribution-patching scores of a fixed clean/corrupted pair, on recorded steps.

``ComgraCallback(circuit_tracking=CircuitTracking(clean, corrupted, nodes))`` (the same for
``ComgraTrainerCallback``) scores every unit of ``nodes`` with
:func:`~comgra_callbacks.analysis.attribution_patching` on the steps the schedule records (or on
``CircuitTracking(schedule=...)``), *before* the step's forward pass, like the measures: scores stamped with
step ``s`` are those of the model the forward pass of step ``s`` sees. They are stored with the run as scalars
named ``circuit/<name>/<node>/<unit>/score`` and ``.../effect`` and read back with ``run.circuit_scores()``: one
row per (step, node, unit), so that one sees when a circuit forms.

The evaluation costs one clean forward, one corrupted forward and one backward on the tracked steps only. It
runs in eval mode and leaves the model's mode, the parameters' gradients and the random number generators as
they were: training with tracking is bit for bit training without it.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
>>> tracking = CircuitTracking(torch.ones(1, 2), torch.zeros(1, 2), "1")
>>> rows = tracking.rows("circuit", 7, model)
>>> sorted({name.rsplit("/", 1)[1] for _, name, _ in rows}), len(rows), rows[0][0]
(['effect', 'score'], 6, 7)
>>> CircuitTracking(torch.ones(1, 2), torch.zeros(2, 2), "1")
Traceback (most recent call last):
...
comgra_callbacks.errors.ConfigError: `CircuitTracking`: expected `clean` and `corrupted` of the same shape, got {'': (1, 2)} and {'': (2, 2)}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import pandas as pd

from comgra_callbacks.errors import ConfigError, ConfigTypeError
from comgra_callbacks.recording.schedules import Schedule
from comgra_callbacks.store.format import CIRCUIT_PREFIX

DEFAULT_NAME = "circuit"


class CircuitTracking:
    """A fixed clean/corrupted pair whose attribution-patching scores are tracked during training.

    Args:
        clean / corrupted: paired model inputs with a leading batch axis, same shape (a tensor, or a dict of
            tensors passed as keyword arguments, as for the HF Trainer's models). Moved to the model's device
            when evaluated.
        nodes: a module name or a list of names (``named_modules()`` of the model the callback sees: for
            Lightning the LightningModule, e.g. ``"net.1"``).
        schedule: the steps to evaluate on; default: every step the schedule records.
        metric: as for :func:`~comgra_callbacks.analysis.attribution_patching` (a differentiable
            ``metric(logits_patched, logits_clean, logits_corrupted) -> 0-d tensor``); default the logit
            difference.
        units: ``"neuron"`` (one row per neuron of each node) or ``"node"`` (one row per node, unit -1).
    """

    def __init__(
        self,
        clean: Any,
        corrupted: Any,
        nodes: str | list[str],
        *,
        schedule: Schedule | None = None,
        metric: Callable[[Any, Any, Any], Any] | None = None,
        units: Literal["neuron", "node"] = "neuron",
    ) -> None:
        from comgra_callbacks.analysis.patching import _check_inputs
        from comgra_callbacks.validation import one_of, optional_callable

        _check_inputs("CircuitTracking", clean, corrupted)
        names = [nodes] if isinstance(nodes, str) else nodes
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigTypeError(f"`CircuitTracking(nodes=...)`: expected a module name or a non-empty list of names, got {nodes!r}.")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ConfigTypeError(f"`CircuitTracking(schedule=...)`: expected a schedule such as Every(50) or None, got {schedule!r}.")
        self.clean, self.corrupted, self.nodes = clean, corrupted, list(names)
        self.schedule = schedule
        self.metric = optional_callable("CircuitTracking", "metric", metric)
        self.units = one_of("CircuitTracking", "units", units, ("neuron", "node"))

    def wants(self, step: int, recorded: bool) -> bool:
        """Whether step ``step`` is evaluated (``recorded``: the schedule records it)."""
        return recorded if self.schedule is None else self.schedule.wants(step)

    def scores(self, model: Any) -> pd.DataFrame:
        """The attribution-patching table of ``model`` now (columns node, unit, score, effect); the model's
        mode, gradients and the random generators are left as they were."""
        import torch

        from comgra_callbacks.analysis.patching import attribution_patching

        device = next((p.device for p in model.parameters()), None)
        modes = [(m, m.training) for m in model.modules()]
        grads = [(p, p.grad) for p in model.parameters()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        model.eval()
        try:
            return attribution_patching(model, _to(self.clean, device), _to(self.corrupted, device), self.nodes, metric=self.metric, units=self.units)
        finally:
            for m, mode in modes:
                m.training = mode
            for p, g in grads:
                p.grad = g
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def rows(self, name: str, step: int, model: Any) -> list[tuple[int, str, float]]:
        """The scalar rows ``(step, scalar name, value)`` storing the scores of ``model`` at ``step``."""
        table = self.scores(model)
        rows: list[tuple[int, str, float]] = []
        for node, unit, score, effect in table[["node", "unit", "score", "effect"]].itertuples(index=False):
            rows.append((step, scalar_name(name, node, int(unit), "score"), float(score)))
            rows.append((step, scalar_name(name, node, int(unit), "effect"), float(effect)))
        return rows

    def describe(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "units": self.units, "schedule": repr(self.schedule) if self.schedule is not None else None,
                "metric": getattr(self.metric, "__qualname__", None) if self.metric is not None else None}

    def __repr__(self) -> str:
        return f"CircuitTracking(nodes={self.nodes!r}, schedule={self.schedule!r}, units={self.units!r})"


def _to(x: Any, device: Any) -> Any:
    if device is None:
        return x
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def scalar_name(name: str, node: str, unit: int, field: str) -> str:
    """``circuit/<name>/<node>/<unit>/<field>``: node names may hold dots or slashes, so the name is split from
    both ends when read.

    >>> scalar_name("circuit", "net.1", 3, "score")
    'circuit/circuit/net.1/3/score'
    """
    return f"{CIRCUIT_PREFIX}{name}/{node}/{unit}/{field}"


def check_circuit_tracking(owner: str, value: Any) -> dict[str, CircuitTracking] | None:
    """Validate ``circuit_tracking=``: a :class:`CircuitTracking` (stored as ``"circuit"``) or a dict
    ``{name: CircuitTracking}``."""
    if value is None:
        return None
    if isinstance(value, CircuitTracking):
        return {DEFAULT_NAME: value}
    if not isinstance(value, Mapping) or not value:
        raise ConfigTypeError(f"`{owner}(circuit_tracking=...)`: expected CircuitTracking(clean, corrupted, nodes) or a dict {{name: CircuitTracking}}, got {value!r}.")
    for name, item in value.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"`{owner}(circuit_tracking=...)`: expected non-empty names without '/', got {name!r}.")
        if not isinstance(item, CircuitTracking):
            raise ConfigTypeError(f"`{owner}(circuit_tracking=...)`: expected CircuitTracking(...) for {name!r}, got {item!r}.")
    return dict(value)
