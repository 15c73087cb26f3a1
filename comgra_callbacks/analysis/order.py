"""The order in which something spreads through the dependency graph, and who comes before whom.

Values flow from inputs and parameters to the losses; gradients flow back, from the losses to the inputs
and parameters. Two names of one tensor (a block returning its child's output, edge source ``"same"``)
count as one tensor, the child first, in both directions.

>>> import networkx as nx
>>> g = nx.DiGraph([("x", "h"), ("w", "h"), ("h", "block"), ("block", "loss")])
>>> g.edges["h", "block"]["source"] = "same"
>>> flow = Flow(g, backward=False)
>>> flow.order
['x', 'w', 'h', 'block', 'loss']
>>> Flow(g, backward=True).order
['loss', 'h', 'block', 'x', 'w']
>>> sorted(flow.before("block")), sorted(Flow(g, backward=True).before("h"))
(['h', 'w', 'x'], ['loss'])
>>> g.add_edge("loss", "x", source="manual")  # a loop: broken at its last edge, never an error
>>> len(Flow(g, backward=False).order)
5
"""

from __future__ import annotations

from typing import Any

import networkx as nx


def is_gradient(view: str) -> bool:
    """Whether a view flows backwards: ``grad`` and ``grad:<loss>``."""
    return view == "grad" or view.startswith("grad:")


class Flow:
    """Dependency order of a graph's nodes, forwards (values) or backwards (gradients).

    Attributes:
        order: every node, each after everything it depends on (ties broken by the graph's own node order).
    """

    def __init__(self, graph: Any, *, backward: bool) -> None:
        rank = {name: i for i, name in enumerate(graph.nodes)}
        same = [(u, v) for u, v, source in graph.edges(data="source") if source == "same"]
        alias = nx.DiGraph(same)
        self._group: dict[str, str] = {}
        self._members: dict[str, list[str]] = {}
        for part in nx.weakly_connected_components(alias):
            inner = list(nx.lexicographical_topological_sort(alias.subgraph(part), key=rank.__getitem__))
            for name in inner:
                self._group[name] = inner[0]
            self._members[inner[0]] = inner
        for name in graph.nodes:
            if name not in self._group:
                self._group[name] = name
                self._members[name] = [name]
        groups = nx.DiGraph()
        groups.add_nodes_from(self._members)
        for u, v, source in graph.edges(data="source"):
            gu, gv = self._group[u], self._group[v]
            if source == "same" or gu == gv:
                continue
            groups.add_edge(gv, gu) if backward else groups.add_edge(gu, gv)
        while not nx.is_directed_acyclic_graph(groups):  # not from autograd; a manual edge may close a loop
            groups.remove_edge(*nx.find_cycle(groups)[-1][:2])
        self._groups = groups
        ordered = nx.lexicographical_topological_sort(groups, key=lambda g: rank[g])
        self.order: list[str] = [name for g in ordered for name in self._members[g]]
        self._position = {name: i for i, name in enumerate(self.order)}

    def position(self, name: str) -> int:
        return self._position[name]

    def before(self, name: str) -> set[str]:
        """Every node that ``name`` depends on in this direction (the other names of its tensor that come
        before it included)."""
        group = self._group[name]
        found: set[str] = set()
        for g in nx.ancestors(self._groups, group):
            found.update(self._members[g])
        members = self._members[group]
        found.update(members[: members.index(name)])
        return found
