"""The data reads of a run: :class:`DataReads`, the methods of :class:`~comgra_callbacks.store.reader.Run`
that read recorded values.

Each answers one question from the chunks it needs and no more: one node's statistics over training
(``stats``, ``node_stats``), every node's statistics at one step (``step_stats``, ``entry_stats``) or over a
range of records block by block (``stats_blocks``), one node's neurons or samples at one step (``neurons``,
``samples``). They stand apart from the run's index in :mod:`~comgra_callbacks.store.reader` (manifest,
records, nodes, views, graph, sidecars, refresh), on which they build, so that each module reads as one
concern; ``Run`` inherits them, and they are used only through it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from comgra_callbacks.errors import NodeNotFoundError, StepNotFoundError
from comgra_callbacks.store import format as fmt

if TYPE_CHECKING:
    from comgra_callbacks.errors import CorruptStoreError
    from comgra_callbacks.store.format import Manifest, SeriesKey

_NUMEL = fmt.STAT_INDEX["numel"]


class DataReads:
    """The reads of recorded values; a mixin of :class:`~comgra_callbacks.store.reader.Run`, which provides
    the index they select from and the validated, retrying array access they read through."""

    if TYPE_CHECKING:  # what the reads use of the run's index (defined by Run in store/reader.py)
        name: str
        manifest: Manifest

        @property
        def steps(self) -> pd.DataFrame: ...
        @property
        def nodes(self) -> list[str]: ...
        @property
        def _series_by_node(self) -> dict[str, list[tuple[int, SeriesKey]]]: ...
        def _read(self, name: str, selection: Any) -> np.ndarray: ...
        def _array(self, name: str) -> Any: ...
        def _corrupt_array(self, name: str, problem: str) -> CorruptStoreError: ...
        def views(self, node: str) -> list[str]: ...
        def _columns(self, node: str, view: str, role: str | None, iteration: int | None) -> list[tuple[int, int]]: ...
        def resolve_step_type(self, step_type: str | None, method: str = "stats") -> str | None: ...
        def _record_rows(self, step_type: str | None, method: str = "stats") -> np.ndarray: ...
        def record_of(self, step: int, *, step_type: str | None = None, method: str = "record_of") -> int: ...
        def _check_view(self, view: Any, method: str) -> str: ...
        @staticmethod
        def _step(step: Any, method: str, arg: str = "step") -> int: ...

    # ------------------------------------------------------------------------------- the data
    def stats(
        self,
        node: str,
        *,
        view: str = "value",
        role: str | None = None,
        iteration: int | None = None,
        step_type: str | None = None,
    ) -> pd.DataFrame:
        """Batch statistics of one node over training: a DataFrame indexed by step, one column per statistic.

        ``iteration=None`` takes, at each step, the last iteration recorded. Steps where the node was not
        recorded are left out. The column ``update_ratio`` (‖update‖ / ‖weight‖) appears for ``view="update"``.
        """
        cols = self._columns(node, view, role, iteration)
        rows = self._record_rows(step_type, "stats")
        names = list(fmt.STAT_NAMES) if view == "update" else [n for n in fmt.STAT_NAMES if n != "update_ratio"]
        if len(rows) == 0 or not cols:
            return pd.DataFrame(columns=names, index=pd.Index([], name="step", dtype="int64"), dtype="float32")
        stop = int(rows.max()) + 1
        best = np.full((stop, len(fmt.STAT_NAMES)), np.nan, dtype=np.float32)
        for _, col in cols:  # later iterations overwrite earlier ones where present
            block = self._read(fmt.STATS, (slice(0, stop), col, slice(None)))
            present = ~np.isnan(block[:, _NUMEL])
            best[present] = block[present]
        chosen = best[rows]
        keep = ~np.isnan(chosen[:, _NUMEL])
        frame = pd.DataFrame(chosen[keep], columns=list(fmt.STAT_NAMES)).astype("float32")
        frame.index = pd.Index(self.steps.loc[rows[keep], "step"].to_numpy(), name="step")
        frame.attrs.update(node=node, view=view, role=role, run=self.name)
        return frame[names]

    def _entry_column(self, node: str, record: int, view: str, role: str | None, iteration: int | None) -> tuple[int, np.ndarray]:
        """The column of the entry (the last iteration present) and its statistics row."""
        cols = self._columns(node, view, role, iteration)
        rows = self._read(fmt.STATS, (record, [c for _, c in cols], slice(None))) if cols else np.empty((0, len(fmt.STAT_NAMES)))
        present = [(c, row) for (_, c), row in zip(cols, rows) if not math.isnan(float(row[_NUMEL]))]
        if not present:
            step = int(self.steps.at[record, "step"]) if record in self.steps.index else record
            raise StepNotFoundError(f"Node {node!r} (view {view!r}) was not recorded at step {step} of run {self.name!r}.")
        return present[-1]

    def _check_not_lost(self, name: str, values: np.ndarray, stats: np.ndarray, node: str, step: int) -> None:
        """Values that are all NaN where the statistics counted no NaN come from a deleted chunk (zarr reads a
        missing chunk as its fill value, NaN), not from the training."""
        clean = stats[fmt.STAT_INDEX["nan_count"]] == 0 and stats[fmt.STAT_INDEX["inf_count"]] == 0
        if values.size and clean and np.isnan(values).all():
            raise self._corrupt_array(name, f"has no data for node {node!r} at step {step} (a chunk was deleted): its statistics count no NaN, but every value reads as NaN.")

    def neurons(
        self,
        node: str,
        step: int,
        *,
        view: str = "value",
        role: str | None = None,
        iteration: int | None = None,
        step_type: str | None = None,
    ) -> pd.DataFrame:
        """Per-neuron statistics at one step: one row per neuron, columns mean, std, abs_mean, l2
        (NaN in stores written before per-neuron l2).

        For activations a neuron is a feature of the last dimension, with statistics over every other axis
        (the batch, positions); for parameters it is an output unit (the first axis).
        """
        record = self.record_of(step, step_type=step_type, method="neurons")
        col, row = self._entry_column(node, record, view, role, iteration)
        offset, width = (int(v) for v in self._read(fmt.NEURONS_PTR, (record, col, slice(None))))
        if offset == -1:
            raise StepNotFoundError(f"Node {node!r} has no per-neuron statistics at step {step} (detail was lower).")
        stored = self.manifest.neuron_stat_names  # older stores lack l2: it reads as NaN
        n = len(stored)
        if offset < 0 or width < 0 or offset + n * width > self.manifest.neurons_len:
            raise self._corrupt_array(
                fmt.NEURONS_PTR, f"points node {node!r} at step {step} to (offset {offset}, width {width}); expected an offset >= 0 "
                f"and offset + {n} * width <= {self.manifest.neurons_len} (\"neurons_len\" in {fmt.MANIFEST_FILE}).",
            )
        flat = self._read(fmt.NEURONS, slice(offset, offset + n * width))
        self._check_not_lost(fmt.NEURONS, flat[:width], row, node, step)
        frame = pd.DataFrame(flat.reshape(n, width).T.astype("float32"), columns=list(stored))
        frame = frame.reindex(columns=list(fmt.NEURON_STAT_NAMES)).astype("float32")
        frame.index.name = "neuron"
        return frame

    def samples(
        self,
        node: str,
        step: int,
        *,
        view: str = "value",
        role: str | None = None,
        iteration: int | None = None,
        step_type: str | None = None,
    ) -> np.ndarray:
        """The recorded individual samples at one step; first axis = sample (the full tensor for a
        parameter recorded in full). Integer tensors come back with an integer dtype."""
        record = self.record_of(step, step_type=step_type, method="samples")
        col, row = self._entry_column(node, record, view, role, iteration)
        offset, shape_id = (int(v) for v in self._read(fmt.SAMPLES_PTR, (record, col, slice(None))))
        if offset == -1:
            raise StepNotFoundError(f"Node {node!r} has no samples at step {step} (detail was lower).")
        shapes = self.manifest.shapes
        if offset < 0 or not 0 <= shape_id < len(shapes):
            raise self._corrupt_array(
                fmt.SAMPLES_PTR, f"points node {node!r} at step {step} to (offset {offset}, shape id {shape_id}); expected an offset >= 0 "
                f"and 0 <= shape id < {len(shapes)} (the length of \"shapes\" in {fmt.MANIFEST_FILE}).",
            )
        shape = tuple(shapes[shape_id])
        size = math.prod(shape)
        if offset + size > self.manifest.samples_len:
            raise self._corrupt_array(
                fmt.SAMPLES_PTR, f"points node {node!r} at step {step} to {size} values from offset {offset}, past the end "
                f"({self.manifest.samples_len}, \"samples_len\" in {fmt.MANIFEST_FILE}).",
            )
        values = self._read(fmt.SAMPLES, slice(offset, offset + size)).reshape(shape)
        self._check_not_lost(fmt.SAMPLES, values, row, node, step)
        dtype = self.manifest.dtypes[col] if col < len(self.manifest.dtypes) else "float32"
        if dtype.startswith(("int", "uint")) or dtype == "bool":
            return np.rint(values).astype(np.int64 if dtype != "bool" else np.bool_)
        return values

    def step_stats(self, step: int, *, view: str = "value", step_type: str | None = None) -> pd.DataFrame:
        """Statistics of every node at one step (last iteration, default role): one row per node.

        ``step_type=None``: see :meth:`resolve_step_type`. Raises NodeNotFoundError for a view the run does
        not have (the message lists those it has)."""
        view = self._check_view(view, "step_stats")
        record = self.record_of(step, step_type=step_type, method="step_stats")
        block = self._read(fmt.STATS, (record, slice(None), slice(None)))
        rows: dict[str, np.ndarray] = {}
        for node in self.nodes:
            try:
                cols = [col for _, col in self._columns(node, view, None, None)]
            except NodeNotFoundError:
                continue
            row = _last_present(block, cols)
            if row is not None:
                rows[node] = row
        return _stats_frame(rows, "node")

    # ----------------------------------------------------- added for the dashboard (issue 4)
    # Reads that the dashboard needs on every selector change, each bounded to a chunk or a slab.

    def entry_stats(
        self,
        node: str,
        step: int,
        *,
        role: str | None = None,
        iteration: int | None = None,
        step_type: str | None = None,
    ) -> pd.DataFrame:
        """Batch statistics of every view of one node at one step: one row per view (index: view).

        Reads one row of ``stats`` (the chunks holding the node's columns), never the node's history.
        ``iteration=None`` takes the last iteration recorded at that step. Views not recorded at that
        step are left out.
        """
        record = self.record_of(step, step_type=step_type, method="entry_stats")
        picked: dict[str, list[int]] = {}
        for view in self.views(node):
            picked[view] = [col for _, col in self._columns(node, view, role, iteration)]
        wanted = sorted({col for cols in picked.values() for col in cols})
        rows: dict[str, np.ndarray] = {}
        if wanted:
            lo, hi = wanted[0], wanted[-1] + 1
            block = self._read(fmt.STATS, (record, slice(lo, hi), slice(None)))
            for view, cols in picked.items():
                row = _last_present(block, cols, lo)
                if row is not None:
                    rows[view] = row
        return _stats_frame(rows, "view")

    def node_stats(
        self,
        node: str,
        *,
        role: str | None = None,
        iteration: int | None = None,
        step_type: str | None = None,
    ) -> dict[str, pd.DataFrame]:
        """Batch statistics of every view of one node over training: ``{view: frame}``, each frame exactly
        what :meth:`stats` returns for that view.

        A node's columns sit next to each other in the store, so one pass over the rows reads all its views
        (value, gradients, update) for the cost of one; :meth:`stats` would read the same chunks once per view.
        """
        views = self.views(node)
        picked = {view: self._columns(node, view, role, iteration) for view in views}
        wanted = sorted(col for cols in picked.values() for _, col in cols)
        rows = self._record_rows(step_type, "node_stats")
        if len(rows) == 0 or not wanted or wanted[-1] - wanted[0] >= 4 * len(wanted):
            return {view: self.stats(node, view=view, role=role, iteration=iteration, step_type=step_type) for view in views}
        lo, hi, stop = wanted[0], wanted[-1] + 1, int(rows.max()) + 1
        block = self._read(fmt.STATS, (slice(0, stop), slice(lo, hi), slice(None)))  # (records, columns, stats)
        steps = self.steps.loc[rows, "step"].to_numpy()
        out: dict[str, pd.DataFrame] = {}
        for view, cols in picked.items():
            names = list(fmt.STAT_NAMES) if view == "update" else [n for n in fmt.STAT_NAMES if n != "update_ratio"]
            best = np.full((stop, len(fmt.STAT_NAMES)), np.nan, dtype=np.float32)
            for _, col in cols:  # later iterations overwrite earlier ones where present
                part = block[:, col - lo, :]
                present = ~np.isnan(part[:, _NUMEL])
                best[present] = part[present]
            chosen = best[rows]
            keep = ~np.isnan(chosen[:, _NUMEL])
            frame = pd.DataFrame(chosen[keep], columns=list(fmt.STAT_NAMES)).astype("float32")
            frame.index = pd.Index(steps[keep], name="step")
            frame.attrs.update(node=node, view=view, role=role, run=self.name)
            out[view] = frame[names]
        return out

    def stats_blocks(
        self,
        first_step: int | None = None,
        last_step: int | None = None,
        *,
        view: str = "value",
        step_type: str | None = None,
    ) -> tuple[list[str], Iterator[tuple[np.ndarray, np.ndarray]]]:
        """The batch statistics of every node at every record with ``first_step <= step <= last_step`` (of
        ``step_type``; ``None`` leaves a side open), block by block: what comparisons and correlations over
        many records read (``comgra_callbacks.analysis``).

        Returns ``(nodes, blocks)``: the nodes that have ``view``, and an iterator of ``(records, values)`` (record
        numbers, the index of :attr:`steps`) with
        ``values`` of shape ``(records, len(nodes), len(STAT_NAMES))`` (float32, NaN where a node was not
        recorded). The default role and, per record, the last iteration of each node are used. The rows
        between the first and the last matching record are read once, one block of rows at a time, so memory
        stays bounded by a block; a range without records yields no block.

        Raises:
            NodeNotFoundError: the run has no view ``view`` (the message lists those it has).
        """
        first_step = None if first_step is None else self._step(first_step, "stats_blocks", "first_step")
        last_step = None if last_step is None else self._step(last_step, "stats_blocks", "last_step")
        step_type = self.resolve_step_type(step_type, "stats_blocks")
        rows = self._record_rows(step_type, "stats_blocks")
        steps = self.steps.loc[rows, "step"].to_numpy() if len(rows) else np.array([], dtype=np.int64)
        lo = -np.inf if first_step is None else int(first_step)
        hi = np.inf if last_step is None else int(last_step)
        chosen = rows[(steps >= lo) & (steps <= hi)]
        view = self._check_view(view, "stats_blocks")
        nodes: list[str] = []
        columns: list[list[int]] = []
        for node in self.nodes:
            if node in self._series_by_node and view in self.views(node):
                nodes.append(node)
                columns.append([col for _, col in self._columns(node, view, None, None)])
        return nodes, self._blocks(chosen, columns)

    def _blocks(self, chosen: np.ndarray, columns: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if len(chosen) == 0:
            return
        single = [i for i, cols in enumerate(columns) if len(cols) == 1]
        single_cols = [columns[i][0] for i in single]
        r0, r1 = int(chosen.min()), int(chosen.max()) + 1
        wanted = np.zeros(r1 - r0, dtype=bool)
        wanted[chosen - r0] = True
        block_rows = int(self._array(fmt.STATS).chunks[0])
        start = r0
        while start < r1:
            stop = min(r1, (start // block_rows + 1) * block_rows)
            keep = wanted[start - r0 : stop - r0]
            if keep.any():
                slab = self._read(fmt.STATS, (slice(start, stop), slice(None), slice(None)))[keep]
                out = np.full((len(slab), len(columns), len(fmt.STAT_NAMES)), np.nan, dtype=np.float32)
                if single:
                    out[:, single, :] = slab[:, single_cols, :]
                for i, cols in enumerate(columns):
                    if len(cols) == 1:
                        continue
                    for col in cols:  # later iterations overwrite earlier ones where present
                        present = ~np.isnan(slab[:, col, _NUMEL])
                        out[present, i] = slab[present, col]
                yield np.arange(start, stop)[keep], out
            start = stop


def _stats_frame(rows: dict[str, np.ndarray], index: str) -> pd.DataFrame:
    """One row of batch statistics (float32) per key, the index named ``index``."""
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(fmt.STAT_NAMES)).astype("float32")
    frame.index.name = index
    return frame


def _last_present(block: np.ndarray, cols: list[int], first: int = 0) -> np.ndarray | None:
    """The statistics row of the last column in ``cols`` (the last iteration) that holds a record;
    ``block`` holds the columns from ``first`` on."""
    for col in reversed(cols):
        if 0 <= col - first < len(block) and not math.isnan(float(block[col - first, _NUMEL])):
            return block[col - first]
    return None
