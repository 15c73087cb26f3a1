"""The on-disk format of a run: names, versions and the manifest (documented in docs/store-format.md).

A run is one Zarr v3 group. Its arrays have one row per *record* (a recorded step); the statistics of every
*series* (one node, role, iteration and view) sit side by side along the second axis. Per-neuron statistics
and samples vary in size, so they are appended to flat arrays and found through pointer arrays.
The manifest (``manifest.json``) is written after each flush and is the only thing a reader trusts: it says
how many rows are committed and which series each column holds.

>>> key = SeriesKey("net.0", None, 0, "grad")
>>> SeriesKey.from_json(key.to_json()) == key
True
>>> STAT_NAMES.index("numel") == STAT_INDEX["numel"]
True
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any, Literal

from comgra_callbacks.stats import LEGACY_NEURON_STAT_NAMES, NEURON_STAT_NAMES, STAT_INDEX, STAT_NAMES  # noqa: F401 - re-exported

FORMAT_NAME = "comgra_callbacks"
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1

# Sidecars (JSON, written atomically) and arrays inside a run group.
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
GRAPH_FILE = "graph.json"
MODULES_FILE = "modules.json"
NOTES_FILE = "notes.json"

RECORDS = "records"  # int64 (R, len(RECORD_COLUMNS))
RECORD_TIME = "record_time"  # float64 (R,): wall-clock seconds since the epoch
STATS = "stats"  # float32 (R, n_series, len(STAT_NAMES)), NaN where a series is absent
NEURONS_PTR = "neurons_ptr"  # int64 (R, n_series, 2): (offset into NEURONS, width); -1 where absent
NEURONS = "neurons"  # float32 (N,): per entry len(manifest neuron_stat_names) blocks of `width` values
SAMPLES_PTR = "samples_ptr"  # int64 (R, n_series, 2): (offset into SAMPLES, shape id); -1 where absent
SAMPLES = "samples"  # float32 (M,): per entry the samples, C order, shape from manifest["shapes"]
SCALARS = "scalars"  # float64 (K, 3): (step, name id, value), names in manifest["scalar_names"]
MEASURE_PREFIX = "measure/"  # scalars named so are measures (run.measures), not logged scalars
CIRCUIT_PREFIX = "circuit/"  # circuit/<name>/<node>/<unit>/<score|effect>: tracked circuits (run.circuit_scores)

RECORD_COLUMNS = ("step", "epoch", "batch_idx", "step_type", "reason", "segment")

# Batch statistics (STAT_NAMES) and per-neuron statistics (NEURON_STAT_NAMES): their names, order and
# definitions are in comgra_callbacks/stats.py.

Kind = Literal["input", "target", "parameter", "intermediate", "output", "loss"]
KINDS: tuple[str, ...] = ("input", "target", "parameter", "intermediate", "output", "loss")
BASE_VIEWS = ("value", "grad", "update")
RunStatus = Literal["running", "finished", "failed"]


@dataclass(frozen=True)
class SeriesKey:
    """Identifies one column of the statistics: a node's tensor in one role, iteration and view.

    ``view`` is ``"value"``, ``"grad"`` (gradient of the total loss), ``"grad:<loss>"`` or ``"update"``.
    """

    node: str
    role: str | None
    iteration: int
    view: str

    def to_json(self) -> list[Any]:
        return [self.node, self.role, self.iteration, self.view]

    @classmethod
    def from_json(cls, item: list[Any]) -> SeriesKey:
        node, role, iteration, view = item
        return cls(str(node), None if role is None else str(role), int(iteration), str(view))


@dataclass
class Manifest:
    """What a reader may trust: committed rows and the meaning of every column.

    Attributes:
        rows: number of committed records; rows beyond it may be partly written and are never read.
        series: the series key of each column of ``stats`` / ``*_ptr``.
        dtypes: the torch dtype name of each series' tensor (samples are stored as float32).
        shapes: sample shapes referenced by ``samples_ptr[..., 1]``.
        neurons_len / samples_len: committed lengths of the flat arrays.
        step_types / reasons: names behind the codes in ``records``.
        segments: one entry per start or resume of training: ``{"segment", "start_step", "time"}``.
        scalar_names / scalars_len: the logged-scalar table.
        heartbeat: time of the last flush (a run whose heartbeat is old while "running" probably died).
    """

    format_version: str = FORMAT_VERSION
    rows: int = 0
    series: list[SeriesKey] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    neurons_len: int = 0
    samples_len: int = 0
    step_types: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    scalar_names: list[str] = field(default_factory=list)
    scalars_len: int = 0
    heartbeat: float = 0.0
    neuron_stat_names: tuple[str, ...] = NEURON_STAT_NAMES

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "rows": self.rows,
            "stat_names": list(STAT_NAMES),
            "neuron_stat_names": list(self.neuron_stat_names),
            "record_columns": list(RECORD_COLUMNS),
            "series": [key.to_json() for key in self.series],
            "dtypes": list(self.dtypes),
            "shapes": [list(shape) for shape in self.shapes],
            "neurons_len": self.neurons_len,
            "samples_len": self.samples_len,
            "step_types": list(self.step_types),
            "reasons": list(self.reasons),
            "segments": list(self.segments),
            "scalar_names": list(self.scalar_names),
            "scalars_len": self.scalars_len,
            "heartbeat": self.heartbeat,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = f"the file {MANIFEST_FILE!r}") -> Manifest:
        """Parse and validate a manifest; every field is checked for its type and range.

        Raises:
            CorruptStoreError: a field is missing or has a wrong type or value (the message starts with
                ``where``, which names the run and the file).

        >>> Manifest.from_json({"format_version": "1.0", "rows": -1, "neurons_len": 0}, "run 'x': its file 'manifest.json'")
        Traceback (most recent call last):
        ...
        comgra_callbacks.errors.CorruptStoreError: run 'x': its file 'manifest.json' has "rows": -1; expected an int >= 0.
        """
        if not isinstance(data, dict):
            raise _corrupt(where, f"holds {type(data).__name__} {_short(data)}; expected a JSON object.")
        get = _Fields(data, where)
        rows, neurons_len, samples_len = get.count("rows"), get.count("neurons_len"), get.count("samples_len")
        series = []
        for i, item in enumerate(get.list("series")):
            if not (isinstance(item, list) and len(item) == 4):
                raise _corrupt(where, f'has "series"[{i}] = {_short(item)}; expected [node, role, iteration, view].')
            node, role, iteration, view = item
            if not isinstance(node, str) or not (role is None or isinstance(role, str)) or not _is_int(iteration) or iteration < 0 or not isinstance(view, str):
                raise _corrupt(where, f'has "series"[{i}] = {_short(item)}; expected [str, str or null, int >= 0, str].')
            series.append(SeriesKey(node, role, iteration, view))
        shapes = []
        for i, shape in enumerate(get.list("shapes")):
            if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
                raise _corrupt(where, f'has "shapes"[{i}] = {_short(shape)}; expected a list of ints >= 0.')
            shapes.append([int(n) for n in shape])
        segments = get.list("segments", required=False)
        for i, seg in enumerate(segments):
            if not (isinstance(seg, dict) and _is_int(seg.get("segment")) and seg["segment"] >= 0 and _is_int(seg.get("start_step"))):
                raise _corrupt(where, f'has "segments"[{i}] = {_short(seg)}; expected {{"segment": int >= 0, "start_step": int, ...}}.')
        for name, known in (("stat_names", STAT_NAMES), ("record_columns", RECORD_COLUMNS)):
            value = data.get(name, list(known))
            if not isinstance(value, list) or value[: len(known)] != list(known):
                raise _corrupt(where, f'has "{name}": {_short(data[name])}; expected a list starting with {list(known)}.')
        neuron_names = data.get("neuron_stat_names", list(LEGACY_NEURON_STAT_NAMES))
        if not isinstance(neuron_names, list) or neuron_names != list(NEURON_STAT_NAMES)[: len(neuron_names)] or not neuron_names:
            raise _corrupt(where, f'has "neuron_stat_names": {_short(neuron_names)}; expected {list(NEURON_STAT_NAMES)} or a start of it.')
        heartbeat = data.get("heartbeat", 0.0)
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)):
            raise _corrupt(where, f'has "heartbeat": {_short(heartbeat)}; expected a number.')
        version = data.get("format_version")
        if not isinstance(version, str):
            raise _corrupt(where, f'has "format_version": {_short(version)}; expected a string such as "1.0".')
        return cls(
            format_version=version,
            rows=rows,
            series=series,
            dtypes=get.strings("dtypes", required=False),
            shapes=shapes,
            neurons_len=neurons_len,
            samples_len=samples_len,
            step_types=get.strings("step_types"),
            reasons=get.strings("reasons"),
            segments=list(segments),
            scalar_names=get.strings("scalar_names", required=False),
            scalars_len=get.count("scalars_len", required=False),
            heartbeat=float(heartbeat),
            neuron_stat_names=tuple(neuron_names),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a value read from a damaged file, cut short (a damaged file may hold megabytes)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _corrupt(where: str, problem: str) -> Exception:
    from comgra_callbacks.errors import CorruptStoreError

    return CorruptStoreError(f"{where} {problem}")


class _Fields:
    """Typed access to a JSON object read from a store; a wrong field raises CorruptStoreError naming it."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def _get(self, name: str, required: bool, default: Any) -> Any:
        if name not in self.data:
            if required:
                raise _corrupt(self.where, f'has no field "{name}".')
            return default
        return self.data[name]

    def count(self, name: str, *, required: bool = True) -> int:
        value = self._get(name, required, 0)
        if not _is_int(value) or value < 0:
            raise _corrupt(self.where, f'has "{name}": {_short(value)}; expected an int >= 0.')
        return int(value)

    def list(self, name: str, *, required: bool = True) -> builtins.list[Any]:
        value = self._get(name, required, [])
        if not isinstance(value, list):
            raise _corrupt(self.where, f'has "{name}": {_short(value)}; expected a list.')
        return value

    def strings(self, name: str, *, required: bool = True) -> builtins.list[str]:
        value = self.list(name, required=required)
        bad = next((v for v in value if not isinstance(v, str)), None)
        if bad is not None:
            raise _corrupt(self.where, f'has "{name}" holding {_short(bad)}; expected a list of strings.')
        return list(value)


def check_version(version: object, where: str) -> None:
    """Reject a format version this package cannot read.

    >>> check_version("1.3", "run x")
    >>> check_version("2.0", "run x")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.FormatVersionError: run x was written in store format 2.0; this comgra_callbacks reads format 1.x. HINT: upgrade comgra-callbacks (pip install -U comgra-callbacks).
    """
    from comgra_callbacks.errors import FormatVersionError

    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = -1
    if major != SUPPORTED_MAJOR:
        hint = (
            "upgrade comgra-callbacks (pip install -U comgra-callbacks)"
            if major > SUPPORTED_MAJOR
            else "it was not written by a compatible comgra_callbacks"
        )
        raise FormatVersionError(
            f"{where} was written in store format {version}; this comgra_callbacks reads format "
            f"{SUPPORTED_MAJOR}.x. HINT: {hint}."
        )


# ------------------------------------------------------------------------------ validation of what is read
# Pure checks of what a reader got from a store; ``where`` names the run and the file ("run 'x' (uri): its
# file 'graph.json'"). Each raises CorruptStoreError, or returns the problem for an array the caller names.
_RESTORE = "HINT: restore the file from a backup, or delete the run."


def check_graph(raw: Any, where: str) -> dict[str, Any]:
    """``graph.json`` checked for the structure the reader and the dashboard rely on.

    >>> check_graph({"nodes": {"h": {"shape": [-1]}}}, "run 'x': its file 'graph.json'")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.CorruptStoreError: run 'x': its file 'graph.json' gives node 'h' the shape [-1]; expected a list of ints >= 0 or null. HINT: restore the file from a backup, or delete it (the graph is then rebuilt from the series).
    """
    def bad(problem: str) -> Exception:
        return _corrupt(where, f"{problem} HINT: restore the file from a backup, or delete it (the graph is then rebuilt from the series).")

    if not isinstance(raw, dict):
        raise bad(f"holds {type(raw).__name__} {_short(raw)}; expected a JSON object.")
    nodes, graphs = raw.get("nodes", {}), raw.get("graphs", {})
    if not isinstance(nodes, dict) or not all(isinstance(a, dict) for a in nodes.values()):
        raise bad(f'has "nodes": {_short(nodes)}; expected an object of node name -> attributes.')
    for name, attrs in nodes.items():
        shape, module = attrs.get("shape"), attrs.get("module")
        if shape is not None and not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
            raise bad(f"gives node {name!r} the shape {_short(shape)}; expected a list of ints >= 0 or null.")
        if module is not None and not isinstance(module, str):
            raise bad(f"gives node {name!r} the module {_short(module)}; expected a string or null.")
        if not isinstance(attrs.get("kind", ""), str) or not isinstance(attrs.get("roles", []), list):
            raise bad(f"gives node {name!r} the attributes {_short(attrs)}; expected a string kind and a list of roles.")
    if not isinstance(graphs, dict):
        raise bad(f'has "graphs": {_short(graphs)}; expected an object of step type -> graph.')
    for step_type, sub in graphs.items():
        members = sub.get("nodes", []) if isinstance(sub, dict) else None
        edges = sub.get("edges", []) if isinstance(sub, dict) else None
        if not isinstance(members, list) or not all(isinstance(n, str) for n in members):
            raise bad(f'has the graph of {step_type!r} = {_short(sub)}; expected {{"nodes": [str, ...], "edges": [...]}}.')
        if not isinstance(edges, list) or not all(isinstance(e, list) and len(e) == 3 and all(isinstance(v, str) for v in e) for e in edges):
            raise bad(f"has edges of {step_type!r} = {_short(edges)}; expected a list of [source, target, how].")
    return raw


def check_modules(rows: Any, where: str) -> list[dict[str, Any]]:
    """``modules.json``: a list of ``{"name", "type", "parent", "depth", "params", ...}`` of the right types."""
    ints = ("depth", "params", "params_total", "trainable_total")
    if not isinstance(rows, list):
        raise _corrupt(where, f"holds {type(rows).__name__} {_short(rows)}; expected a list of modules. {_RESTORE}")
    for i, row in enumerate(rows):
        ok = (
            isinstance(row, dict) and isinstance(row.get("name"), str) and isinstance(row.get("type"), str)
            and (row.get("parent") is None or isinstance(row.get("parent"), str))
            and all(_is_int(row.get(k, 0)) and row.get(k, 0) >= 0 for k in ints)
        )
        if not ok:
            raise _corrupt(
                where, f'has the entry [{i}] = {_short(row)}; expected {{"name": str, "type": str, "parent": str or null, '
                f'"depth" / "params" / "params_total" / "trainable_total": ints >= 0}}. {_RESTORE}',
            )
    return rows


def check_notes(items: Any, where: str) -> list[dict[str, Any]]:
    """``notes.json``: a list of ``{"step": int, "time": number, "text": str}``."""
    if not isinstance(items, list):
        raise _corrupt(where, f"holds {type(items).__name__} {_short(items)}; expected a list of notes. {_RESTORE}")
    number = (int, float)
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("step"), number) and isinstance(item.get("time", 0), number) and isinstance(item.get("text"), str)):
            raise _corrupt(where, f'has the entry [{i}] = {_short(item)}; expected {{"step": int, "time": number, "text": str}}. {_RESTORE}')
    return items


def record_problem(rec: Any, times: Any, manifest: Manifest) -> tuple[str, str] | None:
    """What is wrong with the committed records, as (array, problem), or None. Every code must name a step
    type, a reason and a segment; steps and times must be real (a chunk deleted from ``records`` reads as
    -1 everywhere, one deleted from ``record_time`` as NaN)."""
    import numpy as np

    m = manifest
    columns = {name: i for i, name in enumerate(RECORD_COLUMNS)}
    checks = [("step_type", len(m.step_types), '"step_types"'), ("reason", len(m.reasons), '"reasons"'), ("segment", max(len(m.segments), 1), '"segments"')]
    for column, count, names in checks:
        codes = rec[:, columns[column]]
        bad = np.flatnonzero((codes < 0) | (codes >= count))
        if len(bad):
            return RECORDS, (
                f"has the {column} code {int(codes[bad[0]])} in record {int(bad[0])}; expected 0 <= code < {count} "
                f"(the length of {names} in {MANIFEST_FILE})."
            )
    for column in ("step", "epoch", "batch_idx"):
        values = rec[:, columns[column]]
        bad = np.flatnonzero(values < 0)
        if len(bad):
            return RECORDS, f"has {column} {int(values[bad[0]])} in record {int(bad[0])}; expected an int >= 0."
    bad = np.flatnonzero(~np.isfinite(times))
    if len(bad):
        return RECORD_TIME, f"has the time {float(times[bad[0]])!r} in record {int(bad[0])}; expected seconds since the epoch."
    return None


def scalar_problem(block: Any, manifest: Manifest) -> str | None:
    """What is wrong with the committed logged scalars ``(step, name id, value)``, or None."""
    import numpy as np

    ids = block[:, 1]
    names = len(manifest.scalar_names)
    bad = np.flatnonzero(~np.isfinite(ids) | (ids < 0) | (ids >= names) | (ids != np.floor(ids)) | ~np.isfinite(block[:, 0]))
    if len(bad):
        return (
            f"has the row {int(bad[0])} = {block[bad[0]].tolist()!r}; expected (step, name id, value) with "
            f'0 <= name id < {names} (the length of "scalar_names" in {MANIFEST_FILE}).'
        )
    return None
