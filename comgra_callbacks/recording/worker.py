"""The writer process: ``python -m comgra_callbacks.recording.worker RING_FD SIZE``, started by ProcessWriter.

It owns the run's store. From its standard input it reads one JSON line to start (where the run is, its
metadata) and then one JSON line per message; the tensors of a recorded step are in the shared ring
(:mod:`.ring`), whose descriptor it inherits. It computes the statistics with numpy (it never imports torch),
appends blocks of records, writes sidecars, and advances the ring's *consumed* counter. It answers the start
with one JSON line on standard output: ``{"ready": true}`` or ``{"error": "..."}``.

Signals meant for training are not for it: it runs in its own process group and ignores ``SIGINT`` and
``SIGTERM``, so a Ctrl+C, a ``timeout`` or a scheduler's ``SIGTERM`` never cost the records it holds. It
stops when its trainer says ``close``, or when its standard input ends (the trainer is gone: killed, or it
exited without closing the run): then it commits what it received and marks the run ``failed``.

A record arrives in one message, or in several *parts* (``"part": i``, and ``"more": true`` on all but the
last) when a step
is larger than the ring; the parts are joined into one record. Records are committed in blocks of
``flush_rows`` or ``flush_bytes``, and no record waits longer than ``flush_secs`` to be committed, however
busy the writer is.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np

from comgra_callbacks.recording import reduce_numpy as rn
from comgra_callbacks.recording.ring import CLOSED, COMMITTED, CONSUMED, FLUSHED, PROGRESS, RECORDS, Ring
from comgra_callbacks.stats import update_ratio
from comgra_callbacks.store.attribution import counts_row, has_statistics
from comgra_callbacks.store.format import STAT_INDEX, SeriesKey
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter

FULL = -1
OPS = frozenset({"write_graph", "write_modules", "add_notes", "add_scalars", "start_segment", "update_meta", "commit"})
GONE = "interrupted: the training process ended without closing the run (it was killed, or exited during training)"


def reduce_record(ring: Ring, msg: dict[str, Any], items: list[Any]) -> HostRecord:
    """Turn a ``record`` message (raw tensors in the ring at ``msg["base"]``, described by ``items``, the
    layout it names) into a HostRecord; nothing refers to the ring afterwards."""
    step, step_type, epoch, batch_idx, when, reason = msg["meta"]
    record = HostRecord(int(step), str(step_type), int(epoch), int(batch_idx), float(when), str(reason))
    index = None if msg.get("sample_index") is None else np.asarray(msg["sample_index"], dtype=np.int64)
    batch_size = msg.get("batch_size")
    base = int(msg["base"])
    arrays = [ring.array(base + int(it[7]), np.dtype(it[5]), tuple(it[6])) for it in items]
    reduced = [
        rn.reduce_array(a, neurons=bool(it[9]), is_parameter=bool(it[8]), axis=None if len(it) <= 12 or it[12] is None else int(it[12]))
        if has_statistics(str(it[3])) else (counts_row(a), None)
        for it, a in zip(items, arrays)
    ]
    rows = [row for row, _ in reduced]
    for it, row in zip(items, rows):  # update-to-weight ratio, from the weight's own row
        ref = it[11]
        if ref is not None and int(ref) >= 0:  # -1: the weight is in another part (see join_ratios)
            row[STAT_INDEX["update_ratio"]] = update_ratio(float(row[STAT_INDEX["l2"]]), float(rows[int(ref)][STAT_INDEX["l2"]]))
    for it, a, (row, neurons) in zip(items, arrays, reduced):
        node, role, iteration, view, dtype, _, _, _, is_param, neurons_wanted, samples = it[:11]
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


def join_ratios(record: HostRecord, pending_ratio: set[SeriesKey]) -> None:
    """Update-to-weight ratios of updates whose weight travelled in another part of the same record."""
    l2_index, ratio_index = STAT_INDEX["l2"], STAT_INDEX["update_ratio"]
    weights = {e.key.node: float(e.stats[l2_index]) for e in record.entries if e.key.view == "value"}
    for entry in record.entries:
        if entry.key in pending_ratio and entry.key.node in weights:
            entry.stats[ratio_index] = update_ratio(float(entry.stats[l2_index]), weights[entry.key.node])


def held_bytes(record: HostRecord) -> int:
    """What a pending record holds (``flush_bytes`` bounds it): its statistics, per-neuron statistics and
    samples. Not the raw tensors it arrived as, which stay in the ring (counting those appended a block after
    nearly every step of a run with ``attribution=``, and each block rewrites the chunks it touches)."""
    return sum(
        e.stats.nbytes + (0 if e.neurons is None else e.neurons.nbytes) + (0 if e.samples is None else e.samples.nbytes)
        for e in record.entries
    )


class Worker:
    def __init__(self, ring: Ring, writer: RunWriter, flush_rows: int, flush_bytes: int, flush_secs: float) -> None:
        self.ring, self.writer = ring, writer
        self.flush_rows, self.flush_bytes, self.flush_secs = flush_rows, flush_bytes, flush_secs
        self.pending: list[HostRecord] = []
        self.pending_bytes = 0
        self.oldest = 0.0  # when the oldest pending record arrived
        self.failed = False
        self.layouts: dict[int, list[Any]] = {}
        self.partial: HostRecord | None = None  # a record whose parts are still arriving
        self.partial_ratios: set[SeriesKey] = set()
        self.next_part = 0  # the part expected next (-1: skip until a new record starts)

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        self.ring.set_error(f"{type(exc).__name__}: {exc}")
        traceback.print_exception(exc, file=sys.stderr)

    def append_pending(self) -> None:
        if self.pending and not self.failed:
            try:
                self.writer.append(self.pending)
                self.ring.header[COMMITTED] += len(self.pending)
            except Exception as exc:
                self.fail(exc)
        self.pending, self.pending_bytes = [], 0
        self.ring.header[PROGRESS] += 1

    def due_in(self) -> float | None:
        """Seconds until the pending block must be committed (None: nothing pending)."""
        if not self.pending:
            return None
        return max(self.flush_secs - (time.monotonic() - self.oldest), 0.0)

    def _take(self, op: str, msg: dict[str, Any]) -> None:
        """A record, or a part of one (``part`` 0, 1, ...; ``more`` on all but the last)."""
        part = int(msg.get("part", 0))
        if part == 0:  # a new record: parts of an earlier one that never ended (an interrupt) are dropped
            self.partial, self.partial_ratios, self.next_part = None, set(), 0
        items = self.layouts.get(int(msg["layout"])) if op == "record" else None
        if part != self.next_part or (op == "record" and items is None):
            # a part or its layout is missing (a message torn by an interrupt): the record is incomplete
            self.partial, self.partial_ratios, self.next_part = None, set(), -1
            return
        self.next_part = part + 1
        record = reduce_record(self.ring, msg, items) if items is not None else unpack_record(self.ring, msg)
        if items is not None:
            self.partial_ratios.update(
                SeriesKey(str(it[0]), None if it[1] is None else str(it[1]), int(it[2]), str(it[3])) for it in items if it[11] == -1
            )
        if self.partial is not None:
            self.partial.entries.extend(record.entries)
            record = self.partial
        if msg.get("more"):
            self.partial = record
            return
        self.partial = None
        if self.partial_ratios:
            join_ratios(record, self.partial_ratios)
            self.partial_ratios = set()
        if not self.pending:
            self.oldest = time.monotonic()
        self.pending.append(record)
        self.pending_bytes += held_bytes(record)
        self.ring.header[RECORDS] += 1

    def handle(self, msg: dict[str, Any]) -> bool:
        """Handle one message; False when the run is closed."""
        op = msg.get("op")
        if op in ("record", "packed"):
            try:
                if not self.failed:
                    self._take(op, msg)
            except Exception as exc:
                self.fail(exc)
            finally:
                self.ring.header[CONSUMED] = int(msg["end"])  # the trainer may reuse the space
            if len(self.pending) >= self.flush_rows or self.pending_bytes >= self.flush_bytes:
                self.append_pending()
        elif op == "layout":
            self.layouts[int(msg["id"])] = msg["items"]
            for old in [k for k in self.layouts if k <= int(msg["id"]) - 64]:  # the trainer keeps the last 64
                del self.layouts[old]
        elif op == "flush":
            self.append_pending()
            self.ring.header[FLUSHED] = int(msg["id"])
        elif op == "close":
            self.finish(msg.get("status", "finished"), msg.get("error"))
            return False
        elif op in OPS:
            if not self.failed:
                try:
                    getattr(self.writer, op)(*msg.get("args", []))
                except Exception as exc:
                    self.fail(exc)
        else:
            self.fail(ValueError(f"unknown message {op!r}"))
        self.ring.header[PROGRESS] += 1
        return True

    def finish(self, status: str, error: str | None) -> None:
        self.append_pending()
        try:
            self.writer.close(status, error)  # type: ignore[arg-type]
        except Exception as exc:
            self.fail(exc)
        self.ring.header[CLOSED] = 1

    def run(self, messages: queue.Queue[dict[str, Any] | None]) -> None:
        while True:
            try:
                msg = messages.get(timeout=self.due_in())
            except queue.Empty:
                self.append_pending()
                continue
            if msg is None:  # the training process is gone: keep what was received, say why it ended
                self.finish("failed", GONE)
                return
            if not self.handle(msg):
                return
            due = self.due_in()
            if due is not None and due <= 0:  # busy or not, nothing waits longer than flush_secs
                self.append_pending()


def _read_lines(stream: Any, out: queue.Queue[dict[str, Any] | None]) -> None:
    """Every line is one message. A line that does not parse was torn by an interrupt on the trainer's side
    (the trainer starts every message on a new line, so only that one is lost); it is skipped."""
    for line in stream:
        if line.strip():
            try:
                out.put(json.loads(line))
            except ValueError:
                print(f"comgra writer: skipped a torn message ({len(line)} bytes)", file=sys.stderr)
    out.put(None)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when the run ends (see the docstring)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = argv if argv is not None else sys.argv[1:]
    ring = Ring.attach(int(args[0]), int(args[1]))
    stdin = sys.stdin.buffer
    first = stdin.readline()
    while first and not first.strip():  # every message starts on a new line
        first = stdin.readline()
    if not first:  # the trainer died while this process started: nothing to write
        return 0
    start = json.loads(first)
    try:
        location = open_root(start["root"], start.get("storage_options")).run(start["run"])
        writer = RunWriter(location, meta=start.get("meta"), resume=bool(start.get("resume")))
    except Exception as exc:
        _answer({"error": f"{exc}", "type": type(exc).__name__})
        return 1
    worker = Worker(ring, writer, int(start["flush_rows"]), int(start["flush_bytes"]), float(start["flush_secs"]))
    if not _answer({"ready": True}):  # the trainer is gone already
        worker.finish("failed", GONE)
        return 0
    messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(stdin, messages), daemon=True).start()
    worker.run(messages)
    return 0


def _answer(message: dict[str, Any]) -> bool:
    try:
        print(json.dumps(message), flush=True)
        return True
    except (BrokenPipeError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
