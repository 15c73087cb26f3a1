"""The dependency graph of the recorded tensors, derived from autograd.

From each recorded tensor we walk its ``grad_fn`` backwards (iteratively: a chain of thousands of layers is
fine) and stop at the nearest *recorded* tensors: those become its inputs in the graph. Parameters are
reached through their ``AccumulateGrad`` nodes. Autograd cannot see tensors that do not require grad
(integer token ids, inputs under ``no_grad``), so the recorder adds edges for them from the modules that
consume them, and :func:`comgra_callbacks.connect` adds any edge by hand.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> x = torch.ones(3)
>>> h = x * w
>>> y = (h * 2).sum()
>>> sorted(autograd_edges([Tensor_.of("h", h), Tensor_.of("y", y)], {id(w): "w"}))
[('h', 'y'), ('w', 'h')]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple


class Tensor_(NamedTuple):
    """A recorded tensor as the graph walk sees it, taken when it was recorded (an in-place operation later
    gives the tensor a new ``grad_fn``): its node name, ``grad_fn``, ``output_nr``, and the tensor itself
    when it is a leaf that requires grad (else None)."""

    name: str
    grad_fn: Any
    output_nr: int
    leaf: Any

    @classmethod
    def of(cls, name: str, tensor: Any) -> Tensor_:
        fn = getattr(tensor, "grad_fn", None)
        leaf = tensor if fn is None and getattr(tensor, "requires_grad", False) else None
        return cls(name, fn, int(getattr(tensor, "output_nr", 0)) if fn is not None else 0, leaf)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    source: str  # "autograd", "module", "target", "manual"


def autograd_edges(recorded: Iterable[Tensor_], parameters: dict[int, str]) -> set[tuple[str, str]]:
    """Edges ``(src, dst)`` between recorded tensors (and parameters) along autograd paths.

    Args:
        recorded: recorded tensors; their ``grad_fn`` (and ``output_nr``) identify them in the autograd graph.
        parameters: ``id(parameter) -> name`` for leaves reached through ``AccumulateGrad``.
    """
    recorded = list(recorded)
    by_output: dict[tuple[int, int], list[str]] = {}  # names in capture order: one tensor may have several
    keep_alive: list[Any] = []
    leaf_names: dict[int, str] = dict(parameters)
    starts: list[tuple[str, Any]] = []
    for name, fn, output_nr, leaf in recorded:
        if fn is None:
            if leaf is not None:
                leaf_names.setdefault(id(leaf), name)
            continue
        keep_alive.append(fn)
        names = by_output.setdefault((id(fn), output_nr), [])
        if not names:  # the walk starts from a tensor's first name only: the others are the same tensor
            starts.append((name, fn))
        if name not in names:
            names.append(name)
    edges: set[tuple[str, str]] = set()
    for name, fn in starts:
        seen: dict[int, Any] = {}
        stack: list[tuple[Any, int]] = [pair for pair in fn.next_functions if pair[0] is not None]
        while stack:
            node, output_nr = stack.pop()
            found = by_output.get((id(node), output_nr))
            if found is not None:  # the nearest recorded tensor (the outermost of its names); its own name means an earlier iteration
                edges.add((found[-1], name))
                continue
            if id(node) in seen:
                continue
            seen[id(node)] = node
            variable = getattr(node, "variable", None)
            if variable is not None:  # AccumulateGrad: a leaf
                leaf = leaf_names.get(id(variable))
                if leaf is not None and leaf != name:
                    edges.add((leaf, name))
                continue
            stack.extend(pair for pair in node.next_functions if pair[0] is not None)
    del keep_alive
    return edges


def assemble(
    nodes: dict[str, dict[str, Any]],
    autograd: set[tuple[str, str]],
    module: set[tuple[str, str]],
    manual: set[tuple[str, str]],
    backward_loss: str | None,
    same: set[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """One step type's graph as stored in ``graph.json``: node names and ``[src, dst, source]`` edges.

    ``same`` edges join two names of one tensor (a block whose ``forward`` returns its last child's output:
    child -> block); they take the place of any other edge between the two.

    Also settles two kinds the walk cannot know: a target not connected to anything feeds the loss that was
    passed to backward; an intermediate tensor whose every consumer is a loss is an ``output`` (see
    :func:`_settle_outputs`). ``nodes`` is updated in place with those kinds.
    """
    edges: dict[tuple[str, str], str] = {}
    for pair in autograd:
        edges[pair] = "autograd"
    for pair in module:
        edges.setdefault(pair, "module")
    for src, dst in manual:
        if src in nodes and dst in nodes:
            edges[(src, dst)] = "manual"
    for pair in same or ():
        edges[pair] = "same"
    if backward_loss in nodes:
        has_out = {src for src, _ in edges}
        for name, attrs in nodes.items():
            if attrs.get("kind") == "target" and name not in has_out:
                edges[(name, backward_loss)] = "target"
    _settle_outputs(nodes, edges)
    ordered = topological_order(list(nodes), list(edges))
    return {
        "nodes": ordered,
        "edges": sorted([src, dst, source] for (src, dst), source in edges.items()),
    }


def _settle_outputs(nodes: dict[str, dict[str, Any]], edges: dict[tuple[str, str], str]) -> None:
    """Mark as ``output`` the intermediate tensors that only feed losses.

    A tensor recorded with ``record()`` (``explicit``) in between is looked through: the logits feeding a
    recorded ``per_sample_loss`` that feeds the loss are the output, and the per-sample loss keeps the kind
    the user gave it. An explicit tensor becomes the output only when no tensor before it does (a model
    without modules, whose logits are recorded by hand)."""
    successors: dict[str, set[str]] = {}
    predecessors: dict[str, set[str]] = {}
    for (src, dst), source in edges.items():
        if src != dst and source != "same":
            successors.setdefault(src, set()).add(dst)
            predecessors.setdefault(dst, set()).add(src)
    aliases: dict[str, set[str]] = {}  # names of one tensor
    for (src, dst), source in edges.items():
        if source == "same":
            aliases.setdefault(src, set()).add(dst)
            aliases.setdefault(dst, set()).add(src)

    def through(name: str) -> bool:
        return nodes.get(name, {}).get("kind") == "intermediate" and bool(nodes[name].get("explicit"))

    def feeds_only_losses(name: str) -> bool:
        seen, stack, found = {name}, list(successors.get(name, ())), False
        while stack:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            kind = nodes.get(d, {}).get("kind")
            if kind == "loss":
                found = True
            elif through(d):
                if not successors.get(d):
                    return False  # a recorded tensor that feeds nothing: not a loss's input only
                stack.extend(successors[d])
            else:
                return False
        return found

    candidates = {
        name for name, attrs in nodes.items() if attrs.get("kind") == "intermediate" and not attrs.get("kind_explicit") and feeds_only_losses(name)
    }
    for name in sorted(candidates):
        if nodes[name].get("explicit"):
            ancestors, stack = set(), list(predecessors.get(name, ()))
            while stack:
                a = stack.pop()
                if a not in ancestors:
                    ancestors.add(a)
                    stack.extend(predecessors.get(a, ()))
            if ancestors & candidates:
                continue
        nodes[name]["kind"] = "output"
        seen, stack = {name}, list(aliases.get(name, ()))
        while stack:  # the other names of the same tensor (the blocks that return it) are the output too
            other = stack.pop()
            if other not in seen:
                seen.add(other)
                if nodes.get(other, {}).get("kind") == "intermediate":
                    nodes[other]["kind"] = "output"
                stack.extend(aliases.get(other, ()))


def topological_order(names: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """Names ordered so that edges mostly point forward (Kahn's algorithm; cycles broken by first-seen order).

    >>> topological_order(["c", "b", "a"], [("a", "b"), ("b", "c")])
    ['a', 'b', 'c']
    """
    position = {name: i for i, name in enumerate(names)}
    indegree = {name: 0 for name in names}
    out: dict[str, list[str]] = {name: [] for name in names}
    for src, dst in edges:
        if src in position and dst in position and src != dst:
            out[src].append(dst)
            indegree[dst] += 1
    ready = sorted((n for n in names if indegree[n] == 0), key=position.__getitem__)
    order: list[str] = []
    placed: set[str] = set()
    import heapq

    heap = [(position[n], n) for n in ready]
    heapq.heapify(heap)
    while len(order) < len(names):
        if not heap:  # a cycle: release the earliest remaining node
            rest = min((n for n in names if n not in placed), key=position.__getitem__)
            heapq.heappush(heap, (position[rest], rest))
            indegree[rest] = 0
        _, name = heapq.heappop(heap)
        if name in placed:
            continue
        placed.add(name)
        order.append(name)
        for dst in out[name]:
            indegree[dst] -= 1
            if indegree[dst] == 0 and dst not in placed:
                heapq.heappush(heap, (position[dst], dst))
    return order
