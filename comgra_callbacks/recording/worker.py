"""The writer process: ``python -m comgra_callbacks.recording.worker RING_FD SIZE``, started by ProcessWriter.

It owns the run's store and runs its :class:`~comgra_callbacks.store.sink.Worker`, the same loop as the
thread writer's, fed by :class:`RingTransport`: from its standard input it reads one message per line
(:func:`~comgra_callbacks.store.messages.decode`; the first, a ``StartMessage``, says where the run is), and
the tensors of a recorded step are in the shared ring (:mod:`.ring`), whose descriptor it inherits. It
computes the statistics of a record's raw arrays at once (:func:`~.reduce_numpy.reduce_arrays`: numpy, and
in a long run the one-pass numba kernel of :mod:`.fused`; it never imports torch) and advances the ring's
*consumed* counter. It answers the start with one line on standard output, a
:class:`~comgra_callbacks.store.messages.ReadyAnswer` or an :class:`~comgra_callbacks.store.messages.ErrorAnswer`.

Signals meant for training are not for it: it runs in its own process group and ignores ``SIGINT`` and
``SIGTERM``, so a Ctrl+C, a ``timeout`` or a scheduler's ``SIGTERM`` never cost the records it holds. It
stops when its trainer says ``close``, or when its standard input ends (the trainer is gone: killed, or it
exited without closing the run): then it commits what it received and marks the run ``failed``.

A record arrives in one message, or in several *parts* (``part`` 0, 1, ...; ``more`` on all but the last)
when a step is larger than the ring; the parts are joined into one record.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from comgra_callbacks.recording import reduce_numpy as rn
from comgra_callbacks.recording.ring import CLOSED, COMMITTED, CONSUMED, FLUSHED, PROGRESS, RECORDS, Ring
from comgra_callbacks.recording.sampling import kept_samples
from comgra_callbacks.stats import update_ratio
from comgra_callbacks.store.attribution import counts_row, has_statistics
from comgra_callbacks.store.format import STAT_INDEX, SeriesKey
from comgra_callbacks.store.messages import (
    Answer,
    ErrorAnswer,
    LayoutMessage,
    PackedItem,
    PackedLayoutMessage,
    PackedMessage,
    RawItem,
    ReadyAnswer,
    RecordMessage,
    StartMessage,
    StepMeta,
    decode,
    encode,
    unpack_entries,
)
from comgra_callbacks.store.sink import ENDED, GONE, IDLE, Worker
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter

_LAYOUTS_KEPT = 64  # the trainer keeps the ids of its last 64 layouts (process_writer.py)
POLL_SECS = 0.002  # while messages come, the line reader looks for the next one this often ...
# ... and waits in the kernel again once none came for this long: where records come further apart, a wake-up is a
# small part of a step, and the writer process does not wake every 2 ms on cores that torch's threads use
BLOCK_AFTER_SECS = 0.02


def _record(meta: StepMeta) -> HostRecord:
    return HostRecord(int(meta.step), str(meta.step_type), int(meta.epoch), int(meta.batch_idx), float(meta.time), str(meta.reason))


def _key(item: Any) -> SeriesKey:
    return SeriesKey(str(item.node), None if item.role is None else str(item.role), int(item.iteration), str(item.view))


def reduce_record(ring: Ring, msg: RecordMessage, items: tuple[RawItem, ...]) -> HostRecord:
    """Turn a record message (raw tensors in the ring at ``msg.base``, described by ``items``, the layout it
    names) into a HostRecord; nothing refers to the ring afterwards."""
    record = _record(msg.meta)
    index = None if msg.sample_index is None else np.asarray(msg.sample_index, dtype=np.int64)
    arrays = [ring.array(msg.base + it.offset, np.dtype(it.ring_dtype), it.shape) for it in items]
    for it, a in zip(items, arrays):  # an update that travelled as the weight after the step: minus the weight before
        if it.subtract is not None:
            np.subtract(a, arrays[it.subtract], out=a)
    described = [i for i, it in enumerate(items) if has_statistics(it.view)]  # the others: their counts only
    reduced: list[tuple[Any, Any]] = [(None, None) if has_statistics(it.view) else (counts_row(a), None) for it, a in zip(items, arrays)]
    if described:  # the whole record at once (one derivation; the one-pass kernel in a long run)
        stats, blocks = rn.reduce_arrays([arrays[i] for i in described], [(items[i].neurons, items[i].is_parameter, items[i].neuron_axis) for i in described])
        for position, i in enumerate(described):
            reduced[i] = (stats[position], blocks[position])
    rows = [row for row, _ in reduced]
    for it, row in zip(items, rows):  # update-to-weight ratio, from the weight's own row
        if it.reference is not None and it.reference >= 0:  # -1: the weight is in another part (see join_ratios)
            row[STAT_INDEX["update_ratio"]] = update_ratio(float(row[STAT_INDEX["l2"]]), float(rows[it.reference][STAT_INDEX["l2"]]))
    for it, a, (row, neurons) in zip(items, arrays, reduced):
        chosen = None
        if it.samples:
            kept = kept_samples(a, it.samples, index, is_parameter=it.is_parameter, batch_size=msg.batch_size)
            chosen = np.array(kept, dtype=np.float32, copy=True)
        record.entries.append(HostEntry(_key(it), row, neurons, chosen, str(it.dtype)))
    return record


def unpack_record(ring: Ring, msg: PackedMessage, items: tuple[PackedItem, ...]) -> HostRecord:
    """A packed message (its series: ``items``): statistics already computed on the training side; copy the
    pieces out of the ring."""
    record = _record(msg.meta)
    layout = [(_key(it), it.dtype, it.neuron_shape, it.sample_shape) for it in items]
    record.entries.extend(unpack_entries(ring.array(msg.offset, np.float32, (msg.length,)), layout, copy=True))
    return record


def join_ratios(record: HostRecord, pending_ratio: set[SeriesKey]) -> None:
    """Update-to-weight ratios of updates whose weight travelled in another part of the same record."""
    l2_index, ratio_index = STAT_INDEX["l2"], STAT_INDEX["update_ratio"]
    weights = {e.key.node: float(e.stats[l2_index]) for e in record.entries if e.key.view == "value"}
    for entry in record.entries:
        if entry.key in pending_ratio and entry.key.node in weights:
            entry.stats[ratio_index] = update_ratio(float(entry.stats[l2_index]), weights[entry.key.node])


class RingTransport:
    """The writer process's side of the ring: messages from the line reader, tensors from the ring, answers
    in the ring's header (what the training side waits on)."""

    def __init__(self, ring: Ring, messages: queue.Queue[Any]) -> None:
        self.ring, self.messages = ring, messages
        self.layouts: dict[int, tuple[Any, ...]] = {}  # raw layouts (RawItem) and packed ones (PackedItem), by id
        self.partial: HostRecord | None = None  # a record whose parts are still arriving
        self.partial_ratios: set[SeriesKey] = set()
        self.next_part = 0  # the part expected next (-1: skip until a new record starts)

    def receive(self, timeout: float | None) -> Any:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            return IDLE
        return ENDED if message is None else message

    def take(self, msg: Any) -> HostRecord | None:
        """A layout (kept), or a record or one part of it (``part`` 0, 1, ...; ``more`` on all but the last):
        the whole record once its last part arrived."""
        if isinstance(msg, (LayoutMessage, PackedLayoutMessage)):
            self.layouts[msg.id] = msg.items
            for old in [k for k in self.layouts if k <= msg.id - _LAYOUTS_KEPT]:
                del self.layouts[old]
            return None
        if not isinstance(msg, (RecordMessage, PackedMessage)):
            raise ValueError(f"unknown message {type(msg).__name__}")
        if msg.part == 0:  # a new record: parts of an earlier one that never ended (an interrupt) are dropped
            self.partial, self.partial_ratios, self.next_part = None, set(), 0
        described = not isinstance(msg.layout, int)  # a packed record's series with it (not named by an id)
        items = None if described else self.layouts.get(msg.layout)  # type: ignore[arg-type]
        if msg.part != self.next_part or (items is None and not described):
            # a part or its layout is missing (a message torn by an interrupt): the record is incomplete
            self.partial, self.partial_ratios, self.next_part = None, set(), -1
            return None
        self.next_part = msg.part + 1
        if isinstance(msg, RecordMessage):
            record = reduce_record(self.ring, msg, items)  # type: ignore[arg-type]
            self.partial_ratios.update(_key(it) for it in items if it.reference == -1)  # type: ignore[union-attr]
        else:
            record = unpack_record(self.ring, msg, msg.layout if items is None else items)  # type: ignore[arg-type]
        if self.partial is not None:
            self.partial.entries.extend(record.entries)
            record = self.partial
        if msg.more:
            self.partial = record
            return None
        self.partial = None
        if self.partial_ratios:
            join_ratios(record, self.partial_ratios)
            self.partial_ratios = set()
        return record

    def taken(self, msg: Any) -> None:
        if isinstance(msg, (RecordMessage, PackedMessage)):
            self.ring.header[CONSUMED] = msg.end  # the trainer may reuse the space

    def progressed(self, records: int = 0, committed: int = 0) -> None:
        self.ring.header[RECORDS] += records
        self.ring.header[COMMITTED] += committed
        self.ring.header[PROGRESS] += 1

    def flushed(self, flush_id: int) -> None:
        self.ring.header[FLUSHED] = flush_id

    def closed(self) -> None:
        self.ring.header[CLOSED] = 1

    def failed(self, exc: BaseException, text: str) -> None:
        self.ring.set_error(text)
        traceback.print_exception(exc, file=sys.stderr)


class LineReader:
    """The trainer's messages, one a line, from a file descriptor read in chunks (no buffered stream in
    between, whose buffer a poll of the descriptor could not see).

    While messages come, :meth:`lines` looks for the next one every :data:`POLL_SECS` instead of waiting in
    the kernel, so that the trainer's write of a message wakes no one: on the 2-core virtual machine a write
    that woke the reader took 31-224 us of the training step, against 6-15 us otherwise (docs/benchmarks.md).
    Once none came for :data:`BLOCK_AFTER_SECS` it waits in the kernel again, so an idle writer costs nothing."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._partial = bytearray()  # the start of a line whose end has not arrived yet
        self._lines: deque[bytes] = deque()
        self._ended = False

    def readline(self) -> bytes:
        """The next line with its ``\\n``, waiting for it; ``b""`` once the input ended."""
        while not self._lines and not self._ended:
            self._read(wait=True)
        return self._lines.popleft() if self._lines else b""

    def lines(self) -> Iterator[bytes]:
        """Every line until the input ends."""
        last = time.monotonic()
        while True:
            while self._lines:
                yield self._lines.popleft()
            if self._ended:
                return
            if self._read(wait=False):
                last = time.monotonic()
            elif time.monotonic() - last < BLOCK_AFTER_SECS:
                time.sleep(POLL_SECS)
            else:
                self._read(wait=True)
                last = time.monotonic()

    def _read(self, *, wait: bool) -> bool:
        """Read what is there (``wait``: wait until something is); False when nothing was."""
        if not wait and not select.select([self.fd], [], [], 0)[0]:
            return False
        data = os.read(self.fd, 1 << 16)
        if not data:  # the trainer closed its end, or is gone
            self._ended = True
            if self._partial:
                self._lines.append(bytes(self._partial))
                self._partial.clear()
            return True
        if b"\n" not in data:
            self._partial += data
            return True
        *complete, rest = data.split(b"\n")
        complete[0] = bytes(self._partial) + complete[0]
        self._partial[:] = rest
        self._lines.extend(line + b"\n" for line in complete)  # as a file's lines: an empty one is b"\n"
        return True


def _read_lines(reader: LineReader, out: queue.Queue[Any]) -> None:
    """Every line is one message. A line that does not parse was torn by an interrupt on the trainer's side
    (the trainer starts every message on a new line, so only that one is lost); it is skipped. A message
    that parses but cannot be read (another version) goes on as its error: writing fails and says why."""
    for line in reader.lines():
        if line.strip():
            try:
                out.put(decode(line))
            except json.JSONDecodeError:
                print(f"comgra writer: skipped a torn message ({len(line)} bytes)", file=sys.stderr)
            except Exception as exc:
                out.put(exc)
    out.put(None)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when the run ends (see the docstring)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = argv if argv is not None else sys.argv[1:]
    ring = Ring.attach(int(args[0]), int(args[1]))
    stdin = LineReader(sys.stdin.fileno())
    first = stdin.readline()
    while first and not first.strip():  # every message starts on a new line
        first = stdin.readline()
    if not first:  # the trainer died while this process started: nothing to write
        return 0
    try:
        start = decode(first)
        if not isinstance(start, StartMessage):
            raise ValueError(f"`worker`: expected a StartMessage first, got {type(start).__name__}.")
        location = open_root(start.root, start.storage_options).run(start.run)
        writer = RunWriter(location, meta=start.meta, resume=start.resume)
    except Exception as exc:
        _answer(ErrorAnswer(f"{exc}", type(exc).__name__))
        return 1
    if start.load_kernel:  # large raw records will come: the one-pass kernel reads them from the first one
        rn.load_kernels(wait=True)
    messages: queue.Queue[Any] = queue.Queue()
    worker = Worker(writer, RingTransport(ring, messages), flush_rows=start.flush_rows, flush_bytes=start.flush_bytes, flush_secs=start.flush_secs)
    if not _answer(ReadyAnswer()):  # the trainer is gone already
        worker.finish("failed", GONE)
        return 0
    threading.Thread(target=_read_lines, args=(stdin, messages), daemon=True).start()
    worker.run()
    return 0


def _answer(answer: Answer) -> bool:
    """Send the start's answer to the trainer, all of it (standard output may be unbuffered, and a raw write
    may take only a part); False when the trainer is gone already."""
    view = memoryview(encode(answer))
    try:
        while view:
            view = view[os.write(sys.stdout.fileno(), view) :]
        return True
    except (BrokenPipeError, OSError):
        return False


if __name__ == "__main__":
    code = main()
    # The run is closed: leave without the interpreter's shutdown, which has nothing left to do here and, while
    # the line reader (a daemon thread) still waits in a read, could abort (with a buffered standard input it
    # did: "Fatal Python error: could not acquire lock for <stdin>", when the trainer closed the pipe late).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
