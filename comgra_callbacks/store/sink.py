"""One writer core, two transports: what the recorder calls (:class:`Sink`), and the one loop that writes.

A run is written by the thread writer (``store/background.py``: messages handed over in memory) or by the
writer process (``recording/process_writer.py`` on the training side, ``recording/worker.py`` in the
process: messages as JSON lines, tensors in a shared ring). Both hand the same typed messages
(:mod:`.messages`) to the same :class:`Worker`, the only batching and commit loop: records are appended in
blocks of ``flush_rows`` records or ``flush_bytes`` held bytes, and no record waits longer than
``flush_secs`` to be committed, however busy the writer is; sidecars run in order with the records; the
first failure stops writing and is reported, once, by the training side's :class:`ErrorPolicy`.

What differs between the transports is only how a message travels and where its tensors are
(:class:`Transport`), and how the training side waits for room; every such wait is :func:`wait_bounded`:
it ends when the writer makes progress, warns after ``STALL_WARN_SECS`` without progress and gives up
after ``STALL_SECS`` (then ``on_error`` decides). Nothing here imports torch: the writer process never does.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Hashable
from typing import Any, Literal, Protocol

from comgra_callbacks.errors import StoreError
from comgra_callbacks.store.format import RunStatus
from comgra_callbacks.store.messages import CloseMessage, FlushMessage, Message, OpMessage
from comgra_callbacks.store.writer import HostRecord, RunWriter

OnError = Literal["warn", "raise"]
STALL_WARN_SECS = 5.0  # a wait on the writer warns after this long without progress ...
STALL_SECS = 60.0  # ... and gives up after this long (then ``on_error`` decides)
GONE = "interrupted: the training process ended without closing the run (it was killed, or exited during training)"
IDLE = object()  # Transport.receive: nothing arrived in time
ENDED = object()  # Transport.receive: the input ended (the training process is gone)


class Sink(Protocol):
    """What the recorder calls to hand a run to its writer (both transports implement it).

    ``submit`` takes a recorded step (a ``PendingStep``, or one already packed) and returns False when it
    was dropped because writing has failed; where its statistics are computed is the sink's placement
    (in-process sinks reduce on the training thread; the writer process may take raw tensors).
    ``op`` runs a sidecar operation (:data:`~.messages.OPS`) in order with the records. ``flush`` blocks
    until everything handed over is committed. ``close`` commits, marks the run and stops; safe twice.
    ``error`` is the failure that stopped writing, or None.

    A sink whose class sets ``deferred_updates = True`` takes steps whose updates are still the weight after
    the step (``Snapshot.deferred``; it reduces them with ``pack``, which takes the differences, or sends
    them raw to the writer process); the recorder takes the differences itself for any other sink.
    """

    def submit(self, step: Any) -> bool: ...

    def op(self, name: str, *args: Any) -> bool: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, status: RunStatus, error: str | None = None, timeout: float | None = 600.0) -> None: ...

    @property
    def error(self) -> BaseException | None: ...


class Transport(Protocol):
    """The writer's side of a transport: where messages come from and how the writer answers."""

    def receive(self, timeout: float | None) -> Message | object:
        """The next message; ``IDLE`` when none came within ``timeout``; ``ENDED`` when none will."""

    def take(self, message: Any) -> HostRecord | None:
        """A message that is not for the loop itself (a record, a layout): the record it completes, if any."""

    def taken(self, message: Any) -> None:
        """``message`` was handled (or skipped after a failure): give back what it held."""

    def progressed(self, records: int = 0, committed: int = 0) -> None:
        """The loop made progress (one message, or one commit); ``records`` taken, ``committed`` appended."""

    def flushed(self, flush_id: int) -> None: ...

    def closed(self) -> None: ...

    def failed(self, exc: BaseException, text: str) -> None:
        """Writing failed (the first failure only): tell the training side."""


def held_bytes(record: HostRecord) -> int:
    """What a pending record holds (``flush_bytes`` bounds it): its statistics, per-neuron statistics and
    samples. Not the raw tensors it arrived as, which stay in the ring (counting those appended a block after
    nearly every step of a run with ``attribution=``, and each block rewrites the chunks it touches)."""
    return sum(
        e.stats.nbytes + (0 if e.neurons is None else e.neurons.nbytes) + (0 if e.samples is None else e.samples.nbytes)
        for e in record.entries
    )


class Worker:
    """The one batching and commit loop of a run's writer (on the writer thread, or in the writer process).

    Args:
        writer: the run's synchronous writer (owned by this loop).
        transport: where the messages come from.
        flush_rows / flush_bytes / flush_secs: a block is appended once it has ``flush_rows`` records or holds
            ``flush_bytes`` bytes (:func:`held_bytes`), and at the latest ``flush_secs`` after its oldest
            record arrived.
    """

    def __init__(self, writer: RunWriter, transport: Transport, *, flush_rows: int, flush_bytes: int, flush_secs: float) -> None:
        self.writer, self.transport = writer, transport
        self.flush_rows, self.flush_bytes, self.flush_secs = flush_rows, flush_bytes, flush_secs
        self.pending: list[HostRecord] = []
        self.pending_bytes = 0
        self.oldest = 0.0  # when the oldest pending record arrived
        self.error: BaseException | None = None
        self.error_text = ""

    def run(self) -> None:
        """Handle messages until the close (or the end of the input: the run is then marked ``failed``)."""
        while True:
            message = self.transport.receive(self.due_in())
            if message is IDLE:
                self.commit()
                continue
            if message is ENDED:  # the training process is gone: keep what was received, say why it ended
                self.finish("failed", GONE)
                return
            if not self.handle(message):
                return
            due = self.due_in()
            if due is not None and due <= 0:  # busy or not, nothing waits longer than flush_secs
                self.commit()

    def handle(self, message: Any) -> bool:
        """Handle one message; False once the run is closed."""
        if isinstance(message, FlushMessage):
            self.commit()
            self.transport.flushed(message.id)
        elif isinstance(message, CloseMessage):
            self.finish(message.status, message.error)
            return False
        elif isinstance(message, OpMessage):
            if self.error is None:
                try:
                    getattr(self.writer, message.name)(*message.args)
                except Exception as exc:
                    self.fail(exc)
        elif isinstance(message, BaseException):  # a message the transport could not read (e.g. its version)
            self.fail(message)
        else:
            taken = 0
            try:
                record = self.transport.take(message) if self.error is None else None
                if record is not None:
                    self.add(record)
                    taken = 1
            except Exception as exc:
                self.fail(exc)
            finally:
                self.transport.taken(message)
            self.transport.progressed(records=taken)
            if len(self.pending) >= self.flush_rows or self.pending_bytes >= self.flush_bytes:
                self.commit()
            return True
        self.transport.progressed()
        return True

    def add(self, record: HostRecord) -> None:
        if not self.pending:
            self.oldest = time.monotonic()
        self.pending.append(record)
        self.pending_bytes += held_bytes(record)

    def due_in(self) -> float | None:
        """Seconds until the pending block must be committed (None: nothing pending)."""
        if not self.pending:
            return None
        return max(self.flush_secs - (time.monotonic() - self.oldest), 0.0)

    def commit(self) -> None:
        """Append the pending block (a manifest rewrite makes it visible to readers)."""
        committed = 0
        if self.pending and self.error is None:
            try:
                self.writer.append(self.pending)
                committed = len(self.pending)
            except Exception as exc:
                self.fail(exc)
        self.pending, self.pending_bytes = [], 0
        self.transport.progressed(committed=committed)

    def finish(self, status: str, error: str | None) -> None:
        """Commit what is pending and mark the run (``failed`` when writing failed)."""
        self.commit()
        if self.error is not None:
            status, error = "failed", error or f"writing failed: {self.error_text}"
        try:
            self.writer.close(status, error)  # type: ignore[arg-type]
        except Exception as exc:
            self.fail(exc)
        self.transport.closed()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error, self.error_text = exc, f"{type(exc).__name__}: {exc}"
            self.transport.failed(exc, self.error_text)


class WaitTimedOut(StoreError):
    """A bounded wait ran out of its ``timeout`` (the writer was making progress, only not enough)."""


def wait_bounded(
    ready: Callable[[], bool],
    *,
    progress: Callable[[], Hashable],
    pause: Callable[[], Any],
    what: str,
    who: str,
    owner: str,
    stuck: str,
    warn: Callable[[str, str], None],
    on_error: str,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
) -> float:
    """Wait until ``ready()``, the one back-pressure rule of both transports; returns the seconds waited.

    The clock of the stall resets whenever ``progress()`` changes. After STALL_WARN_SECS without progress
    it warns once (``warn("stall", ...)``); after STALL_SECS it raises :class:`StoreError` naming ``who`` and
    what training waited for, followed by ``stuck`` (what it means, the HINT). ``timeout`` bounds the wait in
    all (:class:`WaitTimedOut`); ``check()`` may raise when the writer is known to be gone."""
    started = changed = time.monotonic()
    seen = progress()
    while not ready():
        if check is not None:
            check()
        now = time.monotonic()
        current = progress()
        if current != seen:
            seen, changed = current, now
        idle = now - changed
        if idle >= STALL_SECS:
            raise StoreError(f"{owner}: {who} made no progress for {round(idle, 1):g} s while training waited to {what}: {stuck}")
        if timeout is not None and now - started >= timeout:
            raise WaitTimedOut(f"{owner}: waiting for {who} to {what} timed out after {timeout:g} s.")
        if idle >= STALL_WARN_SECS:
            warn(
                "stall",
                f"comgra: {who} has made no progress for {round(idle, 1):g} s; training waits to {what}, at most "
                f"{STALL_SECS:g} s, then on_write_error={on_error!r} decides.",
            )
        pause()
    return time.monotonic() - started


def slow_warning(run: str, why: str, waited: float) -> str:
    """The one warning of back pressure: training waited for the writer (said once per run)."""
    return (
        f"comgra: the writer of run {run!r} cannot keep up ({why}); training waited {waited * 1000:.0f} ms. "
        "HINT: record less often (schedule=) or keep less (detail=, fewer samples)."
    )


class ErrorPolicy:
    """What the training side does with the writer's failure (``on_error``), the same for both transports.

    ``"warn"``: the first call that sees the failure warns once, recording stops and training goes on;
    ``"raise"``: it raises :class:`StoreError`, once (the close does not raise it again). The close after an
    exception (``status="failed"``) never raises: the failure becomes a note on the exception in flight.
    """

    def __init__(self, run: str, on_error: OnError) -> None:
        self.run, self.on_error = run, on_error
        self.raised = False
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    def check(self, failure: StoreError | None) -> bool:
        """True when writing has failed (after warning or raising as ``on_error`` says)."""
        if failure is None:
            return False
        if self.on_error == "raise":
            self.raised = True
            raise failure
        self.warn_once("error", f"comgra: {failure}; recording stops, training goes on.")
        return True

    def closed(self, failure: StoreError | None, *, after_error: bool) -> None:
        """Report a failure found when closing: a note on the exception in flight, a raise, or a warning."""
        if failure is None:
            return
        in_flight = sys.exc_info()[1]
        if in_flight is not None and in_flight is not failure and not self.raised:
            in_flight.add_note(f"comgra: {failure} (the run {self.run!r} may be incomplete)")
        if self.on_error == "raise" and not self.raised and not after_error and in_flight is None:
            self.raised = True
            raise failure
        warnings.warn(f"comgra: run {self.run!r} may be incomplete: {failure}", RuntimeWarning, stacklevel=3)
