"""Whole chunks of a Zarr array encoded with the array's own codecs and put in the store directly.

Why: the writer (:mod:`comgra_callbacks.store.writer`) only ever writes whole chunks, from memory. zarr's
``array[...] = block`` spends ~1 ms of CPU a chunk on that in its event loop (a task per chunk, a thread-pool
hop for each codec, an emptiness check, a ``mkdir`` per file), and a commit writes ~40-60 chunks: most of the
writer's fixed cost per commit, which the training's own threads lose (measured: ``docs/benchmarks.md``, "The
writer's chunks without zarr's event loop"). Here a chunk is the array's bytes in C order, compressed by the
same numcodecs codec zarr would call, with zarr's own key (``array.metadata.encode_chunk_key``), written
atomically through the run's :class:`~comgra_callbacks.store.storage.RunLocation` (local disk or fsspec).

Only the codec chains this package creates are encoded here: ``bytes`` (little-endian) alone, or followed by
``zstd`` or ``blosc``. For any other chain (an array written by another tool, sharding, a checksum codec)
:func:`encoder` returns None and the caller writes through zarr. A chunk holding only the fill value is not
written, and one stored before is deleted, as zarr does (``array.write_empty_chunks`` is False), so a
reader's checks for deleted chunks see the same files either way. ``tests/test_writer_chunks.py`` holds the bytes to zarr's.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def encoder(array: Any) -> Callable[[np.ndarray], bytes] | None:
    """The function that turns one whole chunk of ``array`` (an ndarray of the chunk's shape and the array's
    dtype) into the bytes zarr stores for it; None where the array's codecs are not ones this module knows."""
    import numcodecs

    if sys.byteorder != "little" or getattr(array, "shards", None):
        return None
    codecs = [codec.to_dict() for codec in array.metadata.codecs]
    if not codecs or codecs[0].get("name") != "bytes" or codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    if len(codecs) == 1:
        return lambda chunk: np.ascontiguousarray(chunk).tobytes()
    if len(codecs) != 2:
        return None
    name, config = codecs[1].get("name"), dict(codecs[1].get("configuration", {}))
    if name == "zstd" and set(config) <= {"level", "checksum"}:
        zstd = numcodecs.Zstd(level=int(config.get("level", 0)), checksum=bool(config.get("checksum", False)))
        return lambda chunk: bytes(zstd.encode(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)))
    if name == "blosc" and set(config) <= {"typesize", "cname", "clevel", "shuffle", "blocksize"} and config.get("shuffle") in _SHUFFLES:
        blosc = numcodecs.Blosc(
            cname=str(config["cname"]), clevel=int(config["clevel"]), shuffle=_SHUFFLES[config["shuffle"]],
            blocksize=int(config.get("blocksize", 0)), typesize=config.get("typesize"),
        )
        return lambda chunk: _blosc_alone(blosc, np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
    return None


def _blosc_alone(blosc: Any, raw: np.ndarray) -> bytes:
    """``blosc.encode(raw)`` on the calling thread only. Called from a process's main thread (the writer
    process), numcodecs lets blosc split a chunk across its own threads: 0.40-0.55 ms of CPU for a 1 MiB
    chunk of float32 instead of 0.18 (measured here; the threads' hand-offs cost more than the lz4 they
    share), and that CPU is taken from training. The bytes are the same either way: blosc compresses each
    block alone. ``use_threads`` is numcodecs' public switch; it is set only where blosc would use its
    threads (on a thread writer, off the main thread, it would not) and put back at once."""
    import numcodecs.blosc

    before = numcodecs.blosc.use_threads
    if before is False or (before is None and threading.current_thread() is not threading.main_thread()):
        return bytes(blosc.encode(raw))
    numcodecs.blosc.use_threads = False
    try:
        return bytes(blosc.encode(raw))
    finally:
        numcodecs.blosc.use_threads = before


def _is_fill(block: np.ndarray, fill: Any) -> bool:
    """Whether every value of ``block`` is ``fill`` (NaN matching NaN). A chunk the writer writes almost
    always holds values from its first one (the open chunk's committed rows, or new rows), so its first and
    last values settle it without the full scan that numpy's ``all`` would make."""
    ends = (block[(0,) * block.ndim], block[(-1,) * block.ndim]) if block.size else ()
    if isinstance(fill, float | np.floating) and np.isnan(fill):
        if not all(np.isnan(value) for value in ends):
            return False
        return bool(np.isnan(block).all())
    if not all(value == fill for value in ends):
        return False
    return bool((block == fill).all())


def whole_chunks(array: Any, data: np.ndarray, first: int, spans: list[tuple[int, int]] | None = None) -> Iterator[tuple[str, np.ndarray | None]]:
    """``(key, chunk)`` for each chunk that ``data`` fills: rows ``first:first + len(data)`` of ``array``
    (both on chunk boundaries), every other axis from 0, and of the second axis only ``spans`` (on chunk
    boundaries; None: all of it). A chunk cut by the array's edge is padded with the fill value to the
    chunk's shape, as zarr stores it. A chunk holding only the fill value comes as None: zarr stores none
    for it (and deletes one stored before)."""
    chunks = tuple(int(c) for c in array.chunks)
    fill = array.fill_value
    ranges: list[Any] = [range(first // chunks[0], (first + len(data)) // chunks[0])]
    if data.ndim > 1:
        wanted = spans if spans is not None else [(0, data.shape[1])]
        ranges.append(sorted({c for lo, hi in wanted for c in range(lo // chunks[1], -(-hi // chunks[1]))}))
        ranges += [range(-(-n // c)) for n, c in zip(data.shape[2:], chunks[2:])]
    for pos in itertools.product(*ranges):
        at = (pos[0] * chunks[0] - first, *(p * c for p, c in zip(pos[1:], chunks[1:])))
        piece = data[tuple(slice(a, a + c) for a, c in zip(at, chunks))]
        if piece.shape != chunks:  # the array's edge: stored at the chunk's full shape
            padded = np.full(chunks, fill, dtype=data.dtype)
            padded[tuple(slice(0, n) for n in piece.shape)] = piece
            piece = padded
        yield f"{array.path}/{array.metadata.encode_chunk_key(pos)}", None if _is_fill(piece, fill) else piece
