"""Place the dependency graph on a page: layers from inputs to losses, and boxes for module groups.

Pure functions over node names, kinds and edges (no Panel, no HoloViews), so they are tested on their own.

* :func:`group_nodes` collapses big graphs by module prefix (``encoder.layers.3`` becomes one box) so that a
  graph of hundreds of tensors stays readable; expanded groups show their members again.
* :func:`layered_layout` puts every box in a layer (inputs left, losses right, parameters just before their
  first consumer) and orders each layer to reduce crossings.
* :func:`move` is what the arrow keys do.

>>> kinds = {"x": "input", "w": "parameter", "h": "intermediate", "y": "target", "loss": "loss"}
>>> lay = layered_layout(kinds, [("x", "h"), ("w", "h"), ("h", "loss"), ("y", "loss")])
>>> [lay.boxes[n].layer for n in ("x", "w", "h", "y", "loss")]
[0, 0, 1, 1, 2]
>>> move(lay, "h", "right"), move(lay, "h", "left") in ("x", "w")
('loss', True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

X_GAP = 1.0  # distance between layers (data units)
Y_GAP = 1.0  # distance between boxes of a layer
BOX_W = 0.82
BOX_H = 0.62
GROUP_KIND = "group"
# Kinds drawn in the graph, in legend order, with their colours (colour-blind friendly, light enough for text).
KIND_COLORS = {
    "input": "#8fd18f",
    "target": "#f2c66d",
    "parameter": "#b8c4d6",
    "intermediate": "#9cc9f0",
    "output": "#c9a7e8",
    "loss": "#f08f8f",
    GROUP_KIND: "#e0e0e0",
}
_NEVER_GROUPED = {"input", "target", "output", "loss"}


@dataclass(frozen=True)
class Box:
    """One box of the drawn graph: a node, or a collapsed group of nodes sharing a module prefix."""

    name: str
    label: str
    kind: str
    layer: int
    x: float
    y: float
    members: tuple[str, ...]

    @property
    def is_group(self) -> bool:
        return self.kind == GROUP_KIND


@dataclass
class GraphLayout:
    """Positions of every box, the edges between boxes, and which box holds each node."""

    boxes: dict[str, Box]
    edges: list[tuple[str, str]]
    owner: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return 1 + max((b.layer for b in self.boxes.values()), default=0)

    @property
    def max_layer_size(self) -> int:
        sizes: dict[int, int] = {}
        for box in self.boxes.values():
            sizes[box.layer] = sizes.get(box.layer, 0) + 1
        return max(sizes.values(), default=0)

    def inputs(self, name: str) -> list[str]:
        return [src for src, dst in self.edges if dst == name]

    def outputs(self, name: str) -> list[str]:
        return [dst for src, dst in self.edges if src == name]

    def box_at(self, x: float, y: float) -> str | None:
        """The box under a point (data coordinates), else the nearest one within half a gap."""
        best, best_d = None, 0.5 * min(X_GAP, Y_GAP)
        for box in self.boxes.values():
            dx, dy = abs(box.x - x), abs(box.y - y)
            if dx <= BOX_W / 2 and dy <= BOX_H / 2:
                return box.name
            d = max(dx - BOX_W / 2, dy - BOX_H / 2)
            if d < best_d:
                best, best_d = box.name, d
        return best


def short_label(name: str, max_chars: int = 22) -> str:
    """A label that fits a box: the name, or its last dotted parts after an ellipsis.

    >>> short_label("net.0.weight")
    'net.0.weight'
    >>> short_label("model.encoder.layers.11.attention.output.dense")
    '…output.dense'
    """
    if len(name) <= max_chars:
        return name
    parts = name.split(".")
    label = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + 1 + len(label) + 1 > max_chars:
            break
        label = f"{part}.{label}"
    return "…" + label[-(max_chars - 1) :]


def distinct_labels(names: Iterable[str], max_chars: int = 22) -> dict[str, str]:
    """Labels that fit a box and still tell the names apart: the dotted prefix all names share is left out,
    then each name keeps the fewest last dotted parts that no other name ends with; a label still too long
    keeps its first and last parts around an ellipsis. The full name is shown on hover.

    >>> labels = distinct_labels(["model.encoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.q_proj",
    ...                           "model.encoder.layers.0.self_attn", "loss"])
    >>> [labels[n] for n in sorted(labels)]
    ['loss', 'dec.lay.0.sel.q_proj', 'encoder…self_attn', 'enc.lay.0.sel.q_proj']
    """
    names = list(dict.fromkeys(names))
    split = {n: n.split(".") for n in names}
    dotted = [parts for parts in split.values() if len(parts) > 1]
    common = 0
    if len(dotted) > 1:
        first = dotted[0]
        while common < len(first) - 1 and all(len(p) > common + 1 and p[common] == first[common] for p in dotted):
            common += 1
    labels: dict[str, str] = {}
    for name, parts in split.items():
        parts = parts[common:] if len(parts) > common + 1 else parts
        k = 1
        while k < len(parts) and any(o != name and ".".join(split[o][-k:]) == ".".join(parts[-k:]) for o in names):
            k += 1
        tail = ".".join(parts[-k:])
        label = tail if k == len(parts) else (f"{parts[0]}…{tail}" if k < len(parts) - 1 else ".".join(parts[-k - 1:]))
        if k >= len(parts) - 1:
            label = ".".join(parts)
        kept = label.split(".")
        for width in (3, 1):  # too long: abbreviate the parts before the last (numbers stay whole)
            if len(label) <= max_chars:
                break
            label = ".".join([p if p.isdigit() else p[:width] for p in kept[:-1]] + kept[-1:])
        if len(label) > max_chars:
            label = "…" + label[-(max_chars - 1) :]
        labels[name] = label
    seen: dict[str, int] = {}
    for label in labels.values():  # what is still ambiguous gets a number
        seen[label] = seen.get(label, 0) + 1
    counts: dict[str, int] = {}
    for name, label in list(labels.items()):
        if seen[label] > 1:
            counts[label] = counts.get(label, 0) + 1
            labels[name] = f"{label} #{counts[label]}"
    return labels


def module_path(name: str, module: str | None) -> list[str]:
    """The dotted path that groups a node: its module for a module output or parameter, else its name.

    >>> module_path("enc.0.weight", "enc.0"), module_path("loss", None)
    (['enc', '0'], ['loss'])
    """
    path = module if module else name
    return [p for p in path.split(".") if p]


def group_nodes(
    kinds: Mapping[str, str],
    modules: Mapping[str, str | None],
    *,
    depth: int,
    expanded: Iterable[str] = (),
) -> dict[str, str]:
    """Map every node to the box that shows it: itself, or a group named ``"<prefix>.*"``.

    Nodes whose module path has at least ``depth`` parts share a box with the other nodes of the same
    ``depth``-long prefix (a module with its parameters, at the deepest level); an expanded group shows the
    next level instead. Inputs, targets, outputs and
    losses are never grouped, and a group of one node is just that node. ``depth=0`` groups nothing.

    >>> kinds = {"a.0.w": "parameter", "a.0": "intermediate", "a.1.w": "parameter", "a.1": "intermediate", "loss": "loss"}
    >>> mods = {"a.0.w": "a.0", "a.0": "a.0", "a.1.w": "a.1", "a.1": "a.1", "loss": None}
    >>> sorted(set(group_nodes(kinds, mods, depth=1).values()))
    ['a.*', 'loss']
    >>> sorted(set(group_nodes(kinds, mods, depth=1, expanded=["a.*"]).values()))
    ['a.0.*', 'a.1.*', 'loss']
    """
    if depth <= 0:
        return {name: name for name in kinds}
    opened = set(expanded)
    owner: dict[str, str] = {}
    for name, kind in kinds.items():
        path = module_path(name, modules.get(name))
        if kind in _NEVER_GROUPED or len(path) < depth:
            owner[name] = name
            continue
        d = depth
        key = ".".join(path[:d]) + ".*"
        while key in opened and d < len(path):
            d += 1
            key = ".".join(path[:d]) + ".*"
        owner[name] = name if key in opened else key
    counts: dict[str, int] = {}
    for key in owner.values():
        counts[key] = counts.get(key, 0) + 1
    return {name: (name if counts[key] == 1 else key) for name, key in owner.items()}


def auto_depth(kinds: Mapping[str, str], modules: Mapping[str, str | None], max_boxes: int) -> int:
    """The deepest grouping whose graph has at most ``max_boxes`` boxes (0 when the graph is small enough).

    >>> kinds = {f"l.{i}.w": "parameter" for i in range(30)} | {f"l.{i}": "intermediate" for i in range(30)}
    >>> mods = {n: n.removesuffix(".w") for n in kinds}
    >>> auto_depth(kinds, mods, 100), auto_depth(kinds, mods, 40), auto_depth(kinds, mods, 10)
    (0, 2, 1)
    """
    if len(kinds) <= max_boxes:
        return 0
    longest = max((len(module_path(n, modules.get(n))) for n in kinds), default=1)
    best = 1
    for depth in range(1, longest + 1):
        if len(set(group_nodes(kinds, modules, depth=depth).values())) <= max_boxes:
            best = depth
        else:
            break
    return best


def _cycle_free_order(names: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """A position per name such that edges point forward where the graph allows (given order breaks cycles)."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    graph.add_edges_from((s, d) for s, d in edges if s != d)
    rank = {name: i for i, name in enumerate(names)}
    if nx.is_directed_acyclic_graph(graph):
        order = list(nx.lexicographical_topological_sort(graph, key=rank.__getitem__))
        return {name: i for i, name in enumerate(order)}
    # cycles (a recurrent loop): the strongly connected parts in dependency order, the given order inside each
    condensed = nx.condensation(graph)
    members = condensed.graph["mapping"]  # name -> component
    first = {c: min(rank[n] for n in condensed.nodes[c]["members"]) for c in condensed.nodes}
    components = list(nx.lexicographical_topological_sort(condensed, key=first.__getitem__))
    order = [n for c in components for n in sorted(condensed.nodes[c]["members"], key=rank.__getitem__)]
    del members
    return {name: i for i, name in enumerate(order)}


def layered_layout(kinds: Mapping[str, str], edges: Iterable[tuple[str, str]], *, sweeps: int = 4) -> GraphLayout:
    """Assign each box a layer and a position: a layered (Sugiyama-style) drawing, left to right.

    Args:
        kinds: box name -> kind (``input``, ``parameter``, …, or ``group``), in graph order.
        edges: ``(src, dst)`` pairs between boxes.
        sweeps: barycentre passes that reorder each layer to reduce crossings.
    """
    names = list(kinds)
    edge_list = sorted({(s, d) for s, d in edges if s != d and s in kinds and d in kinds})
    pos = _cycle_free_order(names, edge_list)
    forward = [(s, d) for s, d in edge_list if pos[s] < pos[d]]
    preds: dict[str, list[str]] = {n: [] for n in names}
    succs: dict[str, list[str]] = {n: [] for n in names}
    for s, d in forward:
        preds[d].append(s)
        succs[s].append(d)
    layer: dict[str, int] = {}
    for name in sorted(names, key=pos.__getitem__):
        layer[name] = 1 + max((layer[p] for p in preds[name]), default=-1)
    # Parameters and targets sit just before their first consumer rather than all at the far left.
    for name in sorted(names, key=pos.__getitem__, reverse=True):
        if not preds[name] and succs[name] and kinds[name] in ("parameter", "target", GROUP_KIND):
            layer[name] = max(0, min(layer[d] for d in succs[name]) - 1)
    last = max(layer.values(), default=0)
    for name in names:  # losses line up on the right
        if kinds[name] == "loss" and not succs[name]:
            layer[name] = last
    by_layer: dict[int, list[str]] = {}
    for name in sorted(names, key=pos.__getitem__):
        by_layer.setdefault(layer[name], []).append(name)
    index = {n: float(i) for members in by_layer.values() for i, n in enumerate(members)}
    neighbours = {n: preds[n] + succs[n] for n in names}
    for _ in range(sweeps):
        for members in by_layer.values():
            def centre(n: str) -> float:
                near = neighbours[n]
                return sum(index[m] for m in near) / len(near) if near else index[n]

            members.sort(key=lambda n: (centre(n), index[n]))
            for i, n in enumerate(members):
                index[n] = float(i)
    boxes = {}
    labels = distinct_labels(names)
    for lay, members in by_layer.items():
        offset = (len(members) - 1) / 2
        for i, name in enumerate(members):
            boxes[name] = Box(
                name=name,
                label=labels[name],
                kind=kinds[name],
                layer=lay,
                x=lay * X_GAP,
                y=-(i - offset) * Y_GAP,
                members=(name,),
            )
    return GraphLayout(boxes=boxes, edges=edge_list, owner={n: n for n in names})


def build_layout(
    kinds: Mapping[str, str],
    modules: Mapping[str, str | None],
    edges: Iterable[tuple[str, str]],
    *,
    depth: int = 0,
    expanded: Iterable[str] = (),
) -> GraphLayout:
    """Group the nodes (see :func:`group_nodes`), then lay the boxes out (see :func:`layered_layout`).

    >>> kinds = {"x": "input", "a.0": "intermediate", "a.1": "intermediate", "loss": "loss"}
    >>> mods = {"x": None, "a.0": "a.0", "a.1": "a.1", "loss": None}
    >>> lay = build_layout(kinds, mods, [("x", "a.0"), ("a.0", "a.1"), ("a.1", "loss")], depth=1)
    >>> sorted(lay.boxes), lay.owner["a.1"], lay.boxes["a.*"].members
    (['a.*', 'loss', 'x'], 'a.*', ('a.0', 'a.1'))
    """
    edges = list(edges)
    owner = group_nodes(kinds, modules, depth=depth, expanded=expanded)
    box_kinds: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for name, kind in kinds.items():
        key = owner[name]
        members.setdefault(key, []).append(name)
        box_kinds[key] = kind if key == name else GROUP_KIND
    box_edges = {(owner[s], owner[d]) for s, d in edges if s in owner and d in owner and owner[s] != owner[d]}
    layout = layered_layout(box_kinds, box_edges)
    for key, box in list(layout.boxes.items()):
        if box.is_group:
            label = short_label(key.removesuffix(".*"), 16) + f" ({len(members[key])})"
            layout.boxes[key] = Box(key, label, box.kind, box.layer, box.x, box.y, tuple(members[key]))
    layout.owner = owner
    return layout


def move(layout: GraphLayout, current: str, direction: str) -> str:
    """The box the arrow keys lead to from ``current``: ``left``/``right`` follow the graph's edges (to an
    input or output, activations before parameters, the nearest first; else the nearest box of the
    neighbouring layer), ``up``/``down`` stay in the layer. Returns ``current`` when there is nowhere to go."""
    box = layout.boxes.get(current)
    if box is None:
        return next(iter(layout.boxes), current)
    if direction in ("up", "down"):
        same = sorted((b for b in layout.boxes.values() if b.layer == box.layer), key=lambda b: -b.y)
        i = [b.name for b in same].index(current) + (1 if direction == "down" else -1)
        return same[i].name if 0 <= i < len(same) else current
    linked = layout.outputs(current) if direction == "right" else layout.inputs(current)
    if not linked:
        step = 1 if direction == "right" else -1
        layer = box.layer + step
        while 0 <= layer < layout.n_layers:
            linked = [b.name for b in layout.boxes.values() if b.layer == layer]
            if linked:
                break
            layer += step
    if not linked:
        return current
    # Prefer the flow of activations over parameters, then the box nearest in height.
    return min(linked, key=lambda n: (layout.boxes[n].kind == "parameter", abs(layout.boxes[n].y - box.y), layout.boxes[n].x))
