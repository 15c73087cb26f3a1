"""Read runs back: :func:`open_run`, :func:`open_runs` and :class:`Run`.

A :class:`Run` loads its small index once (which steps were recorded, of which type) and then reads only
the chunks a question needs: one node's statistics over training, or one node's neurons or samples at one
step. It trusts ``manifest.json`` alone, so a run that is still being written (or was killed) reads
consistently; :meth:`Run.refresh` picks up new records.

This module holds the index: the manifest, the records and steps, nodes, views and roles, refreshing, and
the validated array access with its retries. The reads of recorded values (``stats``, ``neurons``,
``samples``, ``stats_blocks``, ...) are in :mod:`~comgra_callbacks.store.data_reads`, the graph and the
sidecars (modules, scalars, circuit scores, measures, notes) in :mod:`~comgra_callbacks.store.sidecar_reads`;
``Run`` inherits both.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from comgra_callbacks.errors import (
    ComgraError,
    ConfigError,
    ConfigTypeError,
    CorruptStoreError,
    NodeNotFoundError,
    RunNotFoundError,
    StepNotFoundError,
)
from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.data_reads import DataReads
from comgra_callbacks.store.format import Manifest, SeriesKey
from comgra_callbacks.store.sidecar_reads import SidecarReads
from comgra_callbacks.store.storage import RunLocation, open_root, split_run_uri

T = TypeVar("T")
_RETRIES = 6
ATTRIBUTION_VIEWS = "attribution:"  # views of the per-sample factors: not listed by Run.views
TRAIN = "train"  # the training step type: the default when a run has several step types

# dtype, number of dimensions and the manifest field that bounds the first axis, per array.
_ARRAYS: dict[str, tuple[str, int, str]] = {
    fmt.RECORDS: ("int64", 2, "rows"),
    fmt.RECORD_TIME: ("float64", 1, "rows"),
    fmt.STATS: ("float32", 3, "rows"),
    fmt.NEURONS_PTR: ("int64", 3, "rows"),
    fmt.SAMPLES_PTR: ("int64", 3, "rows"),
    fmt.NEURONS: ("float32", 1, "neurons_len"),
    fmt.SAMPLES: ("float32", 1, "samples_len"),
    fmt.SCALARS: ("float64", 2, "scalars_len"),
}


def _retry(read: Callable[[], T], refresh: Callable[[], None]) -> T:
    """Run a read; on an error (a chunk replaced under our feet) reopen and try again."""
    for attempt in range(_RETRIES):
        try:
            return read()
        except ComgraError:
            raise  # our own verdicts (a damaged file, a missing node) do not change on a retry
        except (KeyError, IndexError) as exc:
            error: Exception = exc
        except Exception as exc:
            error = exc
        if attempt == _RETRIES - 1:
            raise error
        time.sleep(0.02 * (attempt + 1))
        refresh()
    raise AssertionError("unreachable")


class Run(DataReads, SidecarReads):
    """One recorded training run.

    Attributes:
        name: the run's name (its group name under the root).
        uri: its path or URL.
        meta: run metadata (``meta.json``): status, versions, configuration, hyper-parameters.

    Use :func:`open_run` rather than the constructor.

    Step types: every read method that takes ``step_type`` reads records of one step type only. With
    ``step_type=None`` it uses the run's only step type, or ``"train"`` when the run has several and one of
    them is ``"train"``; otherwise it raises a ``ConfigError`` listing the step types (see
    :meth:`resolve_step_type`). Steps must be ints (``step=1.7`` raises ``ConfigTypeError``).

    Damaged runs: whatever is read is validated first (JSON types, array dtypes and shapes, codes, offsets);
    a run that fails raises :class:`~comgra_callbacks.errors.CorruptStoreError` naming the run and the file,
    and no data is returned from it.
    """

    def __init__(self, location: RunLocation) -> None:
        self.location = location
        self.name = location.name
        self.uri = location.uri
        self._arrays: dict[str, Any] = {}
        self._store: Any = None
        self._blocks_checked = 0  # row blocks of `stats` whose chunks were checked (see _check_chunks)
        self._pointers_seen: set[str] = set()
        self.refresh(force=True)
        self.name = str(self.meta.get("run_name") or location.name)  # "exp/rank0" for a rank's run group

    def __repr__(self) -> str:
        return f"Run({self.name!r}, status={self.status!r}, records={len(self.steps)}, nodes={len(self.nodes)})"

    # --------------------------------------------------------------------------------- loading
    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the manifest and sidecars; True when there are new records (or anything changed)."""
        meta = self.location.read_json(fmt.META_FILE)
        if meta is None:
            path = getattr(self.location, "path", None)
            if path is not None and os.path.isfile(path):
                raise RunNotFoundError(
                    f"`open_run`: expected the directory of a run, got {self.uri!r}, which is a file. "
                    f"HINT: pass the run's directory (the one holding {fmt.META_FILE})."
                )
            raise RunNotFoundError(f"no comgra run at {self.uri!r}: it has no {fmt.META_FILE}.")
        if not isinstance(meta, dict):
            raise self.location.corrupt(fmt.META_FILE, f"holds {type(meta).__name__} {fmt._short(meta)}; expected a JSON object.")
        if meta.get("format") != fmt.FORMAT_NAME:
            raise RunNotFoundError(f"{self.uri!r} is not a comgra_callbacks run (its {fmt.META_FILE} says format={meta.get('format')!r}).")
        fmt.check_version(meta.get("format_version"), f"the run at {self.uri!r}")
        raw = self.location.read_json(fmt.MANIFEST_FILE)
        if raw is None:
            raise self.location.corrupt(fmt.MANIFEST_FILE, "is missing; a run without it cannot be read.", "the writer may have died before its first commit: delete the run.")
        if isinstance(raw, dict):
            fmt.check_version(raw.get("format_version"), f"the run at {self.uri!r}")
        manifest = Manifest.from_json(raw, self._where(fmt.MANIFEST_FILE))
        if len(manifest.dtypes) > len(manifest.series):
            raise self.location.corrupt(fmt.MANIFEST_FILE, f"lists {len(manifest.dtypes)} dtypes for {len(manifest.series)} series; expected at most one per series.")
        old = getattr(self, "manifest", None)
        changed = force or old is None or manifest.rows != old.rows or len(manifest.series) != len(old.series)
        self.meta: dict[str, Any] = meta
        self.manifest = manifest
        self.neuron_stat_names = list(manifest.neuron_stat_names)  # a store from before per-neuron l2 has three
        if changed:
            self._arrays.clear()
            graph_raw = fmt.check_graph(self.location.read_json(fmt.GRAPH_FILE) or {}, self._where(fmt.GRAPH_FILE))
            self._graph_raw: dict[str, Any] = graph_raw
            for attr in ("steps", "records", "graph", "nodes", "_series_by_node", "_rows_by_step", "scalars", "notes"):
                self.__dict__.pop(attr, None)
        return changed or (old is not None and old.heartbeat != manifest.heartbeat and meta.get("status") != "running")

    def _where(self, key: str) -> str:
        return f"run {self.name!r} ({self.uri}): its file {key!r}"

    def _corrupt_array(self, name: str, problem: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"run {self.name!r} ({self.uri}): its array {name!r} {problem} HINT: the run is damaged; "
            f"restore it from a backup, or delete it."
        )

    def _array(self, name: str) -> Any:
        array = self._arrays.get(name)
        if array is None:
            import zarr

            if self._store is None:
                self._store = self.location.zarr_store(read_only=True)
            try:
                array = zarr.open_array(self._store, path=name, mode="r", zarr_format=3)
            except ComgraError:
                raise
            except FileNotFoundError:
                raise self._corrupt_array(name, "is missing (no zarr.json).") from None
            except Exception as exc:
                raise self._corrupt_array(name, f"cannot be opened: {type(exc).__name__}: {fmt._short(str(exc), 200)}.") from None
            self._check_array(name, array)
            self._arrays[name] = array
        return array

    def _check_array(self, name: str, array: Any) -> None:
        """The array's dtype and shape must be what the format says and hold what the manifest promises."""
        dtype, ndim, length_field = _ARRAYS[name]
        shape = tuple(int(n) for n in array.shape)
        if str(array.dtype) != dtype or len(shape) != ndim:
            raise self._corrupt_array(name, f"has dtype {str(array.dtype)!r} and shape {shape}; expected dtype {dtype!r} with {ndim} dimensions.")
        m = self.manifest
        want = [getattr(m, length_field)]
        if ndim == 3:
            want += [len(m.series), len(fmt.STAT_NAMES) if name == fmt.STATS else 2]
        elif name == fmt.RECORDS:
            want.append(len(fmt.RECORD_COLUMNS))
        elif name == fmt.SCALARS:
            want.append(3)
        short = [i for i, (have, need) in enumerate(zip(shape, want)) if have < need or (i == ndim - 1 and ndim > 1 and have != need)]
        if short:
            raise self._corrupt_array(name, f"has shape {shape} but {fmt.MANIFEST_FILE} promises {tuple(want)}.")

    def _read(self, name: str, selection: Any) -> np.ndarray:
        def read() -> np.ndarray:
            return np.asarray(self._array(name)[selection])

        def reopen() -> None:
            self._arrays.pop(name, None)

        try:
            return _retry(read, reopen)
        except ComgraError:
            raise
        except MemoryError:
            raise self._corrupt_array(name, "decodes to more data than fits in memory.") from None
        except Exception as exc:
            raise self._corrupt_array(name, f"cannot be read: {type(exc).__name__}: {fmt._short(str(exc), 200)}.") from None

    # ---------------------------------------------------------------------------------- index
    @property
    def status(self) -> str:
        """``"running"``, ``"finished"`` or ``"failed"`` (a killed run stays ``"running"``; see ``heartbeat``)."""
        return str(self.meta.get("status", "running"))

    @property
    def heartbeat(self) -> float:
        """Time (seconds since the epoch) of the last commit by the writer."""
        return self.manifest.heartbeat

    @cached_property
    def records(self) -> pd.DataFrame:
        """Every committed record, including ones superseded by a resume (column ``superseded``)."""
        m = self.manifest
        columns = list(fmt.RECORD_COLUMNS) + ["time", "superseded"]
        if m.rows == 0:
            frame = pd.DataFrame({c: pd.Series(dtype="int64") for c in columns})
            frame["step_type"] = frame["step_type"].astype(object)
            frame["reason"] = frame["reason"].astype(object)
            frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
            frame["superseded"] = frame["superseded"].astype(bool)
            frame.index.name = "record"
            return frame
        rec = self._read(fmt.RECORDS, slice(0, m.rows))
        times = self._read(fmt.RECORD_TIME, slice(0, m.rows))
        problem = fmt.record_problem(rec, times, m)
        if problem is not None:
            raise self._corrupt_array(*problem)
        self._check_chunks()
        frame = pd.DataFrame(rec, columns=list(fmt.RECORD_COLUMNS))
        frame["step_type"] = [m.step_types[i] for i in frame["step_type"]]
        frame["reason"] = [m.reasons[i] for i in frame["reason"]]
        frame["time"] = pd.to_datetime(times, unit="s", utc=True)
        superseded = np.zeros(m.rows, dtype=bool)
        for seg in m.segments[1:]:
            superseded |= (frame["segment"].to_numpy() < seg["segment"]) & (frame["step"].to_numpy() >= seg["start_step"])
        frame["superseded"] = superseded
        frame.index.name = "record"
        return frame

    def _chunk_keys(self, prefix: str) -> set[tuple[int, ...]]:
        """The stored chunk keys under ``prefix`` (e.g. ``stats/c/3/``) as tuples of the grid positions after it."""
        from zarr.core.sync import sync

        async def collect() -> list[str]:
            return [key async for key in self._store.list_prefix(prefix)]

        found = set()
        for key in sync(collect()):
            parts = key[len(prefix) :].split("/")
            if all(p.isdigit() for p in parts):
                found.add(tuple(int(p) for p in parts))
        return found

    def _has_chunks(self, name: str) -> bool:
        from zarr.core.sync import sync

        async def first() -> bool:
            async for _ in self._store.list_prefix(f"{name}/c/"):  # files, not the directories left behind
                return True
            return False

        return bool(sync(first()))

    def _check_chunks(self) -> None:
        """Catch chunks deleted from ``stats``: zarr reads a missing chunk as "nothing recorded", which would
        silently empty the plots. Empty chunks are never written, so a missing ``stats`` chunk is legitimate
        only when its rows hold nothing; but every record holds at least one series, and a stored pointer
        chunk means the same cells of ``stats`` hold data. Row blocks are listed one at a time, once each
        (the last one again when it grows), so a live run costs one small listing per new block."""
        m = self.manifest
        if m.rows == 0 or not m.series:
            return
        stats = self._array(fmt.STATS)
        if getattr(stats, "shards", None):
            return  # shards are stored per shard; the grid below is per chunk
        rows_per_chunk = int(stats.chunks[0])
        row_blocks = math.ceil(m.rows / rows_per_chunk)
        try:
            for name, length in ((fmt.NEURONS_PTR, m.neurons_len), (fmt.SAMPLES_PTR, m.samples_len)):
                if length and name not in self._pointers_seen:
                    if not self._has_chunks(name):
                        raise self._corrupt_array(name, f"has no chunk at all, but {fmt.MANIFEST_FILE} says {length} values are stored behind it (its chunks were deleted).")
                    self._pointers_seen.add(name)
            for block in range(max(self._blocks_checked - 1, 0), row_blocks):
                have = {key[0] for key in self._chunk_keys(f"{fmt.STATS}/c/{block}/")}
                first, last = block * rows_per_chunk, min(m.rows, (block + 1) * rows_per_chunk) - 1
                if not have:
                    raise self._corrupt_array(fmt.STATS, f"has no chunk for records {first}..{last}, but every record holds data (the chunk was deleted).")
                pointers = {key[0] for name in (fmt.NEURONS_PTR, fmt.SAMPLES_PTR) for key in self._chunk_keys(f"{name}/c/{block}/")}
                missing = sorted(pointers - have)
                if missing:
                    raise self._corrupt_array(fmt.STATS, f"has no chunk {(block, missing[0], 0)}, but the pointer arrays say records {first}..{last} hold data there (the chunk was deleted).")
        except ComgraError:
            raise
        except Exception:  # a store that cannot list: nothing to compare
            return
        self._blocks_checked = row_blocks

    @cached_property
    def steps(self) -> pd.DataFrame:
        """One row per record (index: record number): step, step_type, epoch, batch_idx, time, reason."""
        frame = self.records[~self.records["superseded"]]
        return frame[["step", "step_type", "epoch", "batch_idx", "time", "reason"]]

    @property
    def step_types(self) -> list[str]:
        """The step types that have records, in order of first appearance."""
        return list(dict.fromkeys(self.steps["step_type"]))

    @cached_property
    def _rows_by_step(self) -> dict[int, list[int]]:
        rows: dict[int, list[int]] = {}
        for record, step in zip(self.steps.index, self.steps["step"]):
            rows.setdefault(int(step), []).append(int(record))
        return rows

    # ----------------------------------------------------------------------------------- graph
    @cached_property
    def _series_by_node(self) -> dict[str, list[tuple[int, SeriesKey]]]:
        out: dict[str, list[tuple[int, SeriesKey]]] = {}
        for i, key in enumerate(self.manifest.series):
            out.setdefault(key.node, []).append((i, key))
        return out

    @cached_property
    def nodes(self) -> list[str]:
        """Names of all nodes, in graph order where known, then in order of first record."""
        names = list(self._graph_raw.get("nodes", {}))
        seen = set(names)
        names += [n for n in self._series_by_node if n not in seen]
        return names

    # ------------------------------------------------------------------------ series selection
    def roles(self, node: str) -> list[str | None]:
        """The roles of a node, in order of first appearance (``[None]`` for a node without roles)."""
        return list(dict.fromkeys(key.role for _, key in self._node_series(node)))

    def views(self, node: str) -> list[str]:
        """The views recorded for a node, in the order value, grad, grad:<loss> (by loss), update."""
        found = {view for view in self._all_views(node) if not view.startswith(ATTRIBUTION_VIEWS)}
        rank = {"value": (0, ""), "grad": (1, ""), "update": (3, "")}
        return sorted(found, key=lambda view: rank.get(view, (2, view)))

    def _all_views(self, node: str) -> set[str]:
        """Every view of a node, the attribution factors (``attribution:*``, read by :meth:`attribution`) included."""
        return {key.view for _, key in self._node_series(node)}

    def iterations(self, node: str) -> list[int]:
        """The iteration numbers recorded for a node (more than one when it ran several times in a step)."""
        return sorted({key.iteration for _, key in self._node_series(node)})

    def _node_series(self, node: str) -> list[tuple[int, SeriesKey]]:
        series = self._series_by_node.get(node)
        if series is None:
            if node in self.nodes:
                raise NodeNotFoundError(f"Node {node!r} of run {self.name!r} is in the graph but has no recorded data yet.")
            close = difflib.get_close_matches(str(node), self.nodes, n=3)
            hint = f" Did you mean {close}?" if close else f" It has {len(self.nodes)} nodes, e.g. {self.nodes[:5]}."
            raise NodeNotFoundError(f"Run {self.name!r} has no node {node!r}.{hint}")
        return series

    def _columns(self, node: str, view: str, role: str | None, iteration: int | None) -> list[tuple[int, int]]:
        """(iteration, column) pairs matching the selection, iteration ascending."""
        series = self._node_series(node)
        views = self.views(node) if not view.startswith(ATTRIBUTION_VIEWS) else sorted(self._all_views(node))
        if view not in views:
            raise NodeNotFoundError(f"`view`: node {node!r} of run {self.name!r} has no view {view!r}; it has {views}.")
        roles = self.roles(node)
        if role is None:
            role = roles[0]
        elif role not in roles:
            raise NodeNotFoundError(f"`role`: node {node!r} of run {self.name!r} has no role {role!r}; it has {roles}.")
        cols = sorted((key.iteration, i) for i, key in series if key.view == view and key.role == role)
        if iteration is not None:
            cols = [(it, i) for it, i in cols if it == iteration]
            if not cols:
                its = self.iterations(node)
                raise NodeNotFoundError(f"`iteration`: node {node!r} has no iteration {iteration} for view {view!r}; it has {its}.")
        return cols

    def resolve_step_type(self, step_type: str | None, method: str = "stats") -> str | None:
        """The step type a read method uses: ``step_type`` itself when given; for ``None``, the run's only
        step type, or ``"train"`` when the run has several and one of them is ``"train"``. Step types are
        never mixed silently (train and validation records at the same steps would zigzag in a plot).

        Raises:
            ConfigError: ``step_type=None`` on a run with several step types, none of them ``"train"``.
        """
        if step_type is not None:
            if not isinstance(step_type, str):
                raise ConfigTypeError(f"`Run.{method}(step_type=...)`: expected a step type name or None, got {step_type!r} of type {type(step_type).__name__}.")
            return step_type
        types = self.step_types
        if len(types) <= 1:
            return types[0] if types else None
        if TRAIN in types:
            return TRAIN
        raise ConfigError(
            f"`Run.{method}(step_type=None)`: run {self.name!r} has records of several step types {types} and none of "
            f"them is {TRAIN!r}, so there is no default; expected one of {types}. HINT: pass step_type={types[0]!r}."
        )

    @staticmethod
    def _step(step: Any, method: str, arg: str = "step") -> int:
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise ConfigTypeError(f"`Run.{method}({arg}=...)`: expected an int (a trainer step), got {step!r} of type {type(step).__name__}.")
        return int(step)

    def _check_view(self, view: Any, method: str) -> str:
        views = sorted({key.view for key in self.manifest.series if not key.view.startswith(ATTRIBUTION_VIEWS)})
        if view not in views:
            raise NodeNotFoundError(f"`Run.{method}(view=...)`: run {self.name!r} has no view {view!r}; it has {views}.")
        return str(view)

    def _record_rows(self, step_type: str | None, method: str = "stats") -> np.ndarray:
        steps = self.steps
        step_type = self.resolve_step_type(step_type, method)
        if step_type is not None:
            if step_type not in set(steps["step_type"]):
                raise StepNotFoundError(f"`step_type`: run {self.name!r} has no records of step type {step_type!r}; it has {self.step_types}.")
            steps = steps[steps["step_type"] == step_type]
        return steps.index.to_numpy()

    def record_of(self, step: int, *, step_type: str | None = None, method: str = "record_of") -> int:
        """The record number of ``step`` (of ``step_type``; for ``None`` see :meth:`resolve_step_type`);
        raises when ambiguous or missing."""
        step = self._step(step, method)
        step_type = self.resolve_step_type(step_type, method)
        every = self._rows_by_step.get(step, [])
        rows = every
        if step_type is not None:
            rows = [r for r in rows if self.steps.at[r, "step_type"] == step_type]
        if not rows:
            known = self.steps["step"].to_numpy()
            if step_type is not None:
                known = self.steps.loc[self.steps["step_type"] == step_type, "step"].to_numpy()
            near = known[np.argsort(np.abs(known - step))[:3]].tolist() if len(known) else []
            what = f" of step type {step_type!r}" if step_type else ""
            others = sorted({str(self.steps.at[r, "step_type"]) for r in every})
            hint = f" HINT: step {step} has records of step type {others}: pass step_type={others[0]!r}." if others else ""
            raise StepNotFoundError(f"Run {self.name!r} has no record of step {step}{what}. Nearest recorded steps: {sorted(set(near))}.{hint}")
        if len(rows) > 1:
            types = [str(self.steps.at[r, "step_type"]) for r in rows]
            if len(set(types)) > 1:
                raise StepNotFoundError(
                    f"Step {step} of run {self.name!r} has records of several step types {types}. HINT: pass step_type=."
                )
        return rows[-1]

    # -------------------------------------------------------------------- series and attribution
    def neuron_series(
        self,
        node: str,
        *,
        view: str = "update",
        statistic: str = "l2",
        role: str | None = None,
        iteration: int | None = None,
        step_type: str | None = None,
    ) -> pd.DataFrame:
        """One per-neuron statistic of a node over training: a steps x neurons DataFrame (index ``step``,
        columns the neuron numbers), read at once rather than step by step.

        ``statistic``: one of the stored per-neuron statistics (``run.neuron_stat_names``) or ``"l2"``, the
        Euclidean norm of each neuron's values (of a weight's row for a parameter), stored or derived from the
        mean and the standard deviation. Steps without per-neuron statistics of the node are left out.
        """
        from comgra_callbacks.store.attribution import neuron_series

        return neuron_series(self, node, view=view, statistic=statistic, role=role, iteration=iteration, step_type=step_type)

    def attribution_steps(self, param: str, *, step_type: str | None = None) -> list[int]:
        """The steps at which per-sample factors of ``param`` were recorded (``attribution=``)."""
        from comgra_callbacks.store.attribution import attribution_steps

        return attribution_steps(self, param, step_type=step_type)

    def attribution(self, param: str, step: int, *, step_type: str | None = None) -> Any:
        """What ``attribution=`` kept for ``param`` at ``step``: an
        :class:`~comgra_callbacks.store.attribution.AttributionStep` (factors, dataset indices, optimizer)."""
        from comgra_callbacks.store.attribution import read_attribution

        return read_attribution(self, param, step, step_type=step_type)


def open_run(path_or_url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> Run:
    """Open one run by its path or URL (``comgra_runs/2026-11-21_1200_ab12`` or ``s3://bucket/runs/name``).

    Raises:
        RunNotFoundError: nothing there, or not a comgra run.
        FormatVersionError: written by an incompatible version.
    """
    root_uri, name = split_run_uri(path_or_url)
    root = open_root(root_uri, storage_options)
    return Run(root.run(name))


def open_runs(
    root: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    errors: str = "warn",
) -> list[Run]:
    """Open every run under a root, sorted by name (run groups of ranks, ``name/rank1``, included).

    Args:
        errors: what to do with a run that cannot be opened: ``"warn"`` (skip it with a warning) or ``"raise"``.

    Raises:
        RunNotFoundError: the root does not exist.
    """
    import warnings

    if errors not in ("warn", "raise"):
        from comgra_callbacks.errors import ConfigError

        raise ConfigError(f"`open_runs(errors=...)`: expected 'warn' or 'raise', got {errors!r}.")
    opened = open_root(root, storage_options)
    if not opened.exists():
        raise RunNotFoundError(f"the root {opened.uri!r} does not exist.")
    runs = []
    for name in opened.list_run_names():
        try:
            runs.append(Run(opened.run(name)))
        except Exception as exc:
            if errors == "raise":
                raise
            warnings.warn(f"comgra: skipping run {name!r} under {opened.uri!r}: {exc}", RuntimeWarning, stacklevel=2)
    return runs
