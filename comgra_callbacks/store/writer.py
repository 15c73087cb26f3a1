"""Write a run: a synchronous :class:`RunWriter` that owns the Zarr group, and the records it takes.

The writer appends blocks of records; it never rewrites a committed row. Each :meth:`RunWriter.append`
resizes the arrays, writes the new rows, and only then rewrites ``manifest.json``, which is what a reader
trusts. A crash between the two leaves rows past the manifest that nobody reads and that a resumed writer
drops. The background thread in front of it lives in :mod:`comgra_callbacks.store.background`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comgra_callbacks.errors import CorruptStoreError, StoreError
from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.format import Manifest, SeriesKey
from comgra_callbacks.store.storage import RunLocation


@dataclass
class HostEntry:
    """One series of one record, on the host.

    Attributes:
        key: which node, role, iteration and view.
        stats: ``(len(STAT_NAMES),)`` float32.
        neurons: ``(len(NEURON_STAT_NAMES), width)`` float32, or None.
        samples: the samples (first axis = sample) as float32, or None.
        dtype: the torch dtype name of the recorded tensor.
    """

    key: SeriesKey
    stats: np.ndarray
    neurons: np.ndarray | None = None
    samples: np.ndarray | None = None
    dtype: str = "float32"


@dataclass
class HostRecord:
    """One recorded step, ready to be written."""

    step: int
    step_type: str
    epoch: int
    batch_idx: int
    time: float
    reason: str
    entries: list[HostEntry] = field(default_factory=list)


@dataclass(frozen=True)
class StoreLayout:
    """Chunk sizes. Statistics and pointers are chunked by record and by groups of series; the flat
    arrays by ~1 MiB, so a long run stays at thousands of files rather than millions."""

    record_chunk: int = 4096
    stats_rows: int = 256
    stats_series: int = 16
    flat_chunk: int = 262_144
    scalars_chunk: int = 8192
    zstd_level: int = 3
    samples_zstd_level: int = 1  # the flat samples array: per-sample factors of attribution= (docs/benchmarks.md#attribution)


def _now() -> float:
    return time.time()


class RunWriter:
    """Owns one run group; appends records and writes sidecars. Not thread-safe: one thread writes.

    Args:
        location: where the run lives.
        meta: run metadata merged into ``meta.json`` (hyper-parameters, versions, configuration).
        resume: continue an existing run (rows past its manifest are dropped); otherwise the run must not
            exist yet.
        layout: chunking.

    Raises:
        StoreError: the run exists (and ``resume`` is False) or cannot be written.
    """

    def __init__(
        self,
        location: RunLocation,
        *,
        meta: dict[str, Any] | None = None,
        resume: bool = False,
        layout: StoreLayout | None = None,
    ) -> None:
        import zarr

        self.location = location
        self.layout = layout or StoreLayout()
        existing = location.read_json(fmt.MANIFEST_FILE)
        if existing is not None and not resume:
            raise StoreError(
                f"a run already exists at {location.uri!r}. HINT: choose another `run_name`, or resume it."
            )
        try:
            store = location.zarr_store(read_only=False)
            if existing is None:
                self.group = zarr.open_group(store, mode="w", zarr_format=3)
                self.group.attrs.update({fmt.FORMAT_NAME: {"format_version": fmt.FORMAT_VERSION}})
                self._create_arrays()
                self.manifest = Manifest()
                self.meta: dict[str, Any] = {}
                self.notes: list[dict[str, Any]] = []
            else:
                fmt.check_version(existing.get("format_version"), f"the run at {location.uri!r}")
                self.group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
                self.manifest = Manifest.from_json(existing)
                self.meta = location.read_json(fmt.META_FILE) or {}
                self.notes = location.read_json(fmt.NOTES_FILE) or []
                self._truncate_to_manifest()
        except (StoreError, CorruptStoreError):
            raise
        except Exception as exc:
            raise StoreError(f"cannot open the run at {location.uri!r} for writing: {type(exc).__name__}: {exc}") from exc
        self._series_index = {key: i for i, key in enumerate(self.manifest.series)}
        self._shape_index = {tuple(shape): i for i, shape in enumerate(self.manifest.shapes)}
        self.meta.update(meta or {})
        self.meta.update(
            {
                "format": fmt.FORMAT_NAME,
                "format_version": fmt.FORMAT_VERSION,
                "run_name": location.name,
                "status": "running",
            }
        )
        self.meta.setdefault("created", _now())
        self.meta.pop("finished", None)
        self.meta.pop("error", None)
        self.location.write_json(fmt.META_FILE, self.meta)
        self.commit()

    # ------------------------------------------------------------------------------------ arrays
    def _create_arrays(self) -> None:
        from zarr.codecs import ZstdCodec

        lay = self.layout
        zstd = ZstdCodec(level=lay.zstd_level)
        n_stats = len(fmt.STAT_NAMES)

        def create(name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fill: Any) -> None:
            # samples are the bulk of a step with attribution=: zstd level 1 takes half the CPU of level 3 on
            # them for ~4 % more bytes (measured in docs/benchmarks.md#attribution)
            codec = ZstdCodec(level=lay.samples_zstd_level) if name == fmt.SAMPLES else zstd
            self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=codec)

        create(fmt.RECORDS, (0, len(fmt.RECORD_COLUMNS)), (lay.record_chunk, len(fmt.RECORD_COLUMNS)), "int64", -1)
        create(fmt.RECORD_TIME, (0,), (lay.record_chunk,), "float64", np.nan)
        create(fmt.STATS, (0, 0, n_stats), (lay.stats_rows, lay.stats_series, n_stats), "float32", np.nan)
        create(fmt.NEURONS_PTR, (0, 0, 2), (lay.stats_rows, lay.stats_series, 2), "int64", -1)
        create(fmt.SAMPLES_PTR, (0, 0, 2), (lay.stats_rows, lay.stats_series, 2), "int64", -1)
        create(fmt.NEURONS, (0,), (lay.flat_chunk,), "float32", np.nan)
        create(fmt.SAMPLES, (0,), (lay.flat_chunk,), "float32", np.nan)
        create(fmt.SCALARS, (0, 3), (lay.scalars_chunk, 3), "float64", np.nan)

    def _array(self, name: str) -> Any:
        return self.group[name]

    def _truncate_to_manifest(self) -> None:
        """Drop rows written after the last committed manifest (a crash mid-flush)."""
        m = self.manifest
        n_series = len(m.series)
        targets = {
            fmt.RECORDS: (m.rows, len(fmt.RECORD_COLUMNS)),
            fmt.RECORD_TIME: (m.rows,),
            fmt.STATS: (m.rows, n_series, len(fmt.STAT_NAMES)),
            fmt.NEURONS_PTR: (m.rows, n_series, 2),
            fmt.SAMPLES_PTR: (m.rows, n_series, 2),
            fmt.NEURONS: (m.neurons_len,),
            fmt.SAMPLES: (m.samples_len,),
            fmt.SCALARS: (m.scalars_len, 3),
        }
        for name, shape in targets.items():
            array = self._array(name)
            if any(have < want for have, want in zip(array.shape, shape)):
                raise CorruptStoreError(
                    f"the run at {self.location.uri!r} is inconsistent: array {name!r} has shape {array.shape} but "
                    f"the manifest promises {shape}."
                )
            if tuple(array.shape) != shape:
                array.resize(shape)

    # ----------------------------------------------------------------------------------- records
    def _series_id(self, entry: HostEntry) -> int:
        idx = self._series_index.get(entry.key)
        if idx is None:
            idx = len(self.manifest.series)
            self.manifest.series.append(entry.key)
            self.manifest.dtypes.append(entry.dtype)
            self._series_index[entry.key] = idx
        return idx

    def _shape_id(self, shape: tuple[int, ...]) -> int:
        idx = self._shape_index.get(shape)
        if idx is None:
            idx = len(self.manifest.shapes)
            self.manifest.shapes.append(list(shape))
            self._shape_index[shape] = idx
        return idx

    @staticmethod
    def _code(names: list[str], name: str) -> int:
        try:
            return names.index(name)
        except ValueError:
            names.append(name)
            return len(names) - 1

    def append(self, records: Sequence[HostRecord], *, commit: bool = True) -> None:
        """Append records as one block; commit (rewrite the manifest) unless told not to."""
        if not records:
            if commit:
                self.commit()
            return
        m = self.manifest
        segment = max(len(m.segments) - 1, 0)
        # Assign ids first, so the block is allocated at its final width.
        ids = [[self._series_id(entry) for entry in record.entries] for record in records]
        n, n_series, n_stats = len(records), len(m.series), len(fmt.STAT_NAMES)
        rec_block = np.empty((n, len(fmt.RECORD_COLUMNS)), dtype=np.int64)
        time_block = np.empty((n,), dtype=np.float64)
        stats_block = np.full((n, n_series, n_stats), np.nan, dtype=np.float32)
        nptr_block = np.full((n, n_series, 2), -1, dtype=np.int64)
        sptr_block = np.full((n, n_series, 2), -1, dtype=np.int64)
        neuron_parts: list[np.ndarray] = []
        sample_parts: list[np.ndarray] = []
        n_off, s_off = m.neurons_len, m.samples_len
        for row, (record, record_ids) in enumerate(zip(records, ids)):
            rec_block[row] = (
                record.step,
                record.epoch,
                record.batch_idx,
                self._code(m.step_types, record.step_type),
                self._code(m.reasons, record.reason),
                segment,
            )
            time_block[row] = record.time
            for entry, sid in zip(record.entries, record_ids):
                stats_block[row, sid] = entry.stats
                if entry.neurons is not None:
                    flat = _neuron_blocks(entry.neurons, len(m.neuron_stat_names))
                    nptr_block[row, sid] = (n_off, entry.neurons.shape[-1])
                    neuron_parts.append(flat)
                    n_off += flat.size
                if entry.samples is not None:
                    flat = np.ascontiguousarray(entry.samples, dtype=np.float32).reshape(-1)
                    sptr_block[row, sid] = (s_off, self._shape_id(tuple(entry.samples.shape)))
                    sample_parts.append(flat)
                    s_off += flat.size
        r0, r1 = m.rows, m.rows + n
        self._write_rows(fmt.RECORDS, rec_block, r0, r1)
        self._write_rows(fmt.RECORD_TIME, time_block, r0, r1)
        self._write_rows(fmt.STATS, stats_block, r0, r1)
        self._write_rows(fmt.NEURONS_PTR, nptr_block, r0, r1)
        self._write_rows(fmt.SAMPLES_PTR, sptr_block, r0, r1)
        if neuron_parts:
            self._write_rows(fmt.NEURONS, np.concatenate(neuron_parts), m.neurons_len, n_off)
        if sample_parts:
            self._write_rows(fmt.SAMPLES, np.concatenate(sample_parts), m.samples_len, s_off)
        m.rows, m.neurons_len, m.samples_len = r1, n_off, s_off
        if commit:
            self.commit()

    def _write_rows(self, name: str, block: np.ndarray, start: int, stop: int) -> None:
        array = self._array(name)
        shape = (stop, *block.shape[1:])
        if tuple(array.shape) != shape:
            array.resize(shape)
        array[start:stop] = block

    def add_scalars(self, rows: Sequence[tuple[int, str, float]]) -> None:
        """Append logged scalars ``(step, name, value)``; committed with the next manifest."""
        if not rows:
            return
        m = self.manifest
        block = np.array([(step, self._code(m.scalar_names, name), value) for step, name, value in rows], dtype=np.float64)
        self._write_rows(fmt.SCALARS, block, m.scalars_len, m.scalars_len + len(block))
        m.scalars_len += len(block)

    # ---------------------------------------------------------------------------------- sidecars
    def start_segment(self, start_step: int) -> int:
        """Mark a start (0) or a resume (1, 2, ...) of training at ``start_step``."""
        self.manifest.segments.append({"segment": len(self.manifest.segments), "start_step": int(start_step), "time": _now()})
        self.commit()
        return len(self.manifest.segments) - 1

    def commit(self) -> None:
        """Write the manifest: the rows written so far become visible to readers."""
        self.manifest.heartbeat = _now()
        self.location.write_json(fmt.MANIFEST_FILE, self.manifest.to_json())

    def write_graph(self, graphs: dict[str, Any]) -> None:
        self.location.write_json(fmt.GRAPH_FILE, graphs)

    def write_modules(self, modules: list[dict[str, Any]]) -> None:
        self.location.write_json(fmt.MODULES_FILE, modules)

    def add_notes(self, notes: Sequence[dict[str, Any]]) -> None:
        if notes:
            self.notes.extend(notes)
            self.location.write_json(fmt.NOTES_FILE, self.notes)

    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        self.location.write_json(fmt.META_FILE, self.meta)

    def close(self, status: fmt.RunStatus, error: str | None = None) -> None:
        """Commit and mark the run finished or failed."""
        self.commit()
        fields: dict[str, Any] = {"status": status, "finished": _now()}
        if error:
            fields["error"] = error
        self.update_meta(**fields)


def _neuron_blocks(neurons: np.ndarray, n_names: int) -> np.ndarray:
    """An entry's per-neuron statistics as the run stores them: ``n_names`` blocks of ``width`` values. A run
    resumed from a store written before per-neuron ``l2`` keeps its three blocks; fewer rows than names (a
    producer that knows only the older names) are padded with NaN."""
    block = np.asarray(neurons, dtype=np.float32).reshape(-1, neurons.shape[-1])[:n_names]
    if block.shape[0] < n_names:
        block = np.concatenate([block, np.full((n_names - block.shape[0], block.shape[1]), np.nan, dtype=np.float32)])
    return np.ascontiguousarray(block).reshape(-1)


LIVE_SECS = 120.0  # a "running" run committed within this many seconds is taken to have a live writer


def append_scalars(location: RunLocation, rows: Sequence[tuple[int, str, float]], *, owner: str = "append_scalars") -> int:
    """Append scalars ``(step, name, value)`` to an existing run that no writer holds (a finished, failed or
    long-dead run): what :func:`comgra_callbacks.analysis.derive` stores its measures with.

    The same order as :meth:`RunWriter.append`: the rows are written past the committed ones, and only then is
    the manifest rewritten (atomically), so a crash in between leaves rows nobody reads. Rows already past the
    manifest (a torn earlier write) are dropped first. Nothing else of the run is touched: records, sidecars
    and its status stay as they were. One process at a time.

    Returns:
        The number of scalars the run holds now.

    Raises:
        StoreError: no run there, or a writer committed to it less than ``LIVE_SECS`` ago while its status is
            ``"running"`` (appending then would race with it).
    """
    import zarr

    raw = location.read_json(fmt.MANIFEST_FILE)
    if raw is None:
        raise StoreError(f"`{owner}`: no comgra run at {location.uri!r} (no {fmt.MANIFEST_FILE}).")
    fmt.check_version(raw.get("format_version") if isinstance(raw, dict) else None, f"the run at {location.uri!r}")
    manifest = Manifest.from_json(raw, f"run at {location.uri}: its file {fmt.MANIFEST_FILE!r}")
    meta = location.read_json(fmt.META_FILE) or {}
    age = _now() - manifest.heartbeat
    if meta.get("status", "running") == "running" and age < LIVE_SECS:
        raise StoreError(
            f"`{owner}`: the run at {location.uri!r} is being written (status 'running', last commit {age:.0f} s ago). "
            f"HINT: add to it after training has finished."
        )
    if not rows:
        return manifest.scalars_len
    try:
        group = zarr.open_group(location.zarr_store(read_only=False), mode="r+", zarr_format=3, use_consolidated=False)
        array: Any = group[fmt.SCALARS]
        if array.shape[0] < manifest.scalars_len:
            raise CorruptStoreError(f"the run at {location.uri!r} is inconsistent: array {fmt.SCALARS!r} has shape {array.shape} but the manifest promises {manifest.scalars_len} rows.")
        block = np.array([(int(step), RunWriter._code(manifest.scalar_names, name), float(value)) for step, name, value in rows], dtype=np.float64)
        start, stop = manifest.scalars_len, manifest.scalars_len + len(block)
        array.resize((stop, 3))  # drops any rows past the manifest, then makes room
        array[start:stop] = block
    except (StoreError, CorruptStoreError):
        raise
    except Exception as exc:
        raise StoreError(f"`{owner}`: cannot write to the run at {location.uri!r}: {type(exc).__name__}: {exc}") from exc
    manifest.scalars_len = stop
    manifest.heartbeat = _now()  # a dashboard polling the run sees that it changed
    location.write_json(fmt.MANIFEST_FILE, manifest.to_json())
    return stop
