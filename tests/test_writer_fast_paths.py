"""The writer's shortcuts over its per-record and per-chunk work, each held to the slow way it replaces: the
emptiness test that stops at a chunk's first or last value, blosc kept on the calling thread, and a record's
pointers set for all its series at once (with the entries that need the general path mixed in)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numcodecs
import numcodecs.blosc
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from comgra_callbacks import open_run
from comgra_callbacks.store import chunks
from comgra_callbacks.store.format import STAT_INDEX, STAT_NAMES, SeriesKey
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter, StoreLayout
from tests.test_writer_chunks import chunk_files

SMALL = StoreLayout(record_chunk=8, stats_rows=4, stats_series=2, flat_chunk=16, scalars_chunk=4)


@pytest.mark.parametrize("fill", [np.nan, -1])
def test_a_chunk_with_values_only_inside_is_not_empty(fill: float) -> None:
    dtype = np.float32 if isinstance(fill, float) else np.int64
    block = np.full((4, 3, 2), fill, dtype=dtype)
    assert chunks._is_fill(block, fill)
    block[2, 1, 0] = 5  # neither the first nor the last value: only the full test sees it
    assert not chunks._is_fill(block, fill)
    assert not chunks._is_fill(block[:, 1:], fill)  # a view that is not contiguous
    assert chunks._is_fill(block[:, 2:], fill)
    block[2, 1, 0] = fill
    block[0, 0, 0] = 5
    assert not chunks._is_fill(block, fill)
    block[0, 0, 0], block[-1, -1, -1] = fill, 5
    assert not chunks._is_fill(block, fill)


def test_a_chunk_with_one_value_in_its_middle_is_written() -> None:
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    array = group.create_array("a", shape=(8,), chunks=(4,), dtype="float32", fill_value=np.nan, compressors=None)
    data = np.full(8, np.nan, dtype=np.float32)
    data[5] = 1.0
    out = dict(chunks.whole_chunks(array, data, 0))
    assert out["a/c/0"] is None
    piece = out["a/c/1"]
    assert piece is not None and piece[1] == 1.0


@pytest.mark.parametrize("setting", [None, True, False])
def test_blosc_on_the_calling_thread_gives_the_same_bytes_and_puts_the_switch_back(tmp_path: Path, setting: bool | None) -> None:
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    codec = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=4)
    array = group.create_array("flat", shape=(262_144,), chunks=(262_144,), dtype="float32", fill_value=np.nan, compressors=codec)
    encode = chunks.encoder(array)
    assert encode is not None
    values = np.random.default_rng(0).standard_normal(262_144).astype(np.float32)
    before = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = setting
    try:
        mine = encode(values)
        assert numcodecs.blosc.use_threads is setting
        threaded = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=0, typesize=4).encode(values)  # blosc's threads, from the main thread
    finally:
        numcodecs.blosc.use_threads = before
    assert threading.current_thread() is threading.main_thread()
    assert mine == bytes(threaded)
    array[:] = values  # zarr's own write (its codec runs on a worker thread)
    assert (tmp_path / "g" / "flat" / "c" / "0").read_bytes() == mine


def entry(name: str, value: float, neurons: np.ndarray | None, samples: np.ndarray | None) -> HostEntry:
    stats = np.full(len(STAT_NAMES), value, dtype=np.float32)
    stats[STAT_INDEX["numel"]] = 6
    return HostEntry(SeriesKey(name, None, 0, "value"), stats, neurons, samples)


def mixed(step: int) -> HostRecord:
    """Series in an order that differs from the one the run first saw, with every kind of per-neuron array:
    float32 (the fast path), float64, a transposed view, a 3-D array, fewer rows than names; some series
    without neurons or samples."""
    width = 3
    base = np.arange(4 * width, dtype=np.float32).reshape(4, width) + step
    entries = [
        entry("fast", step + 0.1, base.copy(), np.full((2, width), step, np.float32)),
        entry("wide", step + 0.2, base.astype(np.float64), None),
        entry("view", step + 0.3, np.ascontiguousarray(base.T).T, np.full((1, 5), step + 1, np.float64)),
        entry("deep", step + 0.4, base.reshape(2, 2, width), None),
        entry("short", step + 0.5, base[:3].copy(), np.full((3,), step + 2, np.float32)),
        entry("bare", step + 0.6, None, None),
    ]
    if step % 2:
        entries.reverse()
    return HostRecord(step, "train", 0, step, 1_700_000_000.0 + step, "schedule", entries)


def full_rows(step: int) -> HostRecord:
    """``mixed`` without the entry of fewer rows than names: every per-neuron array takes the fast path, a
    float64 one first (the block's dtype must still be the array's)."""
    record = mixed(step)
    entries = [e for e in record.entries if e.key.node != "short"]
    entries.sort(key=lambda e: e.key.node != "wide")
    return HostRecord(step, "train", 0, step, record.time, "schedule", entries)


@pytest.mark.parametrize("make", [mixed, full_rows], ids=["mixed", "full-rows"])
def test_a_record_of_every_kind_of_entry_reads_back_as_written(tmp_path: Path, make: Any) -> None:
    writer = RunWriter(open_root(tmp_path).run("r"), layout=SMALL)
    writer.append([make(0), make(1), make(2)])
    writer.append([make(3)])
    writer.close("finished")
    run = open_run(tmp_path / "r")
    for step in range(4):
        base = np.arange(12, dtype=np.float32).reshape(4, 3) + step
        for name, offset in (("fast", 0.1), ("wide", 0.2), ("view", 0.3), ("deep", 0.4), ("short", 0.5), ("bare", 0.6))[: 6 if make is mixed else 4]:
            assert run.stats(name)["mean"][step] == pytest.approx(step + offset)
        for name in ("fast", "wide", "view", "deep"):
            np.testing.assert_array_equal(run.neurons(name, step).to_numpy().T, base, err_msg=name)
        np.testing.assert_array_equal(run.samples("fast", step), np.full((2, 3), step, np.float32))
        np.testing.assert_array_equal(run.samples("view", step), np.full((1, 5), step + 1, np.float32))
        if make is mixed:
            short = run.neurons("short", step).to_numpy().T
            np.testing.assert_array_equal(short[:3], base[:3])
            assert np.isnan(short[3]).all()  # the missing row reads as NaN
            np.testing.assert_array_equal(run.samples("short", step), np.full((3,), step + 2, np.float32))
        for name in ("wide", "deep", "bare"):
            with pytest.raises(KeyError, match="has no samples"):
                run.samples(name, step)
        with pytest.raises(KeyError, match="no per-neuron statistics"):
            run.neurons("bare", step)


@pytest.mark.parametrize("make", [mixed, full_rows], ids=["mixed", "full-rows"])
def test_every_kind_of_entry_gives_the_same_files_as_zarr(tmp_path: Path, make: Any) -> None:
    for direct in (False, True):
        layout = StoreLayout(**{**SMALL.__dict__, "direct_chunks": direct})
        writer = RunWriter(open_root(tmp_path / str(direct)).run("r"), layout=layout)
        writer.append([make(0), make(1), make(2)])
        writer.append([make(3), make(4)])
        writer.close("finished")
    assert chunk_files(tmp_path / "True" / "r") == chunk_files(tmp_path / "False" / "r")


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    location = open_root(tmp_path).run("r")
    location.write_bytes("a/c/0", b"old")
    with pytest.raises(TypeError):
        location.write_bytes("a/c/0", "not bytes")  # type: ignore[arg-type]
    assert (tmp_path / "r" / "a" / "c" / "0").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == ["0", "a", "c"]
    other = open_root(tmp_path).run("r")  # another location of the same run (a resumed writer)
    for loc, data in ((location, b"one"), (other, b"two"), (location, b"three")):
        loc.write_bytes("a/c/1", data)
        assert (tmp_path / "r" / "a" / "c" / "1").read_bytes() == data
    assert not list((tmp_path / "r").rglob("*.partial"))


def test_series_are_found_by_every_field_of_their_key(tmp_path: Path) -> None:
    """The writer looks series up by their key's fields as a tuple: a field added to SeriesKey must be added
    there too, and keys that differ in any one field are different series."""
    import dataclasses

    from comgra_callbacks.store import writer as writer_module

    assert [f.name for f in dataclasses.fields(SeriesKey)] == ["node", "role", "iteration", "view"]
    key = SeriesKey("n", "r", 1, "value")
    assert writer_module._key_fields(key) == dataclasses.astuple(key)
    keys = [key, SeriesKey("m", "r", 1, "value"), SeriesKey("n", "s", 1, "value"), SeriesKey("o", None, 1, "value"), SeriesKey("n", "r", 2, "value"), SeriesKey("n", "r", 1, "grad")]
    writer = RunWriter(open_root(tmp_path).run("r"), layout=SMALL)
    for step in range(3):  # new key objects at every record, as the writer process decodes them
        entries = [HostEntry(SeriesKey(k.node, k.role, k.iteration, k.view), np.full(len(STAT_NAMES), step * 10 + i, np.float32)) for i, k in enumerate(keys)]
        writer.append([HostRecord(step, "train", 0, step, 0.0, "schedule", entries[::-1] if step == 1 else entries)])
    assert writer.manifest.series == keys
    writer.close("finished")
    run = open_run(tmp_path / "r")
    for i, k in enumerate(keys):
        got = run.stats(k.node, role=k.role, iteration=k.iteration, view=k.view)["mean"].tolist()
        assert got == [i, 10 + i, 20 + i], k



def test_blosc_off_the_main_thread_gives_the_same_bytes(tmp_path: Path) -> None:
    """A thread writer encodes on its own thread (where blosc uses no threads anyway, and the switch is left
    alone): the same bytes as blosc's own encode, and the switch as it was."""
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    codec = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=4)
    array = group.create_array("flat", shape=(1024,), chunks=(1024,), dtype="float32", fill_value=np.nan, compressors=codec)
    encode = chunks.encoder(array)
    assert encode is not None
    before = numcodecs.blosc.use_threads
    values = np.arange(1024, dtype=np.float32)
    out: list[bytes] = []
    thread = threading.Thread(target=lambda: out.append(encode(values)))
    thread.start()
    thread.join()
    assert numcodecs.blosc.use_threads is before
    assert out == [bytes(numcodecs.Blosc(cname="lz4", clevel=5, shuffle=0, typesize=4).encode(values))]


def test_a_crash_between_chunk_writes_then_a_resume_reads_what_was_committed(tmp_path: Path) -> None:
    """The process dies part-way through a commit's chunk files (here: the samples array cannot be written,
    after the statistics, pointers and per-neuron chunks of the block were): a reader sees the committed
    rows only, and a resumed writer drops the rest and carries on."""
    import shutil

    from tests.test_writer_open_chunks import check_run, record

    location = open_root(tmp_path).run("r")
    writer = RunWriter(location, layout=SMALL)
    writer.append([record(s) for s in range(6)])
    samples, aside = tmp_path / "r" / "samples", tmp_path / "aside"
    shutil.copytree(samples, aside)
    shutil.rmtree(samples)
    samples.write_text("not a directory")
    with pytest.raises(OSError):
        writer.append([record(s) for s in range(100, 105)])
    del writer  # the process dies here: rows of steps 100..104 are in some chunk files, not in the manifest
    samples.unlink()
    aside.rename(samples)
    check_run(tmp_path / "r", list(range(6)))
    resumed = RunWriter(location, resume=True, layout=SMALL)
    resumed.append([record(s) for s in range(6, 11)])
    check_run(tmp_path / "r", list(range(11)))
    resumed.close("finished")
    check_run(tmp_path / "r", list(range(11)))
