"""The Anomalies tab: where a NaN or an outlier sample started, which records triggers kept, what moves with a target.

The graph is drawn again here, each box coloured by how anomalous its node is at the selected step
(:func:`comgra_callbacks.analysis.trace`: its non-finite count when the step holds NaN or infinities, else
the largest |z| of the selected sample, or of any recorded sample), with the origin outlined. Below it: the
records kept by triggers with their reason (click one to go to that step), and the
:func:`~comgra_callbacks.analysis.correlate` table for a chosen target (click a row to select the node).
Everything is computed only while the tab is visible.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
from bokeh import events
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.plotting import figure
from panel.viewable import Viewer

from comgra_callbacks import analysis
from comgra_callbacks.dashboard import layout as lay
from comgra_callbacks.dashboard.state import Selection
from comgra_callbacks.errors import ComgraError

ANOMALY_FIGURE = "comgra-anomaly-graph"  # the figure's name, for browser tests
ANY_SAMPLE = "any sample"
NO_DATA, CALM = "#eeeeee", "#ffffff"
REDS = ["#fff5f0", "#fee0d2", "#fcbba1", "#fc9272", "#fb6a4a", "#ef3b2c", "#cb181d", "#99000d"]
SCHEDULED = {"schedule", "every", "forced"}


def anomaly_color(score: float, mode: str, threshold: float) -> str:
    """The fill of a box: white when calm, reds that deepen with the anomaly, grey without data.

    >>> anomaly_color(float("nan"), "outlier", 6.0), anomaly_color(1.0, "outlier", 6.0)
    ('#eeeeee', '#ffffff')
    >>> anomaly_color(6.5, "outlier", 6.0), anomaly_color(1e4, "outlier", 6.0), anomaly_color(3, "non-finite", 6.0)
    ('#fcbba1', '#99000d', '#fcbba1')
    """
    if math.isnan(score):
        return NO_DATA
    if mode == "non-finite":
        if score <= 0:
            return CALM
        level = 2 + int(math.log10(score))
    else:
        if score <= threshold:
            return CALM
        level = 2 + int(math.log10(score / threshold) * 2)
    return REDS[min(level, len(REDS) - 1)]


class AnomalyView(Viewer):
    """The Anomalies tab. It computes only while visible (:meth:`activate`), then follows every change.

    Attributes:
        frame: the last :func:`analysis.trace` (or None, or a message why there is none).
        correlations: the last correlate table shown.
    """

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = sel = selection
        self.active = False
        self.frame: pd.DataFrame | str | None = None
        self.correlations: pd.DataFrame | None = None
        self.layout = lay.GraphLayout({}, [])
        self.view = pn.widgets.Select(label="View", options=["value", "grad"], value="value", width=120)
        self.sample = pn.widgets.Select(label="Follow sample (batch position)", options=[ANY_SAMPLE], value=ANY_SAMPLE, width=220)
        self.threshold = pn.widgets.FloatInput(label="z threshold", value=analysis.Z_THRESHOLD, start=0.5, step=0.5, width=110)
        self.first = pn.widgets.Button(label="Go to the first non-finite step", width=240)
        self.summary = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self._build_figure()
        self.kept = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, selectable=1, show_index=False, height=220, width=460, layout="fit_data_table")
        self.target = pn.widgets.Select(label="Correlate with", options=[], width=220)
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, selectable=1, show_index=False, pagination="local", page_size=15,
            sizing_mode="stretch_width", height=460, layout="fit_data_table",
        )
        self.kept.on_click(self._kept_clicked)
        self.table.on_click(self._correlation_clicked)
        self.first.on_click(self._go_first)
        for widget in (self.view, self.sample, self.threshold):
            widget.param.watch(self.refresh, ["value"])
        self.target.param.watch(self._correlate, ["value"])
        sel.param.watch(self.refresh, ["step", "step_type", "node", "revision"])
        sel.param.watch(self._on_run, ["run"])

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            pn.Row(self.view, self.sample, self.threshold, self.first, sizing_mode="stretch_width"),
            self.summary,
            pn.Column(self.pane, scroll=True, max_height=640, sizing_mode="stretch_width"),
            pn.Row(
                pn.Column(pn.pane.Markdown("#### Records kept by triggers (click to go there)", margin=(0, 10)), self.kept),
                pn.Column(
                    pn.pane.Markdown(
                        "#### What moves with a target (rank correlation across records; hints, not causes: click a row)",
                        margin=(0, 10),
                    ),
                    self.target, self.table, sizing_mode="stretch_width",
                ),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )

    def _build_figure(self) -> None:
        fig = figure(
            name=ANOMALY_FIGURE, width=900, height=300, tools="pan,box_zoom,reset,save", toolbar_location="above",
            x_range=Range1d(start=0, end=1), y_range=Range1d(start=0, end=1), outline_line_color=None,
        )
        fig.toolbar.logo = None
        fig.axis.visible = False
        fig.grid.visible = False
        self.boxes = ColumnDataSource({k: [] for k in ("left", "right", "bottom", "top", "x", "y", "name", "label", "color", "info")})
        quads = fig.quad(left="left", right="right", bottom="bottom", top="top", source=self.boxes, fill_color="color", line_color="#555555")
        fig.add_tools(HoverTool(renderers=[quads], tooltips=[("", "@name"), ("", "@info")]))
        fig.text(x="x", y="y", text="label", source=self.boxes, text_align="center", text_baseline="middle", text_font_size="8pt")
        self.origins = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": []})
        fig.quad(left="left", right="right", bottom="bottom", top="top", source=self.origins, fill_alpha=0, line_color="#111111", line_width=4, line_dash="dashed")
        self.edges = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": []})
        fig.segment("x0", "y0", "x1", "y1", source=self.edges, line_color="#aaaaaa", line_width=1)
        fig.on_event(events.Tap, lambda e: self._on_tap(e.x, e.y))
        self.figure = fig
        self.pane = pn.pane.Bokeh(fig, margin=(0, 10))

    # ---------------------------------------------------------------------------------- updates
    def activate(self, active: bool = True) -> None:
        """Start (or stop) following changes; tracing while hidden would slow every selector down."""
        self.active = active
        if active:
            self._on_run()

    def _on_run(self, *_: Any) -> None:
        if not self.active:
            return
        data = self.selection.data
        if data is None:
            return
        run = data.run
        kept = run.steps[~run.steps["reason"].isin(list(SCHEDULED))][["step", "step_type", "reason"]].reset_index(drop=True)
        self.kept.value = kept if len(kept) else pd.DataFrame({"message": ["no records were kept by a trigger"]})
        targets = [n for n in run.nodes if data.has_data(n)]
        scalars = sorted(set(run.scalars["name"]))
        options = [n for n in targets if run.graph.nodes.get(n, {}).get("kind") == "loss"] + scalars
        options += [n for n in targets if n not in options]
        self.target.param.update(options=options, value=options[0] if options else None)
        self.refresh()
        self._correlate()

    def refresh(self, *_: Any) -> None:
        if not self.active:
            return
        sel = self.selection
        data = sel.data
        if data is None:
            return
        run = data.run
        positions = self._positions()
        options = [ANY_SAMPLE] + [str(p) for p in positions]
        if list(self.sample.options) != options:
            self.sample.param.update(options=options, value=self.sample.value if self.sample.value in options else ANY_SAMPLE)
        sample = None if self.sample.value == ANY_SAMPLE else int(self.sample.value)
        try:
            frame: pd.DataFrame | str = analysis.trace(
                run, sel.step, step_type=sel.step_type, view=self.view.value, sample=sample, threshold=float(self.threshold.value or analysis.Z_THRESHOLD)
            )
        except ComgraError as exc:
            frame = str(exc)
        self.frame = frame
        self._draw(data.graph(sel.step_type), frame)

    def _positions(self) -> list[int]:
        sel = self.selection
        data = sel.data
        if data is None or sel.node is None or not data.has_data(sel.node):
            return []
        values = data.samples(sel.node, sel.step, "value", None, None, sel.step_type)
        if not isinstance(values, np.ndarray) or values.ndim == 0:
            return []
        positions, _ = analysis.sample_positions(data.run, sel.step, sel.step_type, len(values))
        return [int(p) for p in positions]

    def _draw(self, graph: Any, frame: pd.DataFrame | str) -> None:
        threshold = float(self.threshold.value or analysis.Z_THRESHOLD)
        if isinstance(frame, str):
            self.summary.object = f"⚠ {html.escape(frame)}"
            rows: dict[str, Any] = {}
            mode = "outlier"
        else:
            mode = frame.attrs["mode"]
            rows = {str(r.node): r for r in frame.itertuples(index=False)}
            origins = [html.escape(n) for n in frame.loc[frame["origin"], "node"]]
            what = "non-finite values (colour: how many)" if mode == "non-finite" else f"outliers (colour: |z| above {threshold:g})"
            where = f"origin: **{', '.join(origins)}**" if origins else "no anomalous node"
            self.summary.object = f"Step **{frame.attrs['step']}** ({html.escape(frame.attrs['step_type'])}), view **{html.escape(frame.attrs['view'])}**: {what}; {where}."
        kinds = {n: str(graph.nodes[n].get("kind") or "intermediate") for n in graph.nodes}
        modules = {n: graph.nodes[n].get("module") for n in kinds}
        self.layout = lay.build_layout(kinds, modules, list(graph.edges()), depth=0)
        boxes = list(self.layout.boxes.values())
        w, h = lay.BOX_W / 2, lay.BOX_H / 2
        colors, infos = [], []
        for b in boxes:
            row = rows.get(b.name)
            if row is None:
                colors.append(NO_DATA)
                infos.append("not recorded in this view at this step")
                continue
            score = float(row.nan_count + row.inf_count) if mode == "non-finite" else float(row.z)
            colors.append(CALM if math.isnan(score) else anomaly_color(score, mode, threshold))  # recorded, no z: calm
            z = "no samples" if math.isnan(row.z) else f"z {row.z:.3g} (batch position {int(row.sample)})"
            infos.append(f"NaN {row.nan_count} · inf {row.inf_count} · {z}" + (" · ORIGIN" if row.origin else ""))
        self.boxes.data = {
            "left": [b.x - w for b in boxes], "right": [b.x + w for b in boxes],
            "bottom": [b.y - h for b in boxes], "top": [b.y + h for b in boxes],
            "x": [b.x for b in boxes], "y": [b.y for b in boxes],
            "name": [b.name for b in boxes], "label": [b.label for b in boxes], "color": colors, "info": infos,
        }
        marked = [b for b in boxes if b.name in rows and rows[b.name].origin]
        pad = 0.06
        self.origins.data = {
            "left": [b.x - w - pad for b in marked], "right": [b.x + w + pad for b in marked],
            "bottom": [b.y - h - pad for b in marked], "top": [b.y + h + pad for b in marked],
        }
        segs: dict[str, list[float]] = {"x0": [], "y0": [], "x1": [], "y1": []}
        for src, dst in self.layout.edges:
            a, b2 = self.layout.boxes[src], self.layout.boxes[dst]
            for key, value in zip(("x0", "y0", "x1", "y1"), (a.x + w, a.y, b2.x - w, b2.y), strict=True):
                segs[key].append(value)
        self.edges.data = segs
        n_layers, tallest = self.layout.n_layers, self.layout.max_layer_size
        self.figure.width = int(min(2400, max(760, 150 * n_layers + 120)))
        self.figure.height = int(min(2000, max(220, 46 * tallest + 70)))
        ys = [b.y for b in boxes] or [0.0]
        for rng, (lo, hi) in ((self.figure.x_range, (-0.6, n_layers - 1 + 0.6)), (self.figure.y_range, (min(ys) - 0.7, max(ys) + 0.7))):
            rng.update(start=lo, end=hi, reset_start=lo, reset_end=hi)

    def _correlate(self, *_: Any) -> None:
        if not self.active or not self.target.value:
            return
        data = self.selection.data
        if data is None:
            return
        try:
            frame = analysis.correlate(data.run, self.target.value)
        except ComgraError as exc:
            self.correlations = None
            self.table.value = pd.DataFrame({"message": [str(exc)]})
            return
        self.correlations = frame
        self.table.value = frame.round({"rho": 3, "p_value": 4})

    # ----------------------------------------------------------------------------------- clicks
    def color_of(self, node: str) -> str | None:
        """The fill of a node's box (for tests)."""
        names = list(self.boxes.data["name"])
        return self.boxes.data["color"][names.index(node)] if node in names else None

    def _on_tap(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        name = self.layout.box_at(x, y)
        if name is not None and name in self.selection.param.node.objects:
            self.selection.node = name

    def _kept_clicked(self, event: Any) -> None:
        value = self.kept.value
        if event.row is None or "step" not in value or event.row >= len(value):
            return
        row = value.iloc[event.row]
        sel = self.selection
        sel.param.update(step_type=str(row["step_type"]))
        if int(row["step"]) in sel.steps:
            sel.step = int(row["step"])

    def _correlation_clicked(self, event: Any) -> None:
        frame = self.correlations
        if frame is None or event.row is None or event.row >= len(self.table.value):
            return
        node = self.table.value.iloc[event.row]["node"]
        if node in self.selection.param.node.objects:
            self.selection.node = node

    def _go_first(self, *_: Any) -> None:
        data = self.selection.data
        if data is None:
            return
        found = analysis.first_anomaly(data.run, view=self.view.value)
        if found is None:
            self.summary.object = "No recorded step holds a NaN or an infinity in this view."
            return
        sel = self.selection
        sel.param.update(step_type=found["step_type"])
        sel.step = found["step"]
        if found["origin"] and found["origin"][0] in sel.param.node.objects:
            sel.node = found["origin"][0]
