"""The Attribution tab: which training samples moved a parameter's neurons (runs recorded with ``attribution=``).

For a parameter: the neurons x steps heatmap of update norms (:meth:`Run.neuron_series`, the l2 norm of each
neuron's row of the update), the outliers of :func:`comgra_callbacks.analysis.update_outliers` marked; click a
cell (or pick a step and a neuron) for the samples of that step that contributed to that neuron's update,
with their dataset indices (:func:`comgra_callbacks.analysis.contributions`), and below them the recorded
input of those samples whose input was kept (``n_samples=`` / ``detail=`` decide which: the first samples of
a batch by default); integer inputs (token ids) are shown as ids. Computed only while visible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import panel as pn
from bokeh import events
from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import Viridis256
from bokeh.plotting import figure
from panel.viewable import Viewer

from comgra_callbacks import analysis
from comgra_callbacks.dashboard.state import Selection
from comgra_callbacks.errors import ComgraError, StepNotFoundError
from comgra_callbacks.store.attribution import attributed_parameters

ATTRIBUTION_FIGURE = "comgra-attribution-heatmap"  # the figure's name, for browser tests
NONE = "(no parameter with attribution)"
NO_INPUT = "(no recorded input)"
SHOWN_VALUES = 16  # values of a sample's input shown in its cell (the rest is counted)
INDEX_NAMES = ("idx", "index")  # input nodes that are the dataset index itself, offered last


def format_sample(values: np.ndarray, limit: int = SHOWN_VALUES) -> str:
    """One sample's recorded input as a short line: token ids for integer inputs, 3 digits otherwise.

    >>> format_sample(np.array([5, 17, 3])), format_sample(np.arange(20.0) / 3, limit=3)
    ('5 17 3', '0 0.333 0.667 ... (20 values)')
    """
    flat = np.asarray(values).reshape(-1)
    integer = flat.dtype.kind in "iub"
    shown = " ".join(str(int(v)) if integer else f"{float(v):.3g}" for v in flat[:limit])
    return shown + (f" ... ({flat.size} values)" if flat.size > limit else "")


def input_nodes(run: Any) -> list[str]:
    """The run's input nodes (graph kind ``input``), the dataset-index fields last."""
    graph = run.graph
    names = [n for n in run.nodes if n in graph and graph.nodes[n].get("kind") == "input"]
    return sorted(names, key=lambda n: n.rpartition(".")[2] in INDEX_NAMES)


def kept_inputs(run: Any, node: str, step: int, sample_index: Any) -> list[str | None]:
    """Per batch position in ``sample_index`` (every sample of the step's batch): its recorded input at
    ``step`` (formatted), None where that sample's input was not kept. The kept samples are the whole batch
    (``detail="full"``), or the batch positions the run recorded in its ``sample_index`` node at that step
    (a ``samples=`` selector), or else the first ones of the batch."""
    try:
        values = run.samples(node, step)
    except StepNotFoundError:
        return [None] * len(sample_index)
    positions: Any = range(len(values))
    if len(values) != len(sample_index) and "sample_index" in run.nodes:  # not the whole batch: which part
        try:
            positions = run.samples("sample_index", step).reshape(-1).tolist()
        except StepNotFoundError:
            pass
    row = {int(p): i for i, p in enumerate(positions) if i < len(values)}
    return [format_sample(values[row[int(i)]]) if int(i) in row else None for i in sample_index]


class AttributionView(Viewer):
    """The Attribution tab of one session; follows the selected run while :meth:`activate`\\ d."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.active = False
        self.series: pd.DataFrame | None = None
        self.outliers: pd.DataFrame | None = None
        self.contributions: pd.DataFrame | None = None
        self.param_select = pn.widgets.Select(label="Parameter", options=[NONE], value=NONE, width=320)
        self.z = pn.widgets.FloatInput(label="Outlier z", value=4.0, start=0.5, step=0.5, width=110)
        self.step = pn.widgets.Select(label="Step", options=[], width=120)
        self.neuron = pn.widgets.IntInput(label="Neuron", value=0, start=0, width=110)
        self.summary = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.table = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False, height=300, width=520, layout="fit_data_table")
        self.input_select = pn.widgets.Select(label="Input", options=[NO_INPUT], value=NO_INPUT, width=240)
        self.inputs: pd.DataFrame | None = None
        self.inputs_note = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.inputs_table = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False, height=220, width=900, layout="fit_data_table")
        self.input_select.param.watch(self._contributions, ["value"])
        self._build_figure()
        self.param_select.param.watch(self.refresh, ["value"])
        self.z.param.watch(self.refresh, ["value"])
        for widget in (self.step, self.neuron):
            widget.param.watch(self._contributions, ["value"])
        selection.param.watch(self._on_run, ["run", "revision"])

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            pn.Row(self.param_select, self.z, self.step, self.neuron, sizing_mode="stretch_width"),
            self.summary,
            self.pane,
            pn.pane.Markdown("#### Samples of the step, by their share of the neuron's update (click a cell above)", margin=(0, 10)),
            self.table,
            pn.Row(pn.pane.Markdown("#### Their recorded input, where it was kept", margin=(0, 10)), self.input_select),
            self.inputs_note,
            self.inputs_table,
            sizing_mode="stretch_width",
        )

    def _build_figure(self) -> None:
        fig = figure(name=ATTRIBUTION_FIGURE, width=900, height=320, tools="pan,box_zoom,reset,save", toolbar_location="above",
                     x_axis_label="record (step in the tooltip)", y_axis_label="neuron")
        fig.toolbar.logo = None
        self.mapper = LinearColorMapper(palette=Viridis256, low=0, high=1)
        self.image = ColumnDataSource({"image": [np.zeros((1, 1))], "x": [-0.5], "y": [-0.5], "dw": [1], "dh": [1]})
        fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.image, color_mapper=self.mapper)  # type: ignore[call-arg]
        self.marks = ColumnDataSource({"x": [], "y": [], "step": [], "neuron": [], "z": []})
        dots = fig.scatter("x", "y", source=self.marks, marker="x", size=9, line_color="#ff2222", line_width=2)
        fig.add_tools(HoverTool(renderers=[dots], tooltips=[("step", "@step"), ("neuron", "@neuron"), ("z", "@z{0.0}")]))
        fig.on_event(events.Tap, lambda e: self.select_cell(e.x, e.y))
        self.figure = fig
        self.pane = pn.pane.Bokeh(fig, margin=(0, 10))

    # ---------------------------------------------------------------------------------- updates
    def activate(self, active: bool = True) -> None:
        """Start (or stop) following the selection; reading update norms while hidden would slow it down."""
        self.active = active
        if active:
            self._on_run()

    def _on_run(self, *_: Any) -> None:
        if not self.active:
            return
        data = self.selection.data
        names = attributed_parameters(data.run) if data is not None else []
        inputs = (input_nodes(data.run) if data is not None else []) or [NO_INPUT]
        self.input_select.options = inputs
        if self.input_select.value not in inputs:
            self.input_select.value = inputs[0]
        options = names or [NONE]
        self.param_select.options = options
        if self.param_select.value not in options:
            self.param_select.value = options[0]  # triggers refresh
        else:
            self.refresh()

    def refresh(self, *_: Any) -> None:
        """Redraw the heatmap and the outliers of the chosen parameter."""
        data = self.selection.data
        param = self.param_select.value
        if not self.active or data is None or param == NONE:
            self.summary.object = "No parameter of this run was recorded with `attribution=`." if self.active else ""
            return
        try:
            self.series = data.run.neuron_series(param, view="update", statistic="l2")
            self.outliers = analysis.update_outliers(data.run, param, z=float(self.z.value or 4.0))
            steps = data.run.attribution_steps(param)
        except ComgraError as exc:
            self.summary.object = f"**{type(exc).__name__}**: {exc}"
            return
        values = self.series.to_numpy(dtype=np.float64).T  # (neurons, records)
        finite = values[np.isfinite(values)]
        self.mapper.high = float(finite.max()) if finite.size else 1.0
        self.mapper.low = float(finite.min()) if finite.size else 0.0
        self.image.data = {"image": [values], "x": [-0.5], "y": [-0.5], "dw": [values.shape[1]], "dh": [values.shape[0]]}
        position = {int(s): i for i, s in enumerate(self.series.index)}
        out = self.outliers
        self.marks.data = {
            "x": [position[int(s)] for s in out["step"]], "y": out["neuron"].tolist(),
            "step": out["step"].tolist(), "neuron": out["neuron"].tolist(), "z": out["z"].tolist(),
        }
        self.neuron.end = max(values.shape[0] - 1, 0)
        self.step.options = steps
        if steps and self.step.value not in steps:
            first = out[out["step"].isin(steps)]
            self.step.value, self.neuron.value = (int(first["step"].iloc[0]), int(first["neuron"].iloc[0])) if len(first) else (steps[0], 0)
        self.summary.object = (
            f"`{param}`: {values.shape[0]} neurons x {values.shape[1]} records; {len(out)} outlier updates (z >= {self.z.value}); "
            f"per-sample factors at {len(steps)} steps."
        )
        self._contributions()

    def select_cell(self, x: float, y: float) -> None:
        """A click on the heatmap: that record's step and that neuron."""
        if self.series is None or self.series.empty:
            return
        col = int(np.clip(round(x), 0, len(self.series.index) - 1))
        step = int(self.series.index[col])
        if step in self.step.options:
            self.step.value = step
        self.neuron.value = int(np.clip(round(y), 0, self.series.shape[1] - 1))

    def _contributions(self, *_: Any) -> None:
        data, param = self.selection.data, self.param_select.value
        if not self.active or data is None or param == NONE or self.step.value is None:
            return
        try:
            frame = analysis.contributions(data.run, param, int(self.step.value), neuron=int(self.neuron.value or 0))
        except ComgraError as exc:
            self.table.value = pd.DataFrame({"message": [str(exc)]})
            return
        self.contributions = frame.sort_values("contribution", ascending=False, ignore_index=True)
        self.table.value = self.contributions
        self._inputs(data.run, int(self.step.value))

    def _inputs(self, run: Any, step: int) -> None:
        """The chosen input node's recorded samples next to the contributing samples that have one."""
        node, frame = self.input_select.value, self.contributions
        if node == NO_INPUT or frame is None or "sample_index" not in frame:
            self.inputs = pd.DataFrame(columns=["sample_index", "dataset_index", "contribution", "input"])
            self.inputs_note.object = "The run recorded no input node." if node == NO_INPUT else ""
        else:
            shown = frame.assign(input=kept_inputs(run, node, step, frame["sample_index"].to_numpy()))
            self.inputs = shown[shown["input"].notna()].reset_index(drop=True)
            missing = len(shown) - len(self.inputs)
            self.inputs_note.object = (
                f"`{node}` at step {step}: kept for {len(self.inputs)} of the {len(shown)} samples"
                + (f"; not kept for {missing} (`n_samples=` or `detail=` keep more)." if missing else ".")
            )
        self.inputs_table.value = self.inputs
