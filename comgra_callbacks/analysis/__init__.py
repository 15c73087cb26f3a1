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
* :func:`fourier` -- the Fourier spectrum of a recorded full tensor (or of a function of several) at a step
  (:func:`spectrum` underneath, the math ``FourierSparsity`` uses too).
* :func:`derive` -- a function of recorded full tensors at every record, stored as a measure of the run.
* :func:`phases` -- change points of a series (test accuracy, excluded loss): the phases of training.
* :func:`update_outliers`, :func:`contributions`, :func:`top_items`, :func:`influence` -- which training items
  moved a neuron: outlier updates, each sample's share of an update, TracIn (runs recorded with ``attribution=``).
* :func:`activation_patching`, :func:`attribution_patching`, :func:`circuit` -- circuit discovery on a model:
  which units carry the difference between a clean and a corrupted input; :func:`tracked_circuit` -- the
  circuit tracked during training (``run.circuit_scores()``) at one step.
* :func:`paired_stats`, :func:`paired_steps` -- an intervention against the normal record of the same steps.

>>> from comgra_callbacks import analysis
>>> sorted(name for name in analysis.__all__ if not name[0].isupper())[:5]
['activation_patching', 'attribution_patching', 'circuit', 'compare', 'compare_measures']

See docs/analysis.md.
"""

from __future__ import annotations

from comgra_callbacks.analysis.attribution import contributions, influence, top_items, update_outliers
from comgra_callbacks.analysis.compare import compare, compare_nodes, range_stats, spread
from comgra_callbacks.analysis.correlate import correlate, spearman
from comgra_callbacks.analysis.derive import derive
from comgra_callbacks.analysis.fourier import Spectrum, fourier, spectrum
from comgra_callbacks.analysis.interventions import paired_stats, paired_steps
from comgra_callbacks.analysis.order import Flow
from comgra_callbacks.analysis.patching import (
    activation_patching,
    attribution_patching,
    circuit,
    tracked_circuit,
)
from comgra_callbacks.analysis.phases import compare_measures, phases
from comgra_callbacks.analysis.trace import Z_THRESHOLD, first_anomaly, sample_positions, sample_z, trace

__all__ = [
    "Flow",
    "Spectrum",
    "Z_THRESHOLD",
    "activation_patching",
    "attribution_patching",
    "circuit",
    "compare",
    "compare_measures",
    "compare_nodes",
    "contributions",
    "correlate",
    "derive",
    "first_anomaly",
    "fourier",
    "influence",
    "paired_stats",
    "paired_steps",
    "phases",
    "range_stats",
    "sample_positions",
    "sample_z",
    "spearman",
    "spectrum",
    "spread",
    "top_items",
    "trace",
    "tracked_circuit",
    "update_outliers",
]
