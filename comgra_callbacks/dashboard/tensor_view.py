"""The selected tensor: its statistics at this step, its history over training, and its values.

Layout (below the graph):

* a header naming the node, its kind, shape, module and the selection;
* the statistics table: every view of the node at this step side by side (for a parameter: value,
  gradient, update and the update-to-weight ratio);
* the chosen statistic over all recorded steps with the current step marked (moving the step only moves
  the marker);
* the values, depending on the detail: batch statistics as bands over training (plus ‖update‖/‖weight‖ for
  a parameter), per-neuron statistics as bars or a heatmap, or the raw values of one sample as a heatmap;
  and a histogram of those values.
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import panel as pn
from panel.viewable import Viewer

from comgra_callbacks.dashboard import plots
from comgra_callbacks.dashboard.data import Missing
from comgra_callbacks.dashboard.gather import TensorData, tensor_data
from comgra_callbacks.dashboard.state import DETAILS, Selection

StepStream = hv.streams.Stream.define("StepStream", step=0)
_HISTORY = {"run", "step_type", "node", "view", "role", "iteration", "statistic", "revision"}


class TensorView(Viewer):
    """Everything about the selected node under the selected step, view, detail, role and iteration."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.data: TensorData | None = None
        self._step = StepStream(step=0)
        self.header = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.table = pn.pane.DataFrame(None, sizing_mode="stretch_width", max_height=320, float_format="{:.4g}".format, margin=(0, 10))
        self.table_note = pn.pane.Markdown("", margin=(0, 10))
        self.history = pn.pane.HoloViews(linked_axes=False)
        self.values = pn.pane.HoloViews(linked_axes=False)
        self.extra = pn.pane.HoloViews(linked_axes=False)
        self.histogram = pn.pane.HoloViews(linked_axes=False)
        self.note = pn.pane.Markdown("", margin=(0, 10))
        selection.param.watch(
            self.refresh, ["run", "step_type", "step", "node", "view", "detail", "sample", "role", "iteration", "statistic", "revision"]
        )
        self.refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            self.header,
            pn.Row(pn.Column(self.table, self.table_note, width=540), self.history),
            pn.Row(self.values, self.histogram),
            pn.Row(self.extra),
            self.note,
            sizing_mode="stretch_width",
        )

    def refresh(self, *events: Any) -> None:
        """Read what changed and redraw only the parts that depend on it."""
        sel = self.selection
        changed = {e.name for e in events} if events else set(_HISTORY) | {"step", "detail", "sample"}
        if sel.data is None or sel.node is None:
            self.header.object = "**No node selected.**"
            return
        snap = sel.snapshot()
        self.data = data = tensor_data(sel.data, snap)
        if data.n_samples and sel.n_samples != data.n_samples:
            sel.n_samples = data.n_samples
        self.header.object = self._header(data)
        self._table(data)
        if changed & _HISTORY:
            title = f"{snap.node} · {snap.view}: {snap.statistic} over training"
            self.history.object = plots.marked(plots.history(data.history, snap.statistic, title), self._step, title)
        self._step.event(step=snap.step)
        self._values(data, changed)

    # -------------------------------------------------------------------------------- parts
    def _header(self, data: TensorData) -> str:
        sel, attrs = self.selection, data.attrs
        bits = [f"### {sel.node}", f"**{attrs.get('kind', 'node')}**"]
        if attrs.get("shape") is not None:
            bits.append(f"shape `{tuple(attrs['shape'])}`")
        if attrs.get("dtype"):
            bits.append(f"`{attrs['dtype']}`")
        if attrs.get("module"):
            bits.append(f"module `{attrs['module']}`")
        where = f"step **{sel.step}** ({sel.step_type}) · view **{sel.view}** · {DETAILS[sel.detail]}"
        if sel.role_value is not None:
            where += f" · role **{sel.role}**"
        if sel.iteration_value is not None:
            where += f" · iteration **{sel.iteration}**"
        return bits[0] + "\n" + " · ".join(bits[1:]) + "  \n" + where

    def _table(self, data: TensorData) -> None:
        if isinstance(data.table, Missing):
            self.table.object = None
            self.table_note.object = f"⚠ {data.table.message}"
            return
        frame = data.table.T  # rows: statistics, columns: views
        if "update" not in frame.columns and "update_ratio" in frame.index:
            frame = frame.drop(index="update_ratio")
        frame.columns = [f"▸ {c}" if c == self.selection.view else str(c) for c in frame.columns]
        self.table.object = frame
        self.table_note.object = "" if len(frame.columns) else "⚠ nothing recorded at this step"

    def _values(self, data: TensorData, changed: set[str]) -> None:
        sel = self.selection
        title = f"{sel.node} · {sel.view} · step {sel.step}"
        self.extra.visible = False
        if sel.detail == "statistics":
            if changed & _HISTORY or "detail" in changed:
                band_title = f"{sel.node} · {sel.view}: batch statistics over training"
                self.values.object = plots.marked(plots.band(data.history, band_title), self._step, band_title, legend_position="top_left")
            self.histogram.object = plots.hist(None, "")
            if data.ratio is not None:
                self.extra.visible = True
                if changed & _HISTORY or "detail" in changed:
                    self.extra.object = plots.marked(plots.ratio(data.ratio), self._step, "‖update‖ / ‖weight‖ over training", logy=True)
            self.note.object = "Batch statistics are over every element of the batch. Choose *per-neuron* or *individual sample* detail for values and a histogram."
        elif sel.detail == "neurons":
            self.values.object = plots.neurons(data.neurons if data.neurons is not None else Missing("no data"), sel.statistic, title)
            self.histogram.object = plots.hist(data.hist, f"histogram of {data.hist_of}" if data.hist else "")
            self.note.object = "A neuron is a feature of the last axis (statistics over the batch and every other axis); for a parameter, an output unit (first axis)."
        else:
            self.values.object = plots.heatmap(data.matrix, f"{title}: {data.matrix_note}")
            self.histogram.object = plots.hist(data.hist, f"histogram of {data.hist_of}" if data.hist else "")
            self.note.object = data.matrix_note

