"""The data work behind each view, separated from drawing: what the benchmark times and the tests check.

:func:`tensor_data` answers "what does the tensor panel show for this selection"; :func:`side_summary` and
:func:`node_comparison` feed the training-phase comparison, whose ranking is
:func:`comgra_callbacks.analysis.compare_nodes`. All of them go through the cached
:class:`~comgra_callbacks.dashboard.data.RunData`, so a repeated question costs a dictionary lookup.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from comgra_callbacks.dashboard.data import Missing, RunData
from comgra_callbacks.dashboard.state import SelectionSnapshot, Side
from comgra_callbacks.store import format as fmt

MAX_CELLS = 250_000  # a heatmap larger than this is shown pooled
HIST_BINS = 40


@dataclass
class TensorData:
    """Everything the tensor panel draws for one selection.

    Attributes:
        attrs: the node's graph attributes (kind, shape, module, dtype, roles).
        table: statistics of every view at this step (rows: views), or why not.
        history: the selected view's statistics over training, or why not.
        ratio: for a parameter, ‖update‖ / ‖weight‖ over training (else None).
        neurons: per-neuron statistics at this step (detail ``neurons``), or why not.
        matrix: raw values to draw as a heatmap (detail ``sample``), 2-D, with ``matrix_note`` on reshaping.
        hist: (counts, edges) of the values behind the histogram, and what they are (``hist_of``).
        n_samples: samples recorded at this step (0 when unknown or none).
    """

    attrs: dict[str, Any]
    table: pd.DataFrame | Missing
    history: pd.DataFrame | Missing
    ratio: pd.Series | None = None
    neurons: pd.DataFrame | Missing | None = None
    matrix: np.ndarray | Missing | None = None
    matrix_note: str = ""
    hist: tuple[np.ndarray, np.ndarray] | None = None
    hist_of: str = ""
    n_samples: int = 0
    notes: list[str] = field(default_factory=list)


def as_matrix(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Reshape a tensor into a 2-D matrix for a heatmap, and say how.

    >>> as_matrix(np.zeros((2, 3, 4)))[0].shape, as_matrix(np.zeros((2, 3, 4)))[1]
    ((6, 4), 'shape (2, 3, 4) shown as (6, 4): leading axes flattened')
    >>> as_matrix(np.zeros(5))[0].shape, as_matrix(np.float32(1.0))[0].shape
    ((1, 5), (1, 1))
    """
    values = np.asarray(values)
    if values.ndim == 0:
        return values.reshape(1, 1), "a scalar"
    if values.ndim == 1:
        return values.reshape(1, -1), f"a vector of {values.shape[0]} values"
    if values.ndim == 2:
        return values, f"shape {tuple(values.shape)}"
    matrix = values.reshape(-1, values.shape[-1])
    return matrix, f"shape {tuple(values.shape)} shown as {tuple(matrix.shape)}: leading axes flattened"


def pooled(matrix: np.ndarray, max_cells: int = MAX_CELLS) -> tuple[np.ndarray, int]:
    """Average-pool a matrix until it has at most ``max_cells`` cells; returns it and the pooling factor.

    >>> pooled(np.ones((1000, 1000)), 250_000)[0].shape
    (500, 500)
    """
    factor = 1
    while matrix.size > max_cells:
        rows, cols = matrix.shape
        r, c = rows - rows % 2, cols - cols % 2
        if r == 0 or c == 0:
            break
        matrix = matrix[:r, :c].reshape(r // 2, 2, c // 2, 2).mean(axis=(1, 3))
        factor *= 2
    return matrix, factor


def histogram(values: np.ndarray, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray] | None:
    finite = np.asarray(values, dtype=np.float64).ravel()
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.histogram(finite, bins=min(bins, max(1, finite.size)), range=(lo, hi))


def tensor_data(data: RunData, sel: SelectionSnapshot) -> TensorData:
    """Read what the tensor panel needs for ``sel``: a few chunks at most, nothing on a repeated question."""
    run = data.run
    node = sel.node
    attrs = dict(run.graph.nodes[node]) if node in run.graph else {}
    if node is None or not data.has_data(node):
        why = Missing(f"Node {node!r} has no recorded data in run {data.name!r}.")
        return TensorData(attrs, why, why)
    key = (node, sel.step, sel.view, sel.role, sel.iteration, sel.step_type)
    out = TensorData(
        attrs,
        data.entry_stats(node, sel.step, sel.role, sel.iteration, sel.step_type),
        data.stats(node, sel.view, sel.role, sel.iteration, sel.step_type),
    )
    if attrs.get("kind") == "parameter" and "update" in run.views(node):
        updates = data.stats(node, "update", sel.role, sel.iteration, sel.step_type)
        if not isinstance(updates, Missing):
            out.ratio = updates["update_ratio"]
    if sel.detail == "neurons":
        out.neurons = data.neurons(*key)
        if not isinstance(out.neurons, Missing):
            column = sel.statistic if sel.statistic in fmt.NEURON_STAT_NAMES else "mean"
            out.hist = histogram(out.neurons[column].to_numpy())
            out.hist_of = f"per-neuron {column} at step {sel.step} ({len(out.neurons)} neurons)"
    elif sel.detail == "sample":
        values = data.samples(*key)
        if isinstance(values, Missing):
            out.matrix = values
        else:
            whole = attrs.get("kind") == "parameter"
            if whole or values.ndim == 0:
                tensor, what = values, "the whole tensor"
            else:
                out.n_samples = int(values.shape[0])
                index = min(sel.sample, out.n_samples - 1)
                tensor, what = values[index], f"sample {index} of {out.n_samples}"
            matrix, how = as_matrix(tensor)
            out.matrix, factor = pooled(matrix.astype(np.float32, copy=False))
            out.matrix_note = f"{what}, {how}" + (f"; averaged over {factor}×{factor} blocks to fit" if factor > 1 else "")
            out.hist = histogram(tensor)
            out.hist_of = f"values of {what} at step {sel.step}"
    return out


def side_summary(data: RunData | None, side: Side, view: str) -> pd.DataFrame | Missing:
    """Every node's mean statistics on one side of a comparison."""
    if data is None:
        return Missing(f"No run named {side.run!r}.")
    return data.range_stats(side.first, side.last, view, side.step_type)


def node_comparison(summary_a: pd.DataFrame | Missing, summary_b: pd.DataFrame | Missing, node: str | None) -> pd.DataFrame | Missing:
    """The selected node's statistics on both sides: rows statistics, columns A, B, change, relative."""
    if isinstance(summary_a, Missing):
        return summary_a
    if isinstance(summary_b, Missing):
        return summary_b
    if node not in summary_a.index or node not in summary_b.index:
        side = "A" if node not in summary_a.index else "B"
        return Missing(f"Node {node!r} has no records on side {side} for this view.")
    a, b = summary_a.loc[node], summary_b.loc[node]
    frame = pd.DataFrame({"A": a, "B": b})
    frame["change"] = frame["B"] - frame["A"]
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["relative"] = frame["change"] / frame["A"].abs()
    frame.index.name = "statistic"
    return frame
