"""A custom dashboard view: the Fourier spectrum of the selected tensor, or of a matrix made from recorded
tensors (e.g. the effective input weights ``E · W1ᵀ`` of a grokking MLP).

In a grokking run on modular addition, the hidden neurons' effective input weights become sparse in the
Fourier basis over the token axis as the network generalises: each neuron locks onto one frequency. The
embedding alone can look like noise; the product shows the structure. This view offers, in a select:

* the selected node itself (its raw values when they were recorded: samples, or the whole tensor of a
  parameter recorded in full; otherwise the per-neuron means);
* every product ``A · Bᵀ`` of the selected node with another parameter recorded in full whose second axis
  matches (``embed.weight · fc1.weightᵀ``), found from the run alone;
* the matrices named in :data:`MATRICES` (edit a copy of this file): ``name -> (function, nodes)``, the same
  pair :func:`comgra_callbacks.analysis.derive` and :func:`comgra_callbacks.analysis.fourier` take.

Run it with::

    comgra-callbacks serve comgra_runs --custom fourier
    comgra-callbacks serve comgra_runs --custom path/to/my_fourier_view.py

The math is :func:`comgra_callbacks.analysis.spectrum` (the one ``FourierSparsity`` uses during training).

>>> import numpy as np
>>> rows = np.cos(2 * np.pi * 3 * np.arange(16) / 16)[:, None] * np.ones((16, 4))
>>> from comgra_callbacks.analysis import spectrum
>>> spectrum(rows).key[0]
3
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

TITLE = "Fourier"

# name -> (function of the nodes' full tensors, in order, returning a 2-D matrix; the nodes)
MATRICES: dict[str, tuple[Callable[..., Any], list[str]]] = {
    # "E·W1ᵀ": (lambda E, W1: E @ W1.T, ["embed.weight", "fc1.weight"]),
}
SELECTED = "the selected node"
_CHOSEN: dict[str, str] = {}  # the matrix last chosen per run, kept while the step or node changes


def candidates(run: Any, node: str | None) -> dict[str, tuple[Callable[..., Any], list[str]]]:
    """The matrices offered besides the selected node: products with it, then :data:`MATRICES`."""
    out: dict[str, tuple[Callable[..., Any], list[str]]] = {}
    graph = run.graph
    shape = _shape(graph, node)
    if node is not None and shape is not None:
        for other in run.nodes:
            other_shape = _shape(graph, other)
            if other == node or other_shape is None or other_shape[1] != shape[1]:
                continue
            out[f"{node} · {other}ᵀ"] = (lambda x, y: x @ y.T, [node, other])
            out[f"{other} · {node}ᵀ"] = (lambda x, y: x @ y.T, [other, node])
    out.update(MATRICES)
    return out


def _shape(graph: Any, node: str | None) -> tuple[int, int] | None:
    """The shape of a 2-D parameter (the kind recorded in full), else None."""
    if node is None or node not in graph:
        return None
    attrs = graph.nodes[node]
    shape = attrs.get("shape")
    if attrs.get("kind") != "parameter" or not isinstance(shape, (list, tuple)) or len(shape) != 2:
        return None
    return int(shape[0]), int(shape[1])


def view(selection: Any, run: Any) -> Any:
    """Called by the dashboard with the current selection and the run (``comgra_callbacks.Run``)."""
    import panel as pn

    options = [SELECTED, *candidates(run, selection.node)]
    chosen = _CHOSEN.get(run.name, SELECTED)
    chosen = chosen if chosen in options else SELECTED
    select = pn.widgets.Select(label="Matrix", options=options, value=chosen, width=380)
    body = pn.Column(draw(selection, run, chosen), sizing_mode="stretch_width")

    def changed(event: Any) -> None:
        _CHOSEN[run.name] = event.new
        body.objects = [draw(selection, run, event.new)]

    select.param.watch(changed, ["value"])
    return pn.Column(select, body, sizing_mode="stretch_width")


def draw(selection: Any, run: Any, chosen: str) -> Any:
    """The spectrum of the chosen matrix at the selected step."""
    import panel as pn

    from comgra_callbacks.analysis import fourier, spectrum
    from comgra_callbacks.errors import ComgraError

    if chosen != SELECTED:
        function, nodes = candidates(run, selection.node)[chosen]
        try:
            result = fourier(run, function, selection.step, nodes=nodes, step_type=selection.step_type)
        except (ComgraError, ValueError) as exc:
            return pn.pane.Alert(f"Nothing to transform: {exc}", alert_type="warning")
        return _figures(result, f"{chosen}, from the full tensors of {', '.join(nodes)}", selection, chosen)
    if selection.node is None:
        return pn.pane.Markdown("Select a node.")
    matrix, source = _node_matrix(selection, run)
    if matrix is None:
        return pn.pane.Alert(f"Nothing to transform: {source}", alert_type="warning")
    if matrix.shape[0] < 4:
        return pn.pane.Alert(f"{selection.node!r} has only {matrix.shape[0]} rows: too few for a spectrum.", alert_type="warning")
    try:
        result = spectrum(matrix, axis=0)
    except ComgraError as exc:
        return pn.pane.Alert(f"Nothing to transform: {exc}", alert_type="warning")
    return _figures(result, f"{source}, shape {tuple(matrix.shape)}", selection, selection.node)


def _node_matrix(selection: Any, run: Any) -> tuple[np.ndarray | None, str]:
    from comgra_callbacks.errors import ComgraError

    args = dict(view=selection.view, role=selection.role, iteration=selection.iteration, step_type=selection.step_type)
    try:
        values = run.samples(selection.node, selection.step, **args)
        is_parameter = run.graph.nodes[selection.node].get("kind") == "parameter"
        sample = min(selection.sample, len(values) - 1)
        matrix = values if is_parameter or values.ndim < 2 else values[sample]
        source = "raw values" + ("" if is_parameter else f" of sample {sample}")
    except ComgraError:
        try:
            matrix = run.neurons(selection.node, selection.step, **args)["mean"].to_numpy()
            source = "per-neuron means (no raw values recorded at this step)"
        except ComgraError as exc:
            return None, str(exc)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim > 2:
        matrix = matrix.reshape(-1, matrix.shape[-1])
    return matrix, source


def _figures(result: Any, source: str, selection: Any, title: str) -> Any:
    import holoviews as hv
    import panel as pn

    total = result.power.sum(axis=0)  # per frequency
    share = total / (total.sum() or 1.0)
    freqs = result.power.columns.to_numpy()
    bars = hv.Bars((freqs, share.to_numpy()), "frequency", "share of power").opts(
        width=520, height=300, tools=["hover"], title=f"{title} · step {selection.step}: spectrum over axis 0", xticks=min(len(freqs), 20)
    )
    power = result.power.to_numpy()  # (rows, frequencies)
    image = hv.Image(power[::-1], bounds=(0.5, 0, freqs[-1] + 0.5, power.shape[0]), kdims=["frequency", "row"], vdims=["power"]).opts(
        width=520, height=300, cmap="magma", colorbar=True, tools=["hover"], title="power per frequency and row (a neuron)"
    )
    summary = ", ".join(f"{k} ({100 * share[k]:.0f} %)" for k in result.key)
    text = (
        f"**Fourier spectrum** of {source}. Strongest frequencies: {summary}. Per row, the share of its power in "
        f"its strongest frequency: mean {result.top1_share.mean():.2f}; Gini coefficient over frequencies {result.gini:.2f}."
    )
    return pn.Column(pn.pane.Markdown(text), pn.Row(bars, image))
