"""comgra_callbacks: look inside neural networks while they train.

Add :class:`ComgraCallback` to a Lightning ``Trainer`` (or :class:`ComgraTrainerCallback` to a HuggingFace
``Trainer``), train as usual, and read the run back with :func:`open_run` or explore it in the dashboard.

Heavy imports happen on first use: ``import comgra_callbacks`` loads neither Lightning nor the dashboard.

>>> import comgra_callbacks
>>> callable(comgra_callbacks.record)
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from comgra_callbacks._version import __version__
from comgra_callbacks.circuit_tracking import CircuitTracking
from comgra_callbacks.errors import (
    ComgraError,
    ConfigError,
    ConfigTypeError,
    CorruptStoreError,
    FormatVersionError,
    MissingDependencyError,
    NodeNotFoundError,
    RecordingError,
    RunNotFoundError,
    StepNotFoundError,
    StoreError,
)
from comgra_callbacks.recording.context import connect, note, record, record_this_step
from comgra_callbacks.recording.interventions import Ablate, Patch, RecordedStep
from comgra_callbacks.recording.sampling import Balanced, First, Indices, TopK
from comgra_callbacks.recording.schedules import (
    AllOf,
    AnyOf,
    Budget,
    Decaying,
    Every,
    LogSpaced,
    Never,
    Spaced,
    Steps,
)
from comgra_callbacks.recording.triggers import GradNorm, LossSpike, NonFinite, Predicate

_LAZY = {
    "ComgraCallback": "comgra_callbacks.integrations.lightning",
    "ComgraTrainerCallback": "comgra_callbacks.integrations.hf",
    "open_run": "comgra_callbacks.store.reader",
    "open_runs": "comgra_callbacks.store.reader",
    "Run": "comgra_callbacks.store.reader",
}

if TYPE_CHECKING:
    from comgra_callbacks import analysis
    from comgra_callbacks.integrations.hf import ComgraTrainerCallback
    from comgra_callbacks.integrations.lightning import ComgraCallback
    from comgra_callbacks.store.reader import Run, open_run, open_runs

__all__ = [
    "Ablate",
    "AllOf",
    "AnyOf",
    "Balanced",
    "Budget",
    "CircuitTracking",
    "ComgraCallback",
    "ComgraError",
    "ComgraTrainerCallback",
    "ConfigError",
    "ConfigTypeError",
    "CorruptStoreError",
    "Decaying",
    "Every",
    "First",
    "FormatVersionError",
    "GradNorm",
    "Indices",
    "LogSpaced",
    "LossSpike",
    "MissingDependencyError",
    "Never",
    "NodeNotFoundError",
    "NonFinite",
    "Patch",
    "Predicate",
    "RecordedStep",
    "RecordingError",
    "Run",
    "RunNotFoundError",
    "Spaced",
    "StepNotFoundError",
    "StoreError",
    "Steps",
    "TopK",
    "__version__",
    "analysis",
    "connect",
    "note",
    "open_run",
    "open_runs",
    "record",
    "record_this_step",
]


def __getattr__(name: str) -> Any:
    if name == "analysis":  # a subpackage (numpy, pandas, networkx only), imported on first use
        return importlib.import_module("comgra_callbacks.analysis")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'comgra_callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
