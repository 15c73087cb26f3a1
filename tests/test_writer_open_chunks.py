"""The writer's cheap commit: whole chunks written from memory (none read back), arrays allocated in whole
chunks while a run is open, cut back at the end; and what that must not change: what readers see, crashes
between rows and manifest, resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from comgra_callbacks import open_run
from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.format import STAT_NAMES, SeriesKey
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter, StoreLayout

N = len(STAT_NAMES)
SMALL = StoreLayout(record_chunk=8, stats_rows=4, stats_series=2, flat_chunk=16, scalars_chunk=4)
GROWING = (fmt.RECORDS, fmt.RECORD_TIME, fmt.STATS, fmt.NEURONS_PTR, fmt.SAMPLES_PTR, fmt.NEURONS, fmt.SAMPLES)


def record(step: int, n_nodes: int = 3, width: int = 3) -> HostRecord:
    """Every value encodes its step; a node ``late`` appears from step 5 on (a new series widens the arrays)."""
    entries = []
    for i in range(n_nodes + (step >= 5)):
        name = f"node{i}" if i < n_nodes else "late"
        stats = np.full(N, step * 10 + i, dtype=np.float32)
        stats[fmt.STAT_INDEX["numel"]] = 6
        neurons = np.full((4, width), step + i / 10, dtype=np.float32)
        samples = np.arange(2 * width, dtype=np.float32).reshape(2, width) + 100 * step + i
        entries.append(HostEntry(SeriesKey(name, None, 0, "value"), stats, neurons, samples))
    return HostRecord(step, "train", 0, step, 1_700_000_000.0 + step, "schedule", entries)


def check_run(path: Path, steps: list[int]) -> None:
    """What a reader sees is exactly what was committed, value by value."""
    run = open_run(path)
    assert run.steps["step"].tolist() == steps
    assert run.stats("node1")["mean"].tolist() == [s * 10 + 1 for s in steps]
    late = [s for s in steps if s >= 5]
    assert run.stats("late")["mean"].tolist() == [s * 10 + 3 for s in late]
    for s in steps:
        np.testing.assert_array_equal(run.samples("node2", s), np.arange(6, dtype=np.float32).reshape(2, 3) + 100 * s + 2)
        np.testing.assert_allclose(run.neurons("node0", s)["mean"].to_numpy(), np.full(3, s, dtype=np.float32))
        if s >= 5:
            np.testing.assert_allclose(run.neurons("late", s)["mean"].to_numpy(), np.full(3, s + 0.3, dtype=np.float32))


def raw(path: Path, name: str) -> Any:
    return zarr.open_array(LocalStore(str(path)), path=name, mode="r", zarr_format=3)


class CountingStore(LocalStore):
    """A real local store that counts the chunk reads (``get`` of a key under ``<array>/c/``)."""

    chunk_gets = 0

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        if "/c/" in key:
            type(self).chunk_gets += 1
        return await super().get(key, *args, **kwargs)


def test_commits_read_no_chunk_back(tmp_path: Path) -> None:
    """Blocks that end inside a chunk and start inside one: every commit writes whole chunks from memory."""
    writer = RunWriter(open_root(tmp_path).run("r"), layout=SMALL)
    writer.group = zarr.open_group(CountingStore(str(tmp_path / "r")), mode="r+", zarr_format=3, use_consolidated=False)
    writer._arrays.clear()
    CountingStore.chunk_gets = 0
    for first in range(0, 13, 3):
        writer.append([record(s) for s in range(first, first + 3)])
    assert CountingStore.chunk_gets == 0
    writer.close("finished")
    check_run(tmp_path / "r", list(range(15)))


def test_open_arrays_are_allocated_in_whole_chunks_and_readers_read_the_manifest(tmp_path: Path) -> None:
    writer = RunWriter(open_root(tmp_path).run("r"), layout=SMALL)
    for first in range(0, 9, 3):
        writer.append([record(s) for s in range(first, first + 3)])
    m = writer.manifest
    for name, length in ((fmt.STATS, m.rows), (fmt.RECORDS, m.rows), (fmt.NEURONS, m.neurons_len), (fmt.SAMPLES, m.samples_len)):
        array = raw(tmp_path / "r", name)
        assert array.shape[0] >= length and array.shape[0] % array.chunks[0] == 0, name
    assert raw(tmp_path / "r", fmt.STATS).shape[0] > m.rows  # 9 rows in chunks of 4: capacity past the rows
    check_run(tmp_path / "r", list(range(9)))  # a live reader, the writer still open
    writer.close("finished")
    for name, length in ((fmt.STATS, m.rows), (fmt.RECORDS, m.rows), (fmt.NEURONS, m.neurons_len), (fmt.SAMPLES, m.samples_len)):
        assert raw(tmp_path / "r", name).shape[0] == length, name  # a finished run: exactly what it holds
    check_run(tmp_path / "r", list(range(9)))


def test_crash_between_rows_and_manifest_then_resume(tmp_path: Path) -> None:
    """Rows written past the manifest into over-allocated arrays are invisible, and dropped by the resume:
    the rows that replace them are read back, not the stale ones."""
    location = open_root(tmp_path).run("r")
    writer = RunWriter(location, layout=SMALL)
    writer.append([record(s) for s in range(6)])
    writer.append([record(s) for s in range(100, 105)], commit=False)  # a crash before the manifest
    del writer
    assert raw(tmp_path / "r", fmt.STATS).shape[0] > 6
    check_run(tmp_path / "r", list(range(6)))
    resumed = RunWriter(location, resume=True, layout=SMALL)
    assert resumed._array(fmt.STATS).shape[0] == 6  # truncated to the manifest
    resumed.append([record(s) for s in range(6, 8)])  # into the open chunk (rows 4..7), read back from the store
    check_run(tmp_path / "r", list(range(8)))
    stale = np.asarray(raw(tmp_path / "r", fmt.STATS)[8:12])
    assert np.isnan(stale).all()  # the crashed rows 8..10 are gone from the chunk that held them
    resumed.append([record(s) for s in range(8, 11)])
    resumed.close("finished")
    check_run(tmp_path / "r", list(range(11)))


def sparse(step: int, rare: bool) -> HostRecord:
    """Series 0..3 with statistics only; ``rare`` (the fifth series, a chunk of series of its own in ``SMALL``)
    adds samples and per-neuron values."""
    out = record(step, n_nodes=4, width=3)
    out.entries = [HostEntry(e.key, e.stats) for e in out.entries if e.key.node != "late"]
    if rare:
        stats = np.full(N, -step, dtype=np.float32)
        stats[fmt.STAT_INDEX["numel"]] = 6
        out.entries.append(HostEntry(SeriesKey("rare", None, 0, "value"), stats, np.full((4, 3), step, np.float32), np.full((2, 3), step, np.float32)))
    return out


def test_untouched_series_chunks_keep_their_values_and_a_resume_drops_stale_ones(tmp_path: Path) -> None:
    """A commit writes only the series chunks its rows fill; after a crash that wrote pointers of ``rare``
    past the manifest, the resumed writer's rows (without ``rare``) must not inherit them."""
    location = open_root(tmp_path).run("r")
    writer = RunWriter(location, layout=SMALL)
    writer.append([sparse(0, True), sparse(1, False)])
    writer.append([sparse(2, False), sparse(3, False), sparse(4, False)])  # rare's chunk not written: keeps step 0
    writer.append([sparse(5, True), sparse(6, True)], commit=False)  # a crash before the manifest
    del writer
    resumed = RunWriter(location, resume=True, layout=SMALL)
    resumed.append([sparse(5, False), sparse(6, False)])
    live = open_run(tmp_path / "r")
    assert live.stats("rare")["mean"].to_dict() == {0: 0.0}
    with pytest.raises(KeyError, match="not recorded"):
        live.samples("rare", 5)
    resumed.append([sparse(7, True)])
    resumed.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == list(range(8))
    assert run.stats("rare")["mean"].to_dict() == {0: 0.0, 7: -7.0}
    assert run.stats("node3")["mean"].tolist() == [s * 10 + 3 for s in range(8)]
    for step in (0, 7):
        np.testing.assert_array_equal(run.samples("rare", step), np.full((2, 3), step, np.float32))
        np.testing.assert_allclose(run.neurons("rare", step)["mean"].to_numpy(), np.full(3, step, np.float32))
    for step in (1, 5, 6):
        with pytest.raises(KeyError, match="not recorded"):
            run.samples("rare", step)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_resume_mid_chunk_keeps_every_row(tmp_path: Path, split: int) -> None:
    """A run closed (or killed) inside a chunk: the resumed writer's first commit rewrites that chunk whole
    from what it read back, so none of the rows before it is lost."""
    location = open_root(tmp_path).run("r")
    writer = RunWriter(location, layout=SMALL)
    writer.append([record(s) for s in range(split)])
    if split % 2:
        writer.close("finished")  # arrays cut back to the rows
    del writer
    resumed = RunWriter(location, resume=True, layout=SMALL)
    for first in range(split, 12, 3):
        resumed.append([record(s) for s in range(first, min(first + 3, 12))])
    resumed.close("finished")
    check_run(tmp_path / "r", list(range(12)))


def test_a_failed_write_leaves_the_block_writable_again(tmp_path: Path) -> None:
    """A write that fails part-way (a real I/O error on the last array written) changes neither the counts nor
    the open chunks: the same block appended again lands whole."""
    writer = RunWriter(open_root(tmp_path).run("r"), layout=SMALL)
    writer.append([record(s) for s in range(3)])
    samples, aside = tmp_path / "r" / fmt.SAMPLES, tmp_path / "aside"
    samples.rename(aside)
    samples.write_text("not a directory")
    with pytest.raises(OSError):
        writer.append([record(s) for s in range(3, 6)])
    assert writer.manifest.rows == 3
    samples.unlink()
    aside.rename(samples)
    writer.append([record(s) for s in range(3, 6)])
    writer.append([record(s) for s in range(6, 9)])
    writer.close("finished")
    check_run(tmp_path / "r", list(range(9)))


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_flat_codecs_read_back_the_same(tmp_path: Path, codec: str) -> None:
    writer = RunWriter(open_root(tmp_path).run("r"), layout=StoreLayout(flat_chunk=64, flat_codec=codec))  # type: ignore[arg-type]
    writer.append([record(s) for s in range(7)])
    writer.close("finished")
    check_run(tmp_path / "r", list(range(7)))


def test_bad_flat_codec_is_named() -> None:
    with pytest.raises(ValueError, match=r"`StoreLayout\(flat_codec=...\)`: expected one of \['lz4', 'zstd', 'none'\], got 'gzip'"):
        StoreLayout(flat_codec="gzip")  # type: ignore[arg-type]
