"""The selected tensor: its statistics at this step, its history over training, and its values.

Layout (below the graph):

* a header naming the node, its kind, shape, module and the selection;
* the statistics table: every view of the node at this step side by side (for a parameter: value,
  gradient, update and the update-to-weight ratio);
* the chosen statistic over all recorded steps with the current step marked (moving the step only moves
  the marker), optionally overlaid with the same statistic of another step type (an intervention's records
  next to the normal ones: "Overlay step type") and with a measure of the run on its own axis at the right
  ("Overlay measure": test accuracy beside a weight norm shows where a phase boundary falls);
* the values, depending on the detail: batch statistics as bands over training (plus ‖update‖/‖weight‖ for
  a parameter), per-neuron statistics as bars or a heatmap, or the raw values of one sample as a heatmap;
  and a histogram of those values.

Figures stay on the page and get new data (see :mod:`~comgra_callbacks.dashboard.figures`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import panel as pn
from bokeh.models import DataRange1d, LinearAxis
from panel.viewable import Viewer

from comgra_callbacks.dashboard import figures as fg
from comgra_callbacks.dashboard import safe
from comgra_callbacks.dashboard.data import Missing
from comgra_callbacks.dashboard.gather import TensorData, tensor_data
from comgra_callbacks.dashboard.state import DETAILS, Selection
from comgra_callbacks.store import format as fmt

_HISTORY = {"run", "step_type", "node", "view", "role", "iteration", "statistic", "revision"}
_WATCHED = ["run", "step_type", "step", "node", "view", "detail", "sample", "role", "iteration", "statistic", "revision"]
MAX_BARS = 128
NO_OVERLAY = "none"
MEASURE_AXIS = "measure"  # the history plot's right-hand y range, for the overlaid measure
MEASURE_COLOR = "#2ca02c"


class TensorView(Viewer):
    """Everything about the selected node under the selected step, view, detail, role and iteration."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.data: TensorData | None = None
        self.header = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.table = pn.pane.DataFrame(None, sizing_mode="stretch_width", max_height=320, float_format="{:.4g}".format, margin=(0, 10))
        self.table_note = pn.pane.Markdown("", margin=(0, 10))
        self.history = fg.LineFigure()
        self.overlay = pn.widgets.Select(label="Overlay step type", options=[NO_OVERLAY], value=NO_OVERLAY, width=180)
        self.overlay_src = self.history.source(x=[], y=[])
        self.history.figure.line("x", "y", source=self.overlay_src, color=fg.B_COLOR, line_width=1, line_dash="dotted")
        self.history.figure.scatter("x", "y", source=self.overlay_src, color=fg.B_COLOR, size=6)
        self.overlay.param.watch(lambda _: self._draw_overlay(), "value")
        self.measure = pn.widgets.Select(label="Overlay measure", options=[NO_OVERLAY], value=NO_OVERLAY, width=180)
        self.measure_src = self.history.source(x=[], y=[])
        fig = self.history.figure
        line = fig.line("x", "y", source=self.measure_src, color=MEASURE_COLOR, line_width=1.5, y_range_name=MEASURE_AXIS)
        fig.extra_y_ranges = {MEASURE_AXIS: DataRange1d(renderers=[line])}
        self.measure_axis = LinearAxis(y_range_name=MEASURE_AXIS, axis_label="", axis_label_text_color=MEASURE_COLOR, visible=False)
        fig.add_layout(self.measure_axis, "right")
        self.measure.param.watch(lambda _: self._draw_measure(), "value")
        self.band = fg.BandFigure()
        self.bars = fg.BarFigure()
        self.neuron_map = fg.HeatmapFigure(x_label="neuron", y_label="")
        self.sample_map = fg.HeatmapFigure()
        self.ratio = fg.LineFigure("‖update‖ / ‖weight‖ over training", y_label="update_ratio", color="#2ca02c", log=True)
        self.histogram = fg.HistFigure()
        self.note = pn.pane.Markdown("", margin=(0, 10))
        selection.param.watch(self.refresh, _WATCHED)
        self.refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        values = pn.Column(self.band.box, self.bars.box, self.neuron_map.box, self.sample_map.box)
        return pn.Column(
            self.header,
            pn.Row(pn.Column(self.table, self.table_note, width=540), pn.Column(pn.Row(self.overlay, self.measure), self.history.box)),
            pn.Row(values, pn.Column(self.histogram.box, self.ratio.box)),
            self.note,
            sizing_mode="stretch_width",
        )

    @property
    def values_figure(self) -> fg.Figure:
        """The figure that shows the values for the current detail."""
        for fig in (self.band, self.bars, self.neuron_map, self.sample_map):
            if fig.box.visible:
                return fig
        return self.band

    def refresh(self, *events: Any) -> None:
        """Read what changed and update only the figures that depend on it."""
        sel = self.selection
        changed = {e.name for e in events} if events else set(_WATCHED)
        if sel.data is None or sel.node is None:
            self.header.object = "**No node selected.**" if sel.data is not None else "**No run selected.**"
            for fig in (self.history, self.band, self.histogram):
                fig.message("nothing selected")
            return
        snap = sel.snapshot()
        if changed & {"run", "step_type", "revision"}:
            self._overlay_options()
            self._measure_options()
        self.data = data = tensor_data(sel.data, snap)
        if data.n_samples and sel.n_samples != data.n_samples:
            sel.n_samples = data.n_samples
        self.header.object = self._header(data)
        self._table(data)
        if changed & _HISTORY:
            title = f"{snap.node} · {snap.view}: {snap.statistic} over training"
            if isinstance(data.history, Missing):
                self.history.message(data.history.message, title)
            elif snap.statistic not in data.history.columns or data.history.empty:
                self.history.message(f"no {snap.statistic!r} recorded for this view", title)
            else:
                self.history.set(data.history.index.to_numpy(), data.history[snap.statistic].to_numpy(), title, snap.statistic)
                self._draw_overlay()
                self._draw_measure()
        self._values(data, changed)
        for fig in (self.history, self.band, self.ratio):
            fig.mark(snap.step)

    # ------------------------------------------------------------------------------ overlay
    def _overlay_options(self) -> None:
        sel = self.selection
        others = [t for t in sel.param.step_type.objects if t is not None and t != sel.step_type]
        options = [NO_OVERLAY, *others]
        if list(self.overlay.options) != options:
            value = self.overlay.value if self.overlay.value in options else NO_OVERLAY
            self.overlay.param.update(options=options, value=value)

    def _draw_overlay(self) -> None:
        """The chosen statistic of the overlay step type (red points) on the history plot, or nothing."""
        sel, other = self.selection, self.overlay.value
        empty: dict[str, list[Any]] = {"x": [], "y": []}
        if other == NO_OVERLAY or sel.data is None or sel.node is None or self.history.label.visible:
            self.overlay_src.data = empty
            return
        title = f"{sel.node} · {sel.view}: {sel.statistic} over training · red: {other}"
        history = sel.data.stats(sel.node, sel.view, sel.role_value, sel.iteration_value, other) if sel.data.has_data(sel.node) else Missing("no data")
        if isinstance(history, Missing) or sel.statistic not in history.columns or history.empty:
            self.overlay_src.data = empty
            self.history.shown(f"{title} (no records of {sel.node!r})")
            return
        self.overlay_src.data = {"x": history.index.to_numpy(), "y": history[sel.statistic].to_numpy(dtype=np.float64)}
        self.history.shown(title)

    def _measures(self) -> pd.DataFrame:
        data = self.selection.data
        if data is None:
            return pd.DataFrame()
        try:
            return data.run.measures
        except Exception as exc:  # a damaged scalars array must not take the tensor panel down
            self.note.object = "Measures unreadable: " + safe.text(f"{type(exc).__name__}: {exc}")
            return pd.DataFrame()

    def _measure_options(self) -> None:
        options = [NO_OVERLAY, *(str(c) for c in self._measures().columns)]
        if list(self.measure.options) != options:
            value = self.measure.value if self.measure.value in options else NO_OVERLAY
            self.measure.param.update(options=options, value=value)

    def _draw_measure(self) -> None:
        """The chosen measure (green, right-hand axis) on the history plot, or nothing."""
        name = self.measure.value
        empty: dict[str, list[Any]] = {"x": [], "y": []}
        measures = self._measures() if name != NO_OVERLAY and not self.history.label.visible else pd.DataFrame()
        if name not in measures.columns:
            self.measure_src.data = empty
            self.measure_axis.visible = False
            return
        series = measures[name].dropna()
        self.measure_src.data = {"x": series.index.to_numpy(), "y": series.to_numpy(dtype=np.float64)}
        self.measure_axis.axis_label = f"measure {name}"
        self.measure_axis.visible = True

    # -------------------------------------------------------------------------------- parts
    def _header(self, data: TensorData) -> str:
        sel, attrs = self.selection, data.attrs
        bits = [f"### {safe.text(sel.node)}", f"**{safe.text(attrs.get('kind', 'node'))}**"]
        if attrs.get("shape") is not None:
            bits.append(f"shape {safe.code(tuple(attrs['shape']))}")
        if attrs.get("dtype"):
            bits.append(safe.code(attrs["dtype"]))
        if attrs.get("module"):
            bits.append(f"module {safe.code(attrs['module'])}")
        where = f"step **{sel.step}** ({safe.text(sel.step_type)}) · view **{safe.text(sel.view)}** · {DETAILS[sel.detail]}"
        if sel.role_value is not None:
            where += f" · role **{safe.text(sel.role)}**"
        if sel.iteration_value is not None:
            where += f" · iteration **{safe.text(sel.iteration)}**"
        return bits[0] + "\n" + " · ".join(bits[1:]) + "  \n" + where

    def _table(self, data: TensorData) -> None:
        if isinstance(data.table, Missing):
            self.table.object = None
            self.table_note.object = f"⚠ {safe.text(data.table.message)}"
            return
        frame = data.table.T  # rows: statistics, columns: views
        if "update" not in frame.columns and "update_ratio" in frame.index:
            frame = frame.drop(index="update_ratio")
        frame.columns = [f"▸ {c}" if c == self.selection.view else str(c) for c in frame.columns]
        self.table.object = frame
        self.table_note.object = "" if len(frame.columns) else "⚠ nothing recorded at this step"

    def _show(self, shown: fg.Figure) -> None:
        for fig in (self.band, self.bars, self.neuron_map, self.sample_map):
            fig.box.visible = fig is shown

    def _values(self, data: TensorData, changed: set[str]) -> None:
        sel = self.selection
        title = f"{sel.node} · {sel.view} · step {sel.step}"
        self.ratio.box.visible = sel.detail == "statistics" and data.ratio is not None
        if sel.detail == "statistics":
            self._show(self.band)
            band_title = f"{sel.node} · {sel.view}: batch statistics over training"
            if changed & (_HISTORY | {"detail"}):
                if isinstance(data.history, Missing):
                    self.band.message(data.history.message, band_title)
                else:
                    self.band.set(data.history, band_title)
                self._ratio(data)
            self.histogram.message("A histogram needs the per-neuron or individual-sample detail.", "histogram")
            self.note.object = "Batch statistics are over every element of the batch. Choose *per-neuron* or *individual sample* detail for values and a histogram."
        elif sel.detail == "neurons":
            self._neurons(data.neurons if data.neurons is not None else Missing("no per-neuron data"), title)
            self._histogram(data)
            self.note.object = "A neuron is a feature of the last axis (statistics over the batch and every other axis); for a parameter, an output unit (first axis)."
        else:
            self._show(self.sample_map)
            if isinstance(data.matrix, Missing) or data.matrix is None:
                self.sample_map.message(data.matrix.message if isinstance(data.matrix, Missing) else "no values", title)
            else:
                self.sample_map.set(data.matrix, f"{title}: {data.matrix_note}")
            self._histogram(data)
            self.note.object = safe.text(data.matrix_note)

    def _ratio(self, data: TensorData) -> None:
        if data.ratio is None:
            return
        values, steps = data.ratio.to_numpy(), data.ratio.index.to_numpy()
        keep = np.isfinite(values) & (values > 0)
        if keep.any():
            self.ratio.set(steps[keep], values[keep], "‖update‖ / ‖weight‖ over training")
        else:
            self.ratio.message("no update-to-weight ratio recorded")

    def _neurons(self, frame: pd.DataFrame | Missing, title: str) -> None:
        if isinstance(frame, Missing):
            self._show(self.bars)
            self.bars.message(frame.message, title)
            return
        column = self.selection.statistic if self.selection.statistic in fmt.NEURON_STAT_NAMES else "mean"
        if len(frame) <= MAX_BARS:
            self._show(self.bars)
            self.bars.set(frame[column].to_numpy(), f"{title}: per-neuron {column}", column)
        else:
            self._show(self.neuron_map)
            grid = frame[list(fmt.NEURON_STAT_NAMES)].to_numpy().T  # (3, neurons), rows top to bottom
            self.neuron_map.set(grid, f"{title}: per-neuron mean / std / abs_mean", y_ticks={2.5: "mean", 1.5: "std", 0.5: "abs_mean"})

    def _histogram(self, data: TensorData) -> None:
        if data.hist is None:
            self.histogram.message("no values for a histogram here", "histogram")
        else:
            counts, edges = data.hist
            self.histogram.set(counts, edges, f"histogram of {data.hist_of}")
