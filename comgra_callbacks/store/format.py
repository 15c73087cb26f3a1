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

from dataclasses import dataclass, field
from typing import Any, Literal

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
NEURONS = "neurons"  # float32 (N,): per entry len(NEURON_STAT_NAMES) blocks of `width` values
SAMPLES_PTR = "samples_ptr"  # int64 (R, n_series, 2): (offset into SAMPLES, shape id); -1 where absent
SAMPLES = "samples"  # float32 (M,): per entry the samples, C order, shape from manifest["shapes"]
SCALARS = "scalars"  # float64 (K, 3): (step, name id, value), names in manifest["scalar_names"]
MEASURE_PREFIX = "measure/"  # scalars named so are measures (run.measures), not logged scalars

RECORD_COLUMNS = ("step", "epoch", "batch_idx", "step_type", "reason", "segment")

# Batch statistics, over the finite elements; nan_count / inf_count count the others.
STAT_NAMES = (
    "mean",
    "std",
    "abs_mean",
    "min",
    "max",
    "l2",
    "zero_frac",
    "nan_count",
    "inf_count",
    "numel",
    "update_ratio",
)
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}
NEURON_STAT_NAMES = ("mean", "std", "abs_mean")

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

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "rows": self.rows,
            "stat_names": list(STAT_NAMES),
            "neuron_stat_names": list(NEURON_STAT_NAMES),
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
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            format_version=str(data["format_version"]),
            rows=int(data["rows"]),
            series=[SeriesKey.from_json(item) for item in data["series"]],
            dtypes=[str(d) for d in data.get("dtypes", [])],
            shapes=[[int(n) for n in shape] for shape in data["shapes"]],
            neurons_len=int(data["neurons_len"]),
            samples_len=int(data["samples_len"]),
            step_types=[str(s) for s in data["step_types"]],
            reasons=[str(s) for s in data["reasons"]],
            segments=list(data.get("segments", [])),
            scalar_names=[str(s) for s in data.get("scalar_names", [])],
            scalars_len=int(data.get("scalars_len", 0)),
            heartbeat=float(data.get("heartbeat", 0.0)),
        )


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
