"""The dependency graph: boxes coloured by kind, arrows only for the selected node, click to select.

One Bokeh figure stays on the page. A new run, step type or grouping replaces the boxes' data; selecting a
node only replaces the highlight and its arrows (a few rows of data), so clicking through a big graph is
instant and keeps the zoom. Big graphs start collapsed by module prefix; clicking a group box opens it.

A circuit tracked during training (``circuit_tracking=`` of the callbacks) can colour the boxes: "Colour by
circuit" paints each node by the highest attribution-patching effect of its units at the selected step (the
last evaluated step at or before it), dark red = the unit closes the whole clean-corrupted gap; hovering a
box lists its best units, and selecting a node lists them under the graph.
"""

from __future__ import annotations

import math
from typing import Any

import panel as pn
import param
from bokeh import events
from bokeh.models import CDSView, ColumnDataSource, GroupFilter, HoverTool, Range1d, TapTool, WheelZoomTool
from bokeh.models.annotations import LegendItem
from bokeh.palettes import YlOrRd9
from bokeh.plotting import figure
from panel.viewable import Viewer

from comgra_callbacks.analysis import tracked_circuit
from comgra_callbacks.dashboard import layout as lay
from comgra_callbacks.dashboard import safe
from comgra_callbacks.dashboard.data import Missing
from comgra_callbacks.dashboard.state import Selection

MAX_BOXES = 40  # above this many nodes the graph starts grouped by module prefix
IN_COLOR, OUT_COLOR, SELECTED = "#2b8a3e", "#c92a2a", "#111111"
GRAPH_FIGURE = "comgra-graph"  # the figure's name, for browser tests and users' scripts
NO_CIRCUIT = "none"
CIRCUIT_UNITS = 5  # units listed per node
CIRCUIT_COLORS = list(YlOrRd9)  # dark red (effect 1) to light yellow (effect 0)


class GraphView(Viewer):
    """The dependency graph of the selected run and step type.

    Attributes:
        layout: the current :class:`~comgra_callbacks.dashboard.layout.GraphLayout`.
        boxes / highlight / edges / heads: the figure's data sources.
    """

    grouping: param.Selector[str] = param.Selector(default="auto", objects=["auto", "none", "1", "2", "3", "4"], label="Group by module")
    expanded = param.List(default=[], doc="Group boxes opened by a click.")
    circuit: param.Selector[str] = param.Selector(default=NO_CIRCUIT, objects=[NO_CIRCUIT], label="Colour by circuit")

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.layout: lay.GraphLayout = lay.GraphLayout({}, [])
        self._key: tuple[Any, ...] | None = None
        self._build_figure()
        self.info = pn.pane.Markdown("", margin=(0, 10))
        self.circuit_info = pn.pane.Markdown("", margin=(0, 10))
        self.circuit_units: dict[str, list[tuple[str, int, float]]] = {}  # box -> [(node, unit, effect)], best first
        selection.param.watch(self._on_structure, ["run", "step_type", "revision"])
        selection.param.watch(self._on_node, ["node"])
        selection.param.watch(lambda _: self._draw_circuit(), ["step"])
        self.param.watch(self._on_structure, ["grouping", "expanded"])
        self.param.watch(lambda _: self._draw_circuit(), ["circuit"])
        self._rebuild()

    def __panel__(self) -> pn.viewable.Viewable:
        controls = pn.Row(
            pn.widgets.Select.from_param(self.param.grouping, width=140), pn.widgets.Select.from_param(self.param.circuit, width=160),
            self.info, align="center",
        )
        graph = pn.Column(self.pane, scroll=True, max_height=720, sizing_mode="stretch_width")
        return pn.Column(controls, graph, self.circuit_info, sizing_mode="stretch_width")

    def _build_figure(self) -> None:
        fig = figure(
            name=GRAPH_FIGURE, width=900, height=300, tools="pan,box_zoom,reset,save", toolbar_location="above",
            x_range=Range1d(start=0, end=1), y_range=Range1d(start=0, end=1), outline_line_color=None,
        )
        fig.toolbar.logo = None
        fig.axis.visible = False
        fig.grid.visible = False
        wheel = WheelZoomTool()
        fig.add_tools(wheel, TapTool(behavior="inspect"))  # inspect: a click does not dim the other boxes
        fig.toolbar.active_scroll = wheel
        self.boxes = ColumnDataSource({k: [] for k in ("left", "right", "bottom", "top", "x", "y", "name", "label", "kind", "info")})
        renderers: list[Any] = []
        for kind, color in lay.KIND_COLORS.items():
            view = CDSView(filter=GroupFilter(column_name="kind", group=kind))
            renderers.append(
                fig.quad(left="left", right="right", bottom="bottom", top="top", source=self.boxes, view=view,
                         fill_color=color, line_color="#555555", legend_label=kind)
            )
        fig.add_tools(HoverTool(renderers=renderers, tooltips=[("", "@name"), ("kind", "@kind"), ("", "@info")]))
        self.circuit_boxes = ColumnDataSource({k: [] for k in ("left", "right", "bottom", "top", "name", "color", "effect", "units")})
        painted = fig.quad(left="left", right="right", bottom="bottom", top="top", source=self.circuit_boxes, fill_color="color", line_color="#555555")
        fig.add_tools(HoverTool(renderers=[painted], tooltips=[("", "@name"), ("effect", "@effect{0.000}"), ("units", "@units")]))
        fig.text(x="x", y="y", text="label", source=self.boxes, text_align="center", text_baseline="middle", text_font_size="8pt", text_color="#111111")
        self.highlight = ColumnDataSource({"left": [], "right": [], "bottom": [], "top": []})
        fig.quad(left="left", right="right", bottom="bottom", top="top", source=self.highlight, fill_alpha=0, line_color=SELECTED, line_width=3)
        self.edges = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": [], "color": []})
        fig.segment("x0", "y0", "x1", "y1", source=self.edges, line_color="color", line_width=2)
        self.heads = ColumnDataSource({"x": [], "y": [], "angle": [], "color": []})
        fig.scatter("x", "y", source=self.heads, marker="triangle", size=11, angle="angle", fill_color="color", line_color="color")
        legend = fig.legend[0]
        legend.click_policy = "none"
        legend.label_text_font_size = "9pt"
        fig.add_layout(legend, "right")
        fig.on_event(events.Tap, self._on_tap_event)
        self.figure = fig
        self.pane = pn.pane.Bokeh(fig, margin=(0, 10))

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
            return
        graph = data.graph(sel.step_type)
        kinds = {n: str(graph.nodes[n].get("kind") or "intermediate") for n in sel.param.node.objects if n in graph}
        modules = {n: graph.nodes[n].get("module") for n in kinds}
        depth = self.depth(kinds, modules)
        expanded = list(self.expanded)
        owner = lay.group_nodes(kinds, modules, depth=depth, expanded=expanded)
        if sel.node in owner and owner[sel.node] != sel.node:
            expanded = self._open_for(sel.node, kinds, modules, depth, expanded)
        key = (data.run.uri, data.run.manifest.rows, sel.step_type, depth, tuple(expanded), tuple(kinds))
        if key != self._key:
            self._key = key
            self.layout = lay.build_layout(kinds, modules, [(u, v) for u, v in graph.edges()], depth=depth, expanded=expanded)
            self._draw_boxes(graph)
            groups = sum(1 for b in self.layout.boxes.values() if b.is_group)
            plural = "group" if groups == 1 else "groups"
            self.info.object = f"{len(kinds)} nodes" + (f" in {len(self.layout.boxes)} boxes ({groups} module {plural}: click one to open it)" if groups else "")
        self._draw_highlight(self._box_of(sel.node))
        self._circuit_options(data)
        self._draw_circuit()

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

    def _draw_boxes(self, graph: Any) -> None:
        boxes = list(self.layout.boxes.values())
        w, h = lay.BOX_W / 2, lay.BOX_H / 2
        self.boxes.data = {
            "left": [b.x - w for b in boxes], "right": [b.x + w for b in boxes],
            "bottom": [b.y - h for b in boxes], "top": [b.y + h for b in boxes],
            "x": [b.x for b in boxes], "y": [b.y for b in boxes],
            "name": [b.name for b in boxes], "label": [b.label for b in boxes],
            "kind": [b.kind for b in boxes], "info": [_describe(graph, b) for b in boxes],
        }
        present = {b.kind for b in boxes}
        for item in self.figure.legend[0].items:
            if not isinstance(item, LegendItem):
                continue
            label = item.label
            item.visible = (label.get("value") if isinstance(label, dict) else getattr(label, "value", label)) in present
        n_layers, tallest = self.layout.n_layers, self.layout.max_layer_size
        self.figure.width = int(min(2400, max(760, 150 * n_layers + 120)))
        self.figure.height = int(min(2000, max(220, 46 * tallest + 70)))
        ys = [b.y for b in boxes] or [0.0]
        bounds = {"x": (-0.6, n_layers - 1 + 0.6), "y": (min(ys) - 0.7, max(ys) + 0.7)}
        for axis, rng in (("x", self.figure.x_range), ("y", self.figure.y_range)):
            lo, hi = bounds[axis]
            rng.update(start=lo, end=hi, reset_start=lo, reset_end=hi)

    # ----------------------------------------------------------------------------- selection
    def _box_of(self, node: str | None) -> str:
        return self.layout.owner.get(node or "", node or "")

    def _on_node(self, event: Any) -> None:
        node = event.new
        if node in self.layout.owner and self.layout.owner[node] != node:
            self._rebuild()  # the node hides in a group: open it
        else:
            self._draw_highlight(self._box_of(node))
            self._describe_circuit()

    def _draw_highlight(self, name: str) -> None:
        box = self.layout.boxes.get(name)
        w, h = lay.BOX_W / 2, lay.BOX_H / 2
        rect: dict[str, list[float]] = {"left": [], "right": [], "bottom": [], "top": []}
        edges: dict[str, list[Any]] = {"x0": [], "y0": [], "x1": [], "y1": [], "color": []}
        heads: dict[str, list[Any]] = {"x": [], "y": [], "angle": [], "color": []}
        if box is not None:
            pad = 0.05
            rect = {"left": [box.x - w - pad], "right": [box.x + w + pad], "bottom": [box.y - h - pad], "top": [box.y + h + pad]}
            links = [(n, True) for n in self.layout.inputs(name)] + [(n, False) for n in self.layout.outputs(name)]
            for other, incoming in links:
                src, dst = (self.layout.boxes[other], box) if incoming else (box, self.layout.boxes[other])
                x0, y0, x1, y1 = _edge_points(src, dst, w, h)
                color = IN_COLOR if incoming else OUT_COLOR
                for key, value in zip(("x0", "y0", "x1", "y1", "color"), (x0, y0, x1, y1, color), strict=True):
                    edges[key].append(value)
                heads["x"].append(x1)
                heads["y"].append(y1)
                heads["angle"].append(math.atan2(y1 - y0, x1 - x0) - math.pi / 2)
                heads["color"].append(color)
        self.highlight.data = rect
        self.edges.data = edges
        self.heads.data = heads

    # ------------------------------------------------------------------------------- circuits
    def _circuit_options(self, data: Any) -> None:
        names = [NO_CIRCUIT, *data.run.circuits]
        if self.param.circuit.objects != names:
            self.param.circuit.objects = names
            if self.circuit not in names:
                self.circuit = NO_CIRCUIT

    def _draw_circuit(self) -> None:
        """Paint the boxes by the circuit's effect at the selected step (or remove the paint)."""
        sel, data, name = self.selection, self.selection.data, self.circuit
        self.circuit_units = {}
        rows: dict[str, list[Any]] = {k: [] for k in self.circuit_boxes.data}
        if name == NO_CIRCUIT or data is None:
            self.circuit_boxes.data = rows
            self._describe_circuit()
            return
        scores = data._cached(("circuit_scores", name, data.run.manifest.scalars_len), lambda: data.run.circuit_scores(name))
        table = tracked_circuit(scores, sel.step, k=CIRCUIT_UNITS) if not isinstance(scores, Missing) else None
        if table is None or table.empty:
            self.circuit_boxes.data = rows
            self.circuit_info.object = f"⚠ circuit {safe.text(name)}: no scores" + (f" ({safe.text(scores.message)})" if isinstance(scores, Missing) else "")
            return
        by_node: dict[str, list[tuple[str, int, float]]] = {}
        for node, unit, effect in table[["node", "unit", "effect"]].itertuples(index=False):
            by_node.setdefault(str(node), []).append((str(node), int(unit), float(effect)))
        w, h = lay.BOX_W / 2, lay.BOX_H / 2
        for box in self.layout.boxes.values():
            units = sorted((u for member in box.members for u in by_node.get(member, [])), key=lambda u: -u[2] if u[2] == u[2] else 0.0)
            if not units:
                continue
            best = max((u[2] for u in units if u[2] == u[2]), default=float("nan"))
            self.circuit_units[box.name] = units
            shade = 0.0 if best != best else min(1.0, max(0.0, best))
            for key, value in (
                ("left", box.x - w), ("right", box.x + w), ("bottom", box.y - h), ("top", box.y + h), ("name", box.name),
                ("color", CIRCUIT_COLORS[round((1.0 - shade) * (len(CIRCUIT_COLORS) - 1))]), ("effect", best),
                ("units", _units_text(units, box.is_group)),
            ):
                rows[key].append(value)
        self.circuit_boxes.data = rows
        self._circuit_step = int(table.attrs["step"])
        self._describe_circuit()

    def _describe_circuit(self) -> None:
        if self.circuit == NO_CIRCUIT:
            self.circuit_info.object = ""
            return
        step = getattr(self, "_circuit_step", None)
        text = f"Circuit **{safe.text(self.circuit)}** at evaluated step **{step}** (colour: the best unit's effect, dark red = 1)."
        units = self.circuit_units.get(self._box_of(self.selection.node))
        if units:
            text += f"  \nBest units of **{safe.text(self.selection.node)}**: {safe.text(_units_text(units, False))}"
        self.circuit_info.object = text

    def _on_tap_event(self, event: Any) -> None:
        self._on_tap(event.x, event.y)

    def _on_tap(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        name = self.layout.box_at(x, y)
        if name is not None:
            self.select_box(name)

    def select_box(self, name: str) -> None:
        """What a click on a box does: select the node, or open the group (the selection stays)."""
        box = self.layout.boxes.get(name)
        if box is None:
            return
        if box.is_group:
            self.expanded = [*self.expanded, name]
            return
        self.selection.node = name

    def move(self, direction: str) -> None:
        """Arrow keys: follow the graph from the selected node (see :func:`layout.move`)."""
        current = self._box_of(self.selection.node)
        target = lay.move(self.layout, current, direction)
        if target != current:
            self.select_box(target)

    @property
    def selected_box(self) -> str | None:
        """The box drawn as selected (for tests)."""
        lefts = self.highlight.data["left"]
        if not lefts:
            return None
        return self.layout.box_at(lefts[0] + lay.BOX_W / 2 + 0.05, self.highlight.data["bottom"][0] + lay.BOX_H / 2 + 0.05)


def _edge_points(src: lay.Box, dst: lay.Box, w: float, h: float) -> tuple[float, float, float, float]:
    """Start and end of an arrow between two boxes: from the side facing the other box."""
    if src.layer == dst.layer:
        sign = 1.0 if dst.y < src.y else -1.0
        return src.x, src.y - sign * h, dst.x, dst.y + sign * h
    sign = 1.0 if dst.x > src.x else -1.0
    return src.x + sign * w, src.y, dst.x - sign * w, dst.y


def _units_text(units: list[tuple[str, int, float]], with_node: bool) -> str:
    """``"3 (0.82), 5 (0.41)"``; with the node's name for a group box."""
    shown = units[:CIRCUIT_UNITS]
    return ", ".join(f"{n}:{u} ({e:.2f})" if with_node else f"{u} ({e:.2f})" for n, u, e in shown)


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
