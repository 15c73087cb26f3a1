"""Write a run: a synchronous :class:`RunWriter` that owns the Zarr group, and the records it takes.

The writer appends blocks of records; it never changes a committed value. Each :meth:`RunWriter.append`
writes the new rows, and only then rewrites ``manifest.json``, which is what a reader trusts. A crash between
the two leaves rows past the manifest that nobody reads and that a resumed writer drops.

Why a commit is cheap: the writer keeps the rows of each array's open (last, partly filled) chunk in memory
and writes every touched chunk whole, from the open chunk's first row to the end of the last chunk (padded
with the fill value), so zarr never reads a chunk back, decodes it and merges the new rows into it. And the
growing arrays are allocated in whole chunks, half as much again as they hold when they must grow, so a
commit rarely rewrites a ``zarr.json``. While a run is open its arrays may therefore be longer than the
manifest's counts (as after a crash); readers read only up to those counts, and :meth:`RunWriter.close` cuts
the arrays back to them. On local disk those whole chunks are encoded and written by :mod:`.chunks` rather
than by zarr's asynchronous write path (the same files, for about half the CPU of a commit). The background
thread in front of it lives in :mod:`comgra_callbacks.store.background`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from comgra_callbacks.errors import CorruptStoreError, StoreError
from comgra_callbacks.store import chunks
from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.format import Manifest, SeriesKey
from comgra_callbacks.store.storage import LocalRunLocation, RunLocation


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
    # 64 series per chunk: a commit writes ~24 files instead of ~56 with 16 (each a tmp file and a rename),
    # ~23 % less of the writer's CPU a commit, and a reader of one node's statistics is faster too (fewer
    # chunks to open; docs/benchmarks.md, "Fewer files a commit")
    stats_series: int = 64
    flat_chunk: int = 262_144
    scalars_chunk: int = 8192
    zstd_level: int = 3
    samples_zstd_level: int = 1  # the flat samples array: per-sample factors of attribution= (docs/benchmarks.md#attribution)
    # the two flat arrays' compressor: "lz4" (blosc), "zstd" (neurons at ``zstd_level``, samples at
    # ``samples_zstd_level``) or "none". Their values are random-looking floats: lz4 takes ~4 ms less of the
    # writer's CPU per LM record than zstd for ~19 % more bytes (docs/benchmarks.md, "The writer's cost per
    # committed record"), and the writer's CPU is taken from training
    flat_codec: Literal["lz4", "zstd", "none"] = "lz4"
    # a local run's chunks encoded and written by the writer itself (store/chunks.py), not by zarr's event
    # loop: about half the writer's CPU per commit of one or two LM records (72 -> 35 ms), a third of it for
    # eleven (153 -> 106 ms; docs/benchmarks.md); False: through zarr (the same files, byte for byte)
    direct_chunks: bool = True

    def __post_init__(self) -> None:
        if self.flat_codec not in _FLAT_CODECS:
            raise ValueError(f"`StoreLayout(flat_codec=...)`: expected one of {list(_FLAT_CODECS)}, got {self.flat_codec!r}.")

    def flat_compressors(self, name: str) -> Any:
        """The compressor of the flat array ``name`` (``neurons`` or ``samples``); None stores it raw."""
        from zarr.codecs import BloscCodec, ZstdCodec

        if self.flat_codec == "none":
            return None
        if self.flat_codec == "lz4":
            return BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=4)
        return ZstdCodec(level=self.samples_zstd_level if name == fmt.SAMPLES else self.zstd_level)


_FLAT_CODECS = ("lz4", "zstd", "none")


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
        self._arrays: dict[str, Any] = {}
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
        # the committed rows (values) of each growing array's open chunk: see the module docstring
        self._tails: dict[str, np.ndarray] = {}
        self._encoders: dict[str, Any] = {}  # per array: its chunk encoder, or None (zarr writes it)
        # series ids by the key's fields as a plain tuple: hashing and comparing a tuple runs in C, a frozen
        # dataclass's __hash__ and __eq__ in Python (~3 us a lookup, ~200 a record; the writer process
        # decodes new key objects for every record, so identity never short-cuts the comparison)
        self._series_index = {_key_fields(key): i for i, key in enumerate(self.manifest.series)}
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
            # the flat arrays are the bulk of a step, random-looking floats: a cheaper codec there (measured in
            # docs/benchmarks.md#attribution and "The writer's cost per committed record")
            codec = lay.flat_compressors(name) if name in (fmt.SAMPLES, fmt.NEURONS) else zstd
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
        """The array's handle, opened once: this writer is its only writer, and ``resize`` updates the handle
        in place (reopening it read its ``zarr.json`` again at every write)."""
        array = self._arrays.get(name)
        if array is None:
            array = self._arrays[name] = self.group[name]
        return array

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
    def _series_ids(self, entries: Sequence[HostEntry]) -> list[int]:
        """The series ids of a record's entries; new series get the next ids, in order."""
        index = self._series_index
        ids = [index.get((k.node, k.role, k.iteration, k.view), -1) for k in [entry.key for entry in entries]]  # _key_fields, inlined
        if -1 in ids:
            ids = [self._series_id(entry) for entry in entries]
        return ids

    def _series_id(self, entry: HostEntry) -> int:
        fields = _key_fields(entry.key)
        idx = self._series_index.get(fields)
        if idx is None:
            idx = len(self.manifest.series)
            self.manifest.series.append(entry.key)
            self.manifest.dtypes.append(entry.dtype)
            self._series_index[fields] = idx
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
        ids = [self._series_ids(record.entries) for record in records]
        n, n_series, n_stats = len(records), len(m.series), len(fmt.STAT_NAMES)
        rec_block = np.empty((n, len(fmt.RECORD_COLUMNS)), dtype=np.int64)
        time_block = np.empty((n,), dtype=np.float64)
        stats_block = np.full((n, n_series, n_stats), np.nan, dtype=np.float32)
        nptr_block = np.full((n, n_series, 2), -1, dtype=np.int64)
        sptr_block = np.full((n, n_series, 2), -1, dtype=np.int64)
        neuron_parts: list[np.ndarray] = []
        sample_parts: list[np.ndarray] = []
        n_off, s_off = m.neurons_len, m.samples_len
        n_names = len(m.neuron_stat_names)
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
            entries = record.entries
            if entries:
                stats_block[row, record_ids] = [entry.stats for entry in entries]
            # the per-neuron statistics and samples: one list of (series, array) each, then every pointer of
            # the row in one assignment (a record holds ~200 series: per-entry numpy calls add up)
            with_neurons = [(sid, e.neurons) for sid, e in zip(record_ids, entries) if e.neurons is not None]
            if with_neurons:
                flats = list(zip([sid for sid, _ in with_neurons], _neuron_flats([a for _, a in with_neurons], n_names)))
                n_off = _point(nptr_block[row], flats, n_off, [a.shape[-1] for _, a in with_neurons])
                neuron_parts.extend(flat for _, flat in flats)
            with_samples = [(sid, e.samples) for sid, e in zip(record_ids, entries) if e.samples is not None]
            if with_samples:
                flats = [(sid, np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)) for sid, samples in with_samples]
                s_off = _point(sptr_block[row], flats, s_off, [self._shape_id(tuple(samples.shape)) for _, samples in with_samples])
                sample_parts.extend(flat for _, flat in flats)
        r0 = m.rows
        tails = {
            fmt.RECORDS: self._write_open(fmt.RECORDS, rec_block, r0),
            fmt.RECORD_TIME: self._write_open(fmt.RECORD_TIME, time_block, r0),
            fmt.STATS: self._write_open(fmt.STATS, stats_block, r0),
            fmt.NEURONS_PTR: self._write_open(fmt.NEURONS_PTR, nptr_block, r0),
            fmt.SAMPLES_PTR: self._write_open(fmt.SAMPLES_PTR, sptr_block, r0),
        }
        if neuron_parts:
            tails[fmt.NEURONS] = self._write_open(fmt.NEURONS, neuron_parts, m.neurons_len)
        if sample_parts:
            tails[fmt.SAMPLES] = self._write_open(fmt.SAMPLES, sample_parts, m.samples_len)
        # only once every array holds the block: a failed write leaves the tails and the counts as they were,
        # and writing the block again rewrites the same whole chunks
        self._tails.update(tails)
        m.rows, m.neurons_len, m.samples_len = r0 + n, n_off, s_off
        if commit:
            self.commit()

    def _tail(self, array: Any, name: str, start: int) -> np.ndarray:
        """The values of the open chunk of ``name`` before ``start`` (committed ones): from memory, or read
        once from the store after a resume (rows past the manifest are not read: they are dropped)."""
        tail = self._tails.get(name)
        if tail is None:
            first = start // int(array.chunks[0]) * int(array.chunks[0])
            tail = np.asarray(array[first:start]) if start > first else np.empty((0, *array.shape[1:]), dtype=array.dtype)
        return tail

    def _write_open(self, name: str, block: np.ndarray | list[np.ndarray], start: int) -> np.ndarray:
        """Write ``block`` at ``start`` along the first axis of a growing array, as whole chunks: from the start
        of the open chunk (the tail kept in memory) to the end of the last chunk the block reaches, padded
        with the fill value. zarr then reads no chunk back. A flat array's block may come as its parts (one
        copy fewer than concatenating them). Of a statistics or pointer array, only the chunks of series that
        the block fills are written: the others hold what they held. Returns the new tail (not yet installed)."""
        array = self._array(name)
        chunk, fresh = int(array.chunks[0]), name not in self._tails
        parts = block if isinstance(block, list) else [block]
        trailing, dtype = parts[0].shape[1:], np.dtype(array.dtype)
        stop = start + sum(len(p) for p in parts)
        first, end = start // chunk * chunk, -(-stop // chunk) * chunk
        tail = self._tail(array, name, start)
        data = np.empty((end - first, *trailing), dtype=dtype)
        data[stop - first :] = array.fill_value
        if tail.shape[1:] != trailing:  # a new series widens the block
            data[: len(tail)] = array.fill_value
        data[(slice(0, len(tail)), *(slice(0, n) for n in tail.shape[1:]))] = tail
        # one call for ~2,000 parts; cast as np.asarray(part, dtype) would (a record's float64 neurons)
        np.concatenate(parts, axis=0, out=data[start - first : stop - first], casting="unsafe")
        capacity = _capacity(end, int(array.shape[0]), chunk)
        if tuple(array.shape) != (capacity, *trailing):
            array.resize((capacity, *trailing))
        # after a resume, the open chunks may hold rows past the manifest: all written once
        spans = None if data.ndim < 3 or fresh else _filled_spans(parts[0], array.fill_value, int(array.chunks[1]))
        encode = self._encoder(name, array)
        if encode is not None:  # local disk: the chunks' bytes straight to their files (store/chunks.py)
            for key, piece in chunks.whole_chunks(array, data, first, spans):
                if piece is None:
                    self.location.delete_bytes(key)
                else:
                    self.location.write_bytes(key, encode(piece))
        elif spans is None:
            array[first:end] = data
        else:
            for lo, hi in spans:
                array[first:end, lo:hi] = data[:, lo:hi]
        cut = stop // chunk * chunk
        return data[cut - first : stop - first].copy()

    def _encoder(self, name: str, array: Any) -> Any:
        """How ``name``'s chunks are encoded here (:func:`.chunks.encoder`), or None: zarr writes them (a
        remote store, where zarr's concurrent writes pay; codecs this package did not choose)."""
        if name not in self._encoders:
            local = isinstance(self.location, LocalRunLocation)
            self._encoders[name] = chunks.encoder(array) if local and self.layout.direct_chunks else None
        return self._encoders[name]

    def _trim(self) -> None:
        """Cut the growing arrays back to the manifest's counts (what they hold), as a finished run had them
        before arrays were allocated in whole chunks; only capacity past the committed values goes."""
        m = self.manifest
        for name, length in ((fmt.RECORDS, m.rows), (fmt.RECORD_TIME, m.rows), (fmt.STATS, m.rows),
                             (fmt.NEURONS_PTR, m.rows), (fmt.SAMPLES_PTR, m.rows),
                             (fmt.NEURONS, m.neurons_len), (fmt.SAMPLES, m.samples_len)):
            array = self._array(name)
            if int(array.shape[0]) > length:
                array.resize((length, *array.shape[1:]))
        self._tails.clear()  # a later append reads the open chunks back (the cut may have emptied them)

    def _write_rows(self, name: str, block: np.ndarray, start: int, stop: int) -> None:
        """Resize to ``stop`` rows and write ``block`` there: the scalars, appended rarely and in small blocks."""
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
        """Commit and mark the run finished or failed; a finished run's arrays are then cut back to what they
        hold (a failed one keeps its capacity, which readers ignore: the store may be what failed)."""
        self.commit()
        fields: dict[str, Any] = {"status": status, "finished": _now()}
        if error:
            fields["error"] = error
        self.update_meta(**fields)
        if status == "finished":
            self._trim()


def _capacity(need: int, have: int, chunk: int) -> int:
    """The length to allocate for ``need`` values: ``have`` while it is enough, else whole chunks and at least
    half as much again, so that an array growing by a block per commit is resized (a ``zarr.json`` rewrite)
    a logarithmic number of times, not at every commit."""
    if need <= have:
        return have
    return -(-max(need, have + have // 2) // chunk) * chunk


def _filled_spans(block: np.ndarray, fill: Any, group: int) -> list[tuple[int, int]]:
    """The ranges of series (columns of a ``(rows, series, k)`` block, in whole chunks of ``group`` series)
    where the block holds anything but ``fill``: the chunks a commit changes. A record holds few series
    with samples, so most chunks of ``samples_ptr`` stay as they are."""
    width = block.shape[1]
    empty = np.isnan(block) if np.isnan(fill) else block == fill
    used = np.zeros(-(-width // group) * group, dtype=bool)
    used[:width] = ~empty.all(axis=(0, 2))
    spans: list[tuple[int, int]] = []
    for g in np.flatnonzero(used.reshape(-1, group).any(axis=1)):
        lo, hi = int(g) * group, min((int(g) + 1) * group, width)
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans


def _key_fields(key: SeriesKey) -> tuple[str, str | None, int, str]:
    """A series key's fields, in the order of :class:`SeriesKey` (tests/test_writer_fast_paths.py holds them to it)."""
    return (key.node, key.role, key.iteration, key.view)


def _point(pointers: np.ndarray, parts: list[tuple[int, np.ndarray]], offset: int, second: list[int]) -> int:
    """Set one row's pointers ``(offset, second)`` of the series in ``parts`` (``(series, flat values)``, laid
    out one after the other from ``offset`` in the flat array); returns the offset after the last."""
    sizes = np.fromiter((flat.size for _, flat in parts), dtype=np.int64, count=len(parts))
    ends = np.cumsum(sizes) + offset
    series = np.fromiter((sid for sid, _ in parts), dtype=np.intp, count=len(parts))
    pointers[series, 0] = ends - sizes
    pointers[series, 1] = second
    return int(ends[-1])


def _neuron_flats(arrays: list[np.ndarray], n_names: int) -> list[np.ndarray]:
    """The per-neuron statistics of a record's entries as the run stores them (:func:`_neuron_blocks`). Where
    every array holds exactly ``n_names`` rows of its width (what current producers hand over), each is only
    flattened, a view where it can be: the dtype is cast when the parts are copied into the block
    (``_write_open``), as ``_neuron_blocks`` casts it."""
    if all(a.size == n_names * a.shape[-1] for a in arrays):
        return [a.reshape(-1) for a in arrays]
    return [_neuron_blocks(a, n_names) for a in arrays]


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
