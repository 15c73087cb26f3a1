"""The graph and sidecar reads of a run: :class:`SidecarReads`, the methods of
:class:`~comgra_callbacks.store.reader.Run` that read what is stored beside the recorded values.

The dependency graph (the union over step types, and per step type), the module tree, logged scalars,
circuit scores and measures (all rows of the one scalars array), and notes. They stand apart from the run's
index in :mod:`~comgra_callbacks.store.reader` (manifest, records, nodes, views, refresh) and from the
reads of recorded values in :mod:`~comgra_callbacks.store.data_reads`; ``Run`` inherits them, and they are
used only through it. ``Run.refresh`` drops the cached ones (``graph``, ``scalars``, ``notes``).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from comgra_callbacks.errors import NodeNotFoundError
from comgra_callbacks.store import format as fmt

if TYPE_CHECKING:
    from comgra_callbacks.errors import CorruptStoreError
    from comgra_callbacks.store.format import Manifest
    from comgra_callbacks.store.reader import Run
    from comgra_callbacks.store.storage import RunLocation


class SidecarReads:
    """The graph and sidecar reads; a mixin of :class:`~comgra_callbacks.store.reader.Run`, which provides the
    index and the validated, retrying array access they read through."""

    if TYPE_CHECKING:  # what the reads use of the run (defined by Run in store/reader.py)
        name: str
        location: RunLocation
        manifest: Manifest
        _graph_raw: dict[str, Any]

        @property
        def nodes(self) -> list[str]: ...
        def roles(self, node: str) -> list[str | None]: ...
        def _where(self, key: str) -> str: ...
        def _read(self, name: str, selection: Any) -> np.ndarray: ...
        def _corrupt_array(self, name: str, problem: str) -> CorruptStoreError: ...

    @cached_property
    def graph(self) -> Any:
        """The dependency graph (``networkx.DiGraph``), the union over step types.

        Node attributes: ``kind``, ``roles``, ``shape``, ``module``, ``dtype``, ``iterations``, ``step_types``.
        Edge attributes: ``source`` (``"autograd"``, ``"module"``, ``"target"`` or ``"manual"``), ``step_types``.
        """
        import networkx as nx

        graph = nx.DiGraph()
        for name, attrs in self._graph_raw.get("nodes", {}).items():
            graph.add_node(name, **attrs, step_types=[])
        for name in self.nodes:
            if name not in graph:
                graph.add_node(name, kind="intermediate", roles=self.roles(name), shape=None, module=None, step_types=[])
        for step_type, sub in self._graph_raw.get("graphs", {}).items():
            for name in sub.get("nodes", []):
                if name in graph and step_type not in graph.nodes[name]["step_types"]:
                    graph.nodes[name]["step_types"].append(step_type)
            for src, dst, source in sub.get("edges", []):
                if graph.has_edge(src, dst):
                    graph.edges[src, dst]["step_types"].append(step_type)
                else:
                    graph.add_edge(src, dst, source=source, step_types=[step_type])
        return graph

    def graph_for(self, step_type: str) -> Any:
        """The dependency graph as recorded for one step type."""
        graphs = self._graph_raw.get("graphs", {})
        if step_type not in graphs:
            raise NodeNotFoundError(f"Run {self.name!r} has no graph for step type {step_type!r}; it has {sorted(graphs)}.")
        keep = set(graphs[step_type].get("nodes", []))
        full = self.graph
        sub = full.subgraph(keep).copy()
        sub.remove_edges_from([(u, v) for u, v, d in sub.edges(data=True) if step_type not in d["step_types"]])
        return sub

    @property
    def modules(self) -> pd.DataFrame:
        """The module tree: one row per module (index: dotted name, ``""`` for the root) with ``type``,
        ``parent``, ``depth``, ``params`` (its own), ``params_total`` and ``trainable_total`` (with children)."""
        rows = fmt.check_modules(self.location.read_json(fmt.MODULES_FILE) or [], self._where(fmt.MODULES_FILE))
        frame = pd.DataFrame(rows, columns=["name", "type", "parent", "depth", "params", "params_total", "trainable_total"])
        return frame.set_index("name")

    @cached_property
    def scalars(self) -> pd.DataFrame:
        """Logged scalars in long format: columns step, name, value."""
        m = self.manifest
        if m.scalars_len == 0:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "name": pd.Series(dtype=object), "value": pd.Series(dtype="float64")})
        block = self.scalar_block()
        frame = pd.DataFrame(
            {"step": block[:, 0].astype(np.int64), "name": [m.scalar_names[int(i)] for i in block[:, 1]], "value": block[:, 2]}
        )
        return frame[~frame["name"].str.startswith((fmt.MEASURE_PREFIX, fmt.CIRCUIT_PREFIX))].reset_index(drop=True)

    @property
    def circuits(self) -> list[str]:
        """Names of the circuits tracked during training (``circuit_tracking=``), sorted."""
        return sorted({name[len(fmt.CIRCUIT_PREFIX):].split("/", 1)[0] for name in self.manifest.scalar_names if name.startswith(fmt.CIRCUIT_PREFIX)})

    def scalar_block(self) -> np.ndarray:
        """The committed rows of the scalars array (step, name id, value), checked; logged scalars, measures
        and circuit scores are all read from it."""
        m = self.manifest
        block = self._read(fmt.SCALARS, slice(0, m.scalars_len))
        problem = fmt.scalar_problem(block, m)
        if problem is not None:
            raise self._corrupt_array(fmt.SCALARS, problem)
        return block

    def circuit_scores(self, name: str | None = None) -> pd.DataFrame:
        """Attribution-patching scores of a circuit tracked during training (``circuit_tracking=``): columns
        step, node, unit, score, effect, one row per (step, node, unit), sorted by step, node, unit; the last
        value when a step was evaluated twice (a resumed run). ``name``: which circuit (None: the only one)."""
        from comgra_callbacks.store.scalars import circuit_scores

        return circuit_scores(cast("Run", self), name)

    @property
    def measures(self) -> pd.DataFrame:
        """Measures evaluated during training (``ComgraCallback(measures=...)``): one row per step they were
        evaluated at (index ``step``), one column per value (``test``, ``wnorm.total``, ...); the last value
        when a step was evaluated twice (a resumed run)."""
        from comgra_callbacks.store.scalars import measures

        return measures(cast("Run", self))

    @cached_property
    def notes(self) -> pd.DataFrame:
        """Notes recorded during training: columns step, time, text."""
        items = fmt.check_notes(self.location.read_json(fmt.NOTES_FILE) or [], self._where(fmt.NOTES_FILE))
        return pd.DataFrame(items, columns=["step", "time", "text"])
