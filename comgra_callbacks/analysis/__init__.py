"""Answers as pure functions: over a :class:`~comgra_callbacks.store.reader.Run`, for notebooks and the
dashboard, and over a model for circuit discovery.

Nothing here imports Panel or param, and nothing imports torch at import time (the patching functions
import it when called): numpy, pandas and networkx. Each function over a run reads the chunks its question
needs through the reader and returns a DataFrame (or a dict).

* :func:`compare` -- two steps, step ranges, step types or runs, node by node, ranked by change against the
  node's spread over training (:func:`range_stats`, :func:`compare_nodes`, :func:`spread` underneath).
* :func:`trace` -- one step, node by node in dependency order: non-finite counts, how far a sample lies from
  its batch, which node is anomalous and where it started (its origin).
* :func:`first_anomaly` -- the first recorded step with a NaN or an infinity, and its origin.
* :func:`correlate` -- across records, what moves with a target (a node's statistic or a scalar): hints.
* :func:`activation_patching`, :func:`attribution_patching`, :func:`circuit` -- circuit discovery on a model:
  which units carry the difference between a clean and a corrupted input; :func:`tracked_circuit` -- the
  circuit tracked during training (``run.circuit_scores()``) at one step.
* :func:`paired_stats`, :func:`paired_steps` -- an intervention against the normal record of the same steps.

>>> from comgra_callbacks import analysis
>>> sorted(name for name in analysis.__all__ if not name[0].isupper())[:5]
['activation_patching', 'attribution_patching', 'circuit', 'compare', 'compare_nodes']

See docs/analysis.md.
"""

from __future__ import annotations

from comgra_callbacks.analysis.compare import compare, compare_nodes, range_stats, spread
from comgra_callbacks.analysis.correlate import correlate, spearman
from comgra_callbacks.analysis.interventions import paired_stats, paired_steps
from comgra_callbacks.analysis.order import Flow
from comgra_callbacks.analysis.patching import (
    activation_patching,
    attribution_patching,
    circuit,
    tracked_circuit,
)
from comgra_callbacks.analysis.trace import Z_THRESHOLD, first_anomaly, sample_positions, sample_z, trace

__all__ = [
    "Flow",
    "Z_THRESHOLD",
    "activation_patching",
    "attribution_patching",
    "circuit",
    "compare",
    "compare_nodes",
    "correlate",
    "first_anomaly",
    "paired_stats",
    "paired_steps",
    "range_stats",
    "sample_positions",
    "sample_z",
    "spearman",
    "spread",
    "trace",
    "tracked_circuit",
]
