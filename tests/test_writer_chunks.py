"""The writer's own chunk writes (store/chunks.py): the same files, byte for byte, as zarr writes for the same
records, in every layout the package makes (each flat codec, chunks cut by the arrays' edges, a series that
appears late, sparse pointers, a resume after a crash); and zarr's own write where the codecs are not ones
it knows."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from comgra_callbacks.store import chunks
from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostRecord, RunWriter, StoreLayout
from tests.test_writer_open_chunks import check_run, record

# 3 series (4 from step 5 on) in chunks of 2, rows in chunks of 4, flat arrays in chunks of 16: every array has
# chunks cut by its edge, and blocks that start and end inside chunks
SMALL = dict(record_chunk=8, stats_rows=4, stats_series=2, flat_chunk=16, scalars_chunk=4)


def chunk_files(run: Path) -> dict[str, str]:
    """Every chunk file of a run, by its path in the run, with a digest of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file() and "/c/" in str(p.relative_to(run)) + "/"}


def sparse(step: int) -> HostRecord:
    """``record`` with only some series holding neurons or samples: pointer chunks that stay empty."""
    rec = record(step)
    entries = [dataclasses.replace(e, neurons=None if i % 2 else e.neurons, samples=None if i != 1 else e.samples) for i, e in enumerate(rec.entries)]
    return dataclasses.replace(rec, entries=entries)


def write(root: Path, direct: bool, codec: str, blocks: list[list[HostRecord]]) -> RunWriter:
    writer = RunWriter(open_root(root).run("r"), layout=StoreLayout(**SMALL, flat_codec=codec, direct_chunks=direct))  # type: ignore[arg-type]
    for block in blocks:
        writer.append(block)
    return writer


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
@pytest.mark.parametrize("make", [record, sparse], ids=["full", "sparse"])
def test_same_files_as_zarr(tmp_path: Path, codec: str, make: object) -> None:
    blocks = [[make(s) for s in range(first, min(first + 3, 14))] for first in range(0, 14, 3)]  # type: ignore[operator]
    by_zarr = write(tmp_path / "zarr", False, codec, blocks)
    direct = write(tmp_path / "direct", True, codec, blocks)
    assert direct._encoders and all(e is not None for e in direct._encoders.values())  # the direct path ran
    assert all(e is None for e in by_zarr._encoders.values())
    files = chunk_files(tmp_path / "direct" / "r")
    assert files == chunk_files(tmp_path / "zarr" / "r")
    assert any(name.startswith(fmt.SAMPLES_PTR) for name in files)
    for writer in (by_zarr, direct):
        writer.close("finished")
    assert chunk_files(tmp_path / "direct" / "r") == chunk_files(tmp_path / "zarr" / "r")
    if make is record:
        check_run(tmp_path / "direct" / "r", list(range(14)))


def test_resume_after_a_crash_matches_zarr(tmp_path: Path) -> None:
    """Rows written past the manifest (a crash before the commit) are dropped on resume; the next block
    rewrites the open chunks, deleting the ones that now hold only the fill value, exactly as zarr does."""
    for direct in (False, True):
        root = tmp_path / ("direct" if direct else "zarr")
        writer = write(root, direct, "lz4", [[sparse(s) for s in range(3)]])
        writer.append([record(s) for s in range(3, 6)], commit=False)  # never committed: the process dies here
        resumed = RunWriter(open_root(root).run("r"), resume=True, layout=StoreLayout(**SMALL, direct_chunks=direct))  # type: ignore[arg-type]
        resumed.append([sparse(s) for s in range(3, 7)])
        resumed.close("finished")
    assert chunk_files(tmp_path / "direct" / "r") == chunk_files(tmp_path / "zarr" / "r")


def test_an_emptied_chunk_is_deleted(tmp_path: Path) -> None:
    """An uncommitted chunk that the resumed block leaves empty must not survive: its stale rows would become
    visible once the manifest counts them."""
    def no_samples(step: int) -> HostRecord:
        r = record(step)
        return dataclasses.replace(r, entries=[dataclasses.replace(e, samples=None) for e in r.entries])

    root = tmp_path / "run"
    writer = write(root, True, "lz4", [[no_samples(s) for s in range(2)]])  # rows 0..1: no sample pointers
    writer.append([record(s) for s in range(2, 4)], commit=False)  # rows 2..3 with samples, never committed
    stale = root / "r" / fmt.SAMPLES_PTR / "c" / "0" / "0" / "0"
    assert stale.exists()
    resumed = RunWriter(open_root(root).run("r"), resume=True, layout=StoreLayout(**SMALL))  # type: ignore[arg-type]
    resumed.append([no_samples(2), no_samples(3)])  # the chunk is all fill now
    assert not stale.exists()
    resumed.close("finished")
    pointers = zarr.open_array(str(root / "r"), path=fmt.SAMPLES_PTR, mode="r", zarr_format=3)
    np.testing.assert_array_equal(pointers[0:4, :, 0], -1)  # nothing stale shows


def test_unknown_codecs_are_left_to_zarr(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    plain = group.create_array("plain", shape=(8, 4), chunks=(4, 4), dtype="float32", fill_value=np.nan, compressors=ZstdCodec(level=3))
    checked = group.create_array("checked", shape=(8,), chunks=(4,), dtype="float32", fill_value=0.0, serializer=BytesCodec(), compressors=[ZstdCodec(level=1), Crc32cCodec()])
    sharded = group.create_array("sharded", shape=(8, 4), chunks=(2, 4), shards=(4, 4), dtype="float32", fill_value=np.nan)
    assert chunks.encoder(plain) is not None
    assert chunks.encoder(checked) is None
    assert chunks.encoder(sharded) is None


def test_edge_chunks_are_padded_and_empty_ones_named(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    array = group.create_array("a", shape=(8, 5, 2), chunks=(4, 2, 2), dtype="float32", fill_value=np.nan, compressors=None)
    data = np.full((4, 5, 2), np.nan, dtype=np.float32)
    data[:, 4] = 7.0  # only the edge chunk (series 4, cut at 5) holds values
    out = dict(chunks.whole_chunks(array, data, 4))
    assert sorted(out) == ["a/c/1/0/0", "a/c/1/1/0", "a/c/1/2/0"]
    assert out["a/c/1/0/0"] is None and out["a/c/1/1/0"] is None
    edge = out["a/c/1/2/0"]
    assert edge is not None and edge.shape == (4, 2, 2)
    np.testing.assert_array_equal(edge[:, 0], 7.0)
    assert np.isnan(edge[:, 1]).all()
    assert sorted(dict(chunks.whole_chunks(array, data, 4, [(4, 5)]))) == ["a/c/1/2/0"]


def test_a_removed_directory_is_made_again(tmp_path: Path) -> None:
    """The location remembers the directories it made; one removed meanwhile is made again, not an error."""
    import shutil

    location = open_root(tmp_path).run("r")
    location.write_bytes("x/c/0", b"one")
    shutil.rmtree(tmp_path / "r" / "x")
    location.write_bytes("x/c/0", b"two")
    assert (tmp_path / "r" / "x" / "c" / "0").read_bytes() == b"two"
    assert not [p for p in (tmp_path / "r").rglob("*.partial")]

