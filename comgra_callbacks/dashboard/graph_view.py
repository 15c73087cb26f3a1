"""The dependency graph: boxes coloured by kind, arrows only for the selected node, click to select.

The boxes are drawn once per run, step type and grouping; selecting a node only redraws the highlight and
its arrows (a HoloViews ``DynamicMap`` driven by a stream), so clicking through a big graph stays fast and
keeps the zoom. Big graphs start collapsed by module prefix; clicking a group box opens it.
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param
from panel.viewable import Viewer

from comgra_callbacks.dashboard import layout as lay
from comgra_callbacks.dashboard import plots  # noqa: F401  (loads the Bokeh backend)
from comgra_callbacks.dashboard.state import Selection

MAX_BOXES = 40  # above this many nodes the graph starts grouped by module prefix
IN_COLOR, OUT_COLOR, SELECTED = "#2b8a3e", "#c92a2a", "#111111"
NodeStream = hv.streams.Stream.define("NodeStream", node="")
GRAPH_FIGURE = "comgra-graph"


class GraphView(Viewer):
    """The dependency graph of the selected run and step type.

    Attributes:
        layout: the current :class:`~comgra_callbacks.dashboard.layout.GraphLayout`.
    """

    grouping = param.Selector(default="auto", objects=["auto", "none", "1", "2", "3", "4"], label="Group by module")
    expanded = param.List(default=[], doc="Group boxes opened by a click.")

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.layout: lay.GraphLayout = lay.GraphLayout({}, [])
        self._stream = NodeStream(node="")
        self._tap: hv.streams.Tap | None = None
        self._key: tuple[Any, ...] | None = None
        self._plot_opts: dict[str, Any] = {}
        self.pane = pn.pane.HoloViews(linked_axes=False, sizing_mode="stretch_width")
        self.info = pn.pane.Markdown("", margin=(0, 10))
        selection.param.watch(self._on_structure, ["run", "step_type", "revision"])
        selection.param.watch(self._on_node, ["node"])
        self.param.watch(self._on_structure, ["grouping", "expanded"])
        self._rebuild()

    def __panel__(self) -> pn.viewable.Viewable:
        controls = pn.Row(pn.widgets.Select.from_param(self.param.grouping, width=140), self.info, align="center")
        return pn.Column(controls, pn.Column(self.pane, scroll=True, max_height=720, sizing_mode="stretch_width"), sizing_mode="stretch_width")

    # ------------------------------------------------------------------------------- structure
    def depth(self, kinds: dict[str, str], modules: dict[str, str | None]) -> int:
        if self.grouping == "auto":
            return lay.auto_depth(kinds, modules, MAX_BOXES)
        return 0 if self.grouping == "none" else int(self.grouping)

    def _on_structure(self, *events: Any) -> None:
        if any(e.name in ("run", "step_type") for e in events):
            with param.parameterized.discard_events(self):
                self.expanded = []  # another graph: start collapsed again
        self._rebuild()

    def _rebuild(self) -> None:
        sel = self.selection
        data = sel.data
        if data is None:
            self.pane.object = None
            return
        graph = data.graph(sel.step_type)
        kinds = {n: str(graph.nodes[n].get("kind") or "intermediate") for n in sel.param.node.objects if n in graph}
        modules = {n: graph.nodes[n].get("module") for n in kinds}
        depth = self.depth(kinds, modules)
        expanded = list(self.expanded)
        owner = lay.group_nodes(kinds, modules, depth=depth, expanded=expanded)
        if sel.node in owner and owner[sel.node] != sel.node:
            expanded = self._open_for(sel.node, kinds, modules, depth, expanded)
        key = (data.run.uri, data.run.manifest.rows, sel.step_type, depth, tuple(expanded))
        if key == self._key:
            return
        self._key = key
        self.layout = lay.build_layout(kinds, modules, [(u, v) for u, v in graph.edges()], depth=depth, expanded=expanded)
        groups = sum(1 for b in self.layout.boxes.values() if b.is_group)
        self.info.object = f"{len(kinds)} nodes" + (f" in {len(self.layout.boxes)} boxes ({groups} module groups: click one to open it)" if groups else "")
        static = self._static()
        self._tap = hv.streams.Tap(source=static.get(0), x=None, y=None)
        self.pane.object = (static * hv.DynamicMap(self._highlight, streams=[self._stream])).opts(hv.opts.Overlay(**self._plot_opts))
        self._tap.add_subscriber(self._on_tap)
        self._stream.event(node=self._box_of(sel.node))

    def _open_for(self, node: str, kinds: dict[str, str], modules: dict[str, str | None], depth: int, expanded: list[str]) -> list[str]:
        """Open the groups that hide ``node`` (a node chosen from a list or by the comparison table)."""
        expanded = list(expanded)
        for _ in range(32):
            box = lay.group_nodes(kinds, modules, depth=depth, expanded=expanded).get(node, node)
            if box == node:
                break
            expanded.append(box)
        with param.parameterized.discard_events(self):
            self.expanded = expanded
        return expanded

    def _static(self) -> hv.Overlay:
        boxes = list(self.layout.boxes.values())
        w, h = lay.BOX_W / 2, lay.BOX_H / 2
        graph = self.selection.data.run.graph if self.selection.data else None
        layers: list[Any] = []
        for kind, color in lay.KIND_COLORS.items():
            rows = [
                (b.x - w, b.y - h, b.x + w, b.y + h, b.name, b.kind, _describe(graph, b))
                for b in boxes
                if b.kind == kind
            ]
            if rows:
                layers.append(
                    hv.Rectangles(rows, kdims=["gx0", "gy0", "gx1", "gy1"], vdims=["name", "kind", "info"], label=kind).opts(
                        color=color, line_color="#555555", tools=["hover"], hover_tooltips=[("", "@name"), ("kind", "@kind"), ("", "@info")],
                        nonselection_alpha=1.0, selection_alpha=1.0,
                    )
                )
        labels = hv.Labels(([b.x for b in boxes], [b.y for b in boxes], [b.label for b in boxes]), kdims=["gx", "gy"], vdims=["label"])
        n_layers, tallest = self.layout.n_layers, self.layout.max_layer_size
        width = int(min(2400, max(760, 150 * n_layers)))
        height = int(min(2000, max(240, 46 * tallest + 70)))
        xlim = (-0.6, n_layers - 1 + 0.6)
        ys = [b.y for b in boxes] or [0.0]
        ylim = (min(ys) - 0.8, max(ys) + 0.8)
        self._plot_opts = dict(
            width=width, height=height, xaxis=None, yaxis=None, xlim=xlim, ylim=ylim, legend_position="right",
            active_tools=["wheel_zoom"], toolbar="above", show_grid=False, title="", hooks=[_name_figure],
        )
        return hv.Overlay([*layers, labels.opts(text_font_size="8pt", text_color="#111111")])

    # ----------------------------------------------------------------------------- selection
    def _box_of(self, node: str | None) -> str:
        return self.layout.owner.get(node or "", node or "")

    def _on_node(self, event: Any) -> None:
        node = event.new
        if node in self.layout.owner and self.layout.owner[node] != node:
            self._rebuild()  # the node hides in a group: open it
        self._stream.event(node=self._box_of(node))

    def _highlight(self, node: str) -> hv.Overlay:
        box = self.layout.boxes.get(node)
        w, h = lay.BOX_W / 2, lay.BOX_H / 2
        rect, segs, heads = [], [], []
        if box is not None:
            rect.append((box.x - w - 0.04, box.y - h - 0.04, box.x + w + 0.04, box.y + h + 0.04))
            for other, incoming in [(n, True) for n in self.layout.inputs(node)] + [(n, False) for n in self.layout.outputs(node)]:
                o = self.layout.boxes[other]
                src, dst = (o, box) if incoming else (box, o)
                x0, y0, x1, y1 = _edge_points(src, dst, w, h)
                color = IN_COLOR if incoming else OUT_COLOR
                segs.append((x0, y0, x1, y1, color))
                heads.append((x1, y1, float(np.degrees(np.arctan2(y1 - y0, x1 - x0))) - 90.0, color))
        return hv.Overlay(
            [
                hv.Rectangles(rect, kdims=["gx0", "gy0", "gx1", "gy1"]).opts(fill_alpha=0.0, line_color=SELECTED, line_width=3),
                hv.Segments(segs, kdims=["gx0", "gy0", "gx1", "gy1"], vdims=["color"]).opts(color="color", line_width=2),
                hv.Points(heads, kdims=["gx", "gy"], vdims=["angle", "color"]).opts(marker="triangle", size=11, angle=hv.dim("angle"), color="color"),
            ]
        )

    def _on_tap(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        name = self.layout.box_at(x, y)
        if name is not None:
            self.select_box(name)

    def select_box(self, name: str) -> None:
        """What a click on a box does: select the node, or open the group."""
        box = self.layout.boxes.get(name)
        if box is None:
            return
        if box.is_group:
            self.expanded = [*self.expanded, name]
            if self.selection.node not in box.members:
                self.selection.node = box.members[0]
            return
        self.selection.node = name

    def move(self, direction: str) -> None:
        """Arrow keys: follow the graph from the selected node (see :func:`layout.move`)."""
        current = self._box_of(self.selection.node)
        target = lay.move(self.layout, current, direction)
        if target != current:
            self.select_box(target)


def _name_figure(plot: Any, element: Any) -> None:
    """Name the Bokeh figure (so browser tests and users' scripts can find the graph) and keep clicks from
    dimming the boxes that were not clicked."""
    from bokeh.models import TapTool

    plot.state.name = GRAPH_FIGURE
    for tool in plot.state.tools:
        if isinstance(tool, TapTool):
            tool.behavior = "inspect"  # a click selects a node through the Tap stream, without dimming the rest


def _edge_points(src: lay.Box, dst: lay.Box, w: float, h: float) -> tuple[float, float, float, float]:
    """Start and end of an arrow between two boxes: from the side facing the other box."""
    if src.layer == dst.layer:
        sign = 1.0 if dst.y < src.y else -1.0
        return src.x, src.y - sign * h, dst.x, dst.y + sign * h
    sign = 1.0 if dst.x > src.x else -1.0
    return src.x + sign * w, src.y, dst.x - sign * w, dst.y


def _describe(graph: Any, box: lay.Box) -> str:
    if box.is_group:
        shown = ", ".join(box.members[:6]) + (" …" if len(box.members) > 6 else "")
        return f"{len(box.members)} nodes: {shown}"
    if graph is None or box.name not in graph:
        return ""
    attrs = graph.nodes[box.name]
    parts = []
    if attrs.get("shape") is not None:
        parts.append(f"shape {tuple(attrs['shape'])}")
    if attrs.get("module"):
        parts.append(f"module {attrs['module']}")
    roles = [r for r in attrs.get("roles") or [] if r is not None]
    if roles:
        parts.append(f"{len(roles)} roles")
    return " · ".join(parts)
