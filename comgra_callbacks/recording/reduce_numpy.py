"""Statistics with numpy, for the writer process (which never imports torch): the kernels of
:mod:`comgra_callbacks.stats` applied to one array, read once (batch and per-neuron statistics from the
same partial sums; tests hold them to the torch path's numbers).

>>> row, neurons = reduce_array(np.array([[1.0, 2.0], [np.nan, 0.0]], dtype=np.float32), neurons=True)
>>> named = dict(zip(STAT_NAMES, row.round(3).tolist()))
>>> named["mean"], named["nan_count"], named["zero_frac"], neurons.shape
(1.0, 1.0, 0.25, (4, 2))
"""

from __future__ import annotations

import numpy as np

from comgra_callbacks import stats as spec
from comgra_callbacks.stats import N_STATS, STAT_INDEX, STAT_NAMES

__all__ = ["N_STATS", "STAT_INDEX", "STAT_NAMES", "neuron_matrix_numpy", "reduce_array", "stats_numpy"]

stats_numpy = spec.stats_numpy


def reduce_array(a: np.ndarray, *, neurons: bool, is_parameter: bool = False, axis: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Batch statistics ``(N_STATS,)`` float32 of ``a`` and, when ``neurons``, its per-neuron statistics
    ``(N_NEURON_STATS, neurons)`` (None for a scalar), from one pass of partial sums."""
    a = np.asarray(a)
    matrix = neuron_matrix_numpy(a, is_parameter=is_parameter, axis=axis) if neurons else None
    if matrix is None:
        flat = a.reshape(-1, 1)  # one neuron of all the elements
        return spec.batch_from_partials(spec.partials_numpy(flat)[None], a.size, np)[0].astype(np.float32), None
    p = spec.partials_numpy(matrix)
    return spec.batch_from_partials(p[None], a.size, np)[0].astype(np.float32), spec.neurons_from_partials(p, np)


def neuron_matrix_numpy(a: np.ndarray, *, is_parameter: bool, axis: int | None = None) -> np.ndarray | None:
    """``a`` viewed as ``(items, neurons)`` (transposed for parameters: one neuron per output unit; the
    neurons on ``axis`` for activations, default the last)."""
    if a.ndim == 0:
        return None
    if is_parameter:
        return a.reshape(a.shape[0], -1).T
    if a.ndim == 1:
        return a.reshape(a.shape[0], 1)
    if axis is not None and axis % a.ndim != a.ndim - 1:
        a = np.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1])
