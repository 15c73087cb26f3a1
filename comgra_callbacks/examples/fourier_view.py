"""A custom dashboard view: the Fourier spectrum of the selected tensor (e.g. an embedding matrix).

In a grokking run on modular addition, the embedding matrix becomes sparse in the Fourier basis over the
token axis as the network generalises: a handful of frequencies carry all the weight. This view shows that
spectrum for the selected node and step, so moving the step slider watches it form::

    comgra-callbacks serve comgra_runs --custom fourier
    comgra-callbacks serve comgra_runs --custom path/to/comgra_callbacks/examples/fourier_view.py

It uses the raw values when they were recorded (samples, or the whole tensor of a parameter recorded in
full) and otherwise the per-neuron means (the spectrum over the neuron axis).

>>> import numpy as np
>>> rows = np.cos(2 * np.pi * 3 * np.arange(16) / 16)[:, None] * np.ones((16, 4))
>>> int(np.argmax(spectrum(rows)[0]))
3
"""

from __future__ import annotations

from typing import Any

import numpy as np

TITLE = "Fourier"


def spectrum(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Power per frequency along the first axis: (mean over columns, per column). Shapes (F,), (F, C)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    matrix = np.nan_to_num(matrix.reshape(matrix.shape[0], -1))
    power = np.abs(np.fft.rfft(matrix - matrix.mean(axis=0), axis=0)) ** 2  # (F, C)
    return power.mean(axis=1), power


def view(selection: Any, run: Any) -> Any:
    """Called by the dashboard with the current selection and the run (``comgra_callbacks.Run``)."""
    import holoviews as hv
    import panel as pn

    from comgra_callbacks.errors import ComgraError

    if selection.node is None:
        return pn.pane.Markdown("Select a node.")
    args = dict(view=selection.view, role=selection.role, iteration=selection.iteration, step_type=selection.step_type)
    try:
        values = run.samples(selection.node, selection.step, **args)
        is_parameter = run.graph.nodes[selection.node].get("kind") == "parameter"
        matrix = values if is_parameter or values.ndim < 2 else values[min(selection.sample, len(values) - 1)]
        source = "raw values" + ("" if is_parameter else f" of sample {min(selection.sample, len(values) - 1)}")
    except ComgraError:
        try:
            matrix = run.neurons(selection.node, selection.step, **args)["mean"].to_numpy()
            source = "per-neuron means (no raw values recorded at this step)"
        except ComgraError as exc:
            return pn.pane.Alert(f"Nothing to transform: {exc}", alert_type="warning")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim > 2:
        matrix = matrix.reshape(-1, matrix.shape[-1])
    if matrix.shape[0] < 4:
        return pn.pane.Alert(f"{selection.node!r} has only {matrix.shape[0]} rows: too few for a spectrum.", alert_type="warning")
    mean_power, power = spectrum(matrix)
    total = mean_power.sum() or 1.0
    top = np.argsort(mean_power)[::-1][:5]
    freq = np.arange(len(mean_power))
    bars = hv.Bars((freq, mean_power / total), "frequency", "share of power").opts(
        width=520, height=300, tools=["hover"], title=f"{selection.node} · step {selection.step}: spectrum over axis 0", xticks=min(len(freq), 20)
    )
    image = hv.Image(power.T[::-1], bounds=(0, 0, power.shape[0], power.shape[1]), kdims=["frequency", "column"], vdims=["power"]).opts(
        width=520, height=300, cmap="magma", colorbar=True, tools=["hover"], title="power per frequency and column"
    )
    summary = ", ".join(f"{int(k)} ({100 * mean_power[k] / total:.0f} %)" for k in top)
    text = f"**Fourier spectrum** of {source}, shape {tuple(matrix.shape)}. Strongest frequencies: {summary}."
    return pn.Column(pn.pane.Markdown(text), pn.Row(bars, image))
