"""The writer process: ``python -m comgra_callbacks.recording.worker RING SIZE``, started by ProcessWriter.

It owns the run's store. From its standard input it reads one JSON line to start (where the run is, its
metadata) and then one JSON line per message; the tensors of a recorded step are in the shared ring
(:mod:`.ring`). It computes the statistics with numpy (it never imports torch), appends blocks of records,
writes sidecars, and advances the ring's *consumed* counter. It answers the start with one JSON line on
standard output: ``{"ready": true}`` or ``{"error": "..."}``.

When its standard input ends without a ``close`` message (the training process died), it commits what it
received and exits; the run's status stays ``"running"``.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np

from comgra_callbacks.recording import reduce_numpy as rn
from comgra_callbacks.recording.ring import CLOSED, CONSUMED, FLUSHED, RECORDS, Ring
from comgra_callbacks.store.format import STAT_INDEX, SeriesKey
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter

FULL = -1
OPS = frozenset({"write_graph", "write_modules", "add_notes", "add_scalars", "start_segment", "update_meta", "commit"})


def reduce_record(ring: Ring, msg: dict[str, Any], items: list[Any]) -> HostRecord:
    """Turn a ``record`` message (raw tensors in the ring at ``msg["base"]``, described by ``items``, the
    layout it names) into a HostRecord; nothing refers to the ring afterwards."""
    step, step_type, epoch, batch_idx, when, reason = msg["meta"]
    record = HostRecord(int(step), str(step_type), int(epoch), int(batch_idx), float(when), str(reason))
    index = None if msg.get("sample_index") is None else np.asarray(msg["sample_index"], dtype=np.int64)
    batch_size = msg.get("batch_size")
    base = int(msg["base"])
    arrays = [ring.array(base + int(it[7]), np.dtype(it[5]), tuple(it[6])) for it in items]
    rows = [rn.stats_numpy(a) for a in arrays]
    for it, row in zip(items, rows):  # update-to-weight ratio, from the weight's own row
        ref = it[11]
        if ref is not None:
            ref_l2 = float(rows[int(ref)][STAT_INDEX["l2"]])
            l2 = float(row[STAT_INDEX["l2"]])
            row[STAT_INDEX["update_ratio"]] = l2 / ref_l2 if ref_l2 > 0 else (np.inf if l2 > 0 else 0.0)
    for it, a, row in zip(items, arrays, rows):
        node, role, iteration, view, dtype, _, _, _, is_param, neurons_wanted, samples = it[:11]
        neurons = None
        if neurons_wanted:
            axis = it[12] if len(it) > 12 else None  # the neurons' axis (None: the last)
            matrix = rn.neuron_matrix_numpy(a, is_parameter=bool(is_param), axis=None if axis is None else int(axis))
            if matrix is not None:
                bad = row[STAT_INDEX["nan_count"]] + row[STAT_INDEX["inf_count"]] > 0
                neurons = rn.neurons_numpy(matrix, has_nonfinite=bool(bad))
        chosen = None
        if samples:
            if samples == FULL or a.ndim == 0:
                chosen = a
            elif index is not None and not is_param and batch_size is not None and a.shape[0] == batch_size:
                chosen = a[index]
            else:
                chosen = a[: int(samples)]
            chosen = np.array(chosen, dtype=np.float32, copy=True)
        key = SeriesKey(str(node), None if role is None else str(role), int(iteration), str(view))
        record.entries.append(HostEntry(key, row, neurons, chosen, str(dtype)))
    return record


def unpack_record(ring: Ring, msg: dict[str, Any]) -> HostRecord:
    """A ``packed`` message: statistics already computed on a device; copy the pieces out of the ring."""
    step, step_type, epoch, batch_idx, when, reason = msg["meta"]
    record = HostRecord(int(step), str(step_type), int(epoch), int(batch_idx), float(when), str(reason))
    layout = msg["layout"]
    flat = ring.array(int(msg["offset"]), np.float32, (int(msg["length"]),))
    n = len(layout)
    stats_block = flat[: n * rn.N_STATS].reshape(n, rn.N_STATS).copy()
    offset = n * rn.N_STATS
    for i, (node, role, iteration, view, dtype, neuron_shape, sample_shape) in enumerate(layout):
        pieces: list[np.ndarray | None] = []
        for shape in (neuron_shape, sample_shape):
            if shape is None:
                pieces.append(None)
                continue
            size = int(np.prod(shape)) if shape else 1
            pieces.append(flat[offset : offset + size].reshape(shape).copy())
            offset += size
        key = SeriesKey(str(node), None if role is None else str(role), int(iteration), str(view))
        record.entries.append(HostEntry(key, stats_block[i], pieces[0], pieces[1], str(dtype)))
    return record


class Worker:
    def __init__(self, ring: Ring, writer: RunWriter, flush_rows: int, flush_bytes: int, flush_secs: float) -> None:
        self.ring, self.writer = ring, writer
        self.flush_rows, self.flush_bytes, self.flush_secs = flush_rows, flush_bytes, flush_secs
        self.pending: list[HostRecord] = []
        self.pending_bytes = 0
        self.last_flush = time.monotonic()
        self.failed = False
        self.layouts: dict[int, list[Any]] = {}

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        self.ring.set_error(f"{type(exc).__name__}: {exc}")
        traceback.print_exception(exc, file=sys.stderr)

    def append_pending(self) -> None:
        if self.pending and not self.failed:
            try:
                self.writer.append(self.pending)
            except Exception as exc:
                self.fail(exc)
        self.pending, self.pending_bytes, self.last_flush = [], 0, time.monotonic()

    def handle(self, msg: dict[str, Any]) -> bool:
        """Handle one message; False when the run is closed."""
        op = msg.get("op")
        if op in ("record", "packed"):
            try:
                if not self.failed:
                    record = reduce_record(self.ring, msg, self.layouts[int(msg["layout"])]) if op == "record" else unpack_record(self.ring, msg)
                    self.pending.append(record)
                    self.pending_bytes += int(msg.get("nbytes", 0))
                    self.ring.header[RECORDS] += 1
            except Exception as exc:
                self.fail(exc)
            finally:
                self.ring.header[CONSUMED] = int(msg["end"])  # the trainer may reuse the space
            if len(self.pending) >= self.flush_rows or self.pending_bytes >= self.flush_bytes:
                self.append_pending()
        elif op == "layout":
            self.layouts = {int(msg["id"]): msg["items"]}  # only the newest is used from now on
        elif op == "flush":
            self.append_pending()
            self.ring.header[FLUSHED] = int(msg["id"])
        elif op == "close":
            self.append_pending()
            try:
                self.writer.close(msg.get("status", "finished"), msg.get("error"))
            except Exception as exc:
                self.fail(exc)
            self.ring.header[CLOSED] = 1
            return False
        elif op in OPS:
            if not self.failed:
                try:
                    getattr(self.writer, op)(*msg.get("args", []))
                except Exception as exc:
                    self.fail(exc)
        else:
            self.fail(ValueError(f"unknown message {op!r}"))
        return True

    def run(self, messages: queue.Queue[dict[str, Any] | None]) -> None:
        while True:
            timeout = None
            if self.pending:
                timeout = max(self.flush_secs - (time.monotonic() - self.last_flush), 0.0)
            try:
                msg = messages.get(timeout=timeout)
            except queue.Empty:
                self.append_pending()
                continue
            if msg is None:  # the training process is gone: keep what was received
                self.append_pending()
                return
            if not self.handle(msg):
                return


def _read_lines(stream: Any, out: queue.Queue[dict[str, Any] | None]) -> None:
    for line in stream:
        if line.strip():
            out.put(json.loads(line))
    out.put(None)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    ring = Ring.attach(args[0], int(args[1]))
    start = json.loads(sys.stdin.readline())
    try:
        location = open_root(start["root"], start.get("storage_options")).run(start["run"])
        writer = RunWriter(location, meta=start.get("meta"), resume=bool(start.get("resume")))
    except Exception as exc:
        print(json.dumps({"error": f"{exc}", "type": type(exc).__name__}), flush=True)
        return 1
    print(json.dumps({"ready": True}), flush=True)
    messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(sys.stdin, messages), daemon=True).start()
    Worker(ring, writer, int(start["flush_rows"]), int(start["flush_bytes"]), float(start["flush_secs"])).run(messages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
