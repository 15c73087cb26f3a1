"""The thread writer: a daemon thread of the training process runs the run's :class:`~.sink.Worker`.

The training thread hands over recorded steps (reduced on the training thread by ``pack``, see
``recording/pending.py``; the thread cuts the buffer into records) and sidecar operations, as the typed
messages of :mod:`.messages`, through an in-memory queue; the :class:`~.sink.Worker` loop on the thread
writes them in submission order, in blocks (``flush_rows`` / ``flush_bytes`` / ``flush_secs``), exactly as
it does in the writer process. The queue is bounded in bytes: when the writer falls behind,
:meth:`BackgroundWriter.submit` waits (:func:`~.sink.wait_bounded`: it ends when the thread makes progress,
and gives up after ``STALL_SECS`` without any) and says so once, rather than letting memory grow without
limit. An item larger than the whole queue is taken alone, once the queue is empty. A thread stuck on an
unreachable file system cannot be stopped, only left; closing after an exception (``status="failed"``)
never raises over it.
"""

from __future__ import annotations

import atexit
import logging
import threading
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from comgra_callbacks.errors import StoreError
from comgra_callbacks.store import sink as _sink
from comgra_callbacks.store.format import RunStatus
from comgra_callbacks.store.messages import CloseMessage, FlushMessage, Message, OpMessage
from comgra_callbacks.store.sink import (
    IDLE,
    ErrorPolicy,
    OnError,
    WaitTimedOut,
    Worker,
    slow_warning,
    wait_bounded,
)
from comgra_callbacks.store.writer import HostRecord, RunWriter

log = logging.getLogger(__name__)
_LIVE: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class PendingRecord(Protocol):
    """A record handed to the writer thread: its size, and how to turn it into a :class:`HostRecord`."""

    @property
    def nbytes(self) -> int: ...

    def materialize(self) -> HostRecord | None:
        """The record, or None when it is not to be written after all (an armed step nobody kept)."""


@dataclass(frozen=True)
class HeldRecord:
    """The in-memory transport's record message: the record itself, never encoded (it holds tensors)."""

    item: PendingRecord
    nbytes: int


class BackgroundWriter:
    """A :class:`~.sink.Sink` that writes records and sidecars on a daemon thread of this process.

    Args:
        writer: the synchronous writer it drives (owned by this object from now on).
        max_queue_bytes: bound on the bytes of records waiting to be written.
        flush_rows: most records per appended block.
        flush_bytes: a block is also appended once its records hold this many bytes.
        flush_secs: longest time a record waits before it is committed (liveness for readers).
        on_error: ``"warn"`` (default): a failing write stops recording with a warning and training goes on;
            ``"raise"``: the next call from the training thread raises :class:`StoreError`.
    """

    deferred_updates = True  # takes updates still kept as the weight after the step (store/sink.py)

    def __init__(
        self,
        writer: RunWriter,
        *,
        max_queue_bytes: int = 256 << 20,
        flush_rows: int = 256,
        flush_bytes: int = 32 << 20,
        flush_secs: float = 2.0,
        on_error: OnError = "warn",
    ) -> None:
        self.writer = writer
        self.name = writer.location.name
        self.max_queue_bytes = max_queue_bytes
        self.flush_secs = flush_secs
        self.on_error = on_error
        self.policy = ErrorPolicy(self.name, on_error)
        self._cond = threading.Condition()
        self._queue: deque[Message | HeldRecord] = deque()
        self._queued_bytes = 0
        self._handled = 0  # messages the thread has handled
        self._flush_sent = 0
        self._flushed = 0
        self._closed = False
        self._error: BaseException | None = None
        self._error_text = ""
        self._finished = False  # set by the thread as it ends
        self.wait_seconds = 0.0  # time the training thread spent waiting for room in the queue
        self.records_written = 0
        self._worker = Worker(writer, _QueueTransport(self), flush_rows=flush_rows, flush_bytes=flush_bytes, flush_secs=flush_secs)
        self._thread = threading.Thread(target=self._run, name=f"comgra-writer-{self.name}", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        _register_exit_flush()

    @property
    def error(self) -> BaseException | None:
        """The failure that stopped writing (the thread's exception, or a stall), or None."""
        return self._error

    # ---------------------------------------------------------------------------- training thread
    def submit(self, step: Any) -> bool:
        """Queue a recorded step; returns False when it was dropped because writing has failed.

        A ``PendingStep`` is reduced here first (``pack``: on the training thread, where its tensors live);
        anything else is a :class:`PendingRecord` already (a ``PackedStep``)."""
        from comgra_callbacks.recording.pending import (  # lazily: the store does not need torch
            PendingStep,
            pack,
        )

        if isinstance(step, PendingStep):
            step = pack(step)
        return self._put(HeldRecord(step, max(int(step.nbytes), 1)), max(int(step.nbytes), 1))

    def op(self, name: str, *args: Any) -> bool:
        """A sidecar operation by name (``write_graph``, ``add_notes``, ...): ``RunWriter.<name>(*args)``."""
        return self._put(OpMessage(name, args), 0)

    def _put(self, message: Message | HeldRecord, nbytes: int) -> bool:
        if self._closed:
            raise StoreError(f"the writer of run {self.name!r} is closed; nothing more can be written.")
        if self._check_error():
            return False
        with self._cond:
            if self._queued_bytes and self._queued_bytes + nbytes > self.max_queue_bytes:
                waited = self._wait("find room in its queue", lambda: not self._queued_bytes or self._queued_bytes + nbytes <= self.max_queue_bytes)
                self.wait_seconds += waited
                if self._error is None:
                    self.policy.warn_once("slow", slow_warning(self.name, f"queue full at {self.max_queue_bytes >> 20} MiB", waited))
            if self._error is not None:  # it stopped answering while we waited
                return not self._check_error()
            self._queue.append(message)
            self._queued_bytes += nbytes
            self._cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything submitted so far is written and committed."""
        with self._cond:
            self._flush_sent += 1
            target = self._flush_sent
            self._queue.append(FlushMessage(target))
            self._cond.notify_all()
            try:
                self._wait("flush", lambda: self._flushed >= target, timeout)
            except WaitTimedOut as exc:
                raise StoreError(f"flushing run {self.name!r} timed out after {timeout} s.") from exc
        self._check_error()

    def close(self, status: RunStatus, error: str | None = None, timeout: float | None = 600.0) -> None:
        """Write what is queued, mark the run, stop the thread. Safe to call twice."""
        if self._closed:
            return
        after_error = status == "failed"  # an exception is on its way: never raise over it
        if self._error is not None:
            status, error = "failed", error or f"writing failed: {self._error_text}"
        with self._cond:
            self._queue.append(CloseMessage(status, error))
            self._cond.notify_all()
            try:
                self._wait("write what is queued", lambda: self._finished, timeout, closing=True)
            except WaitTimedOut:
                pass
        self._thread.join(1.0)
        self._closed = True
        _LIVE.discard(self)
        failure = self._failure()
        if failure is None and self._thread.is_alive():  # stuck: it cannot be stopped, nor get a second writer
            failure = StoreError(f"the writer thread of run {self.name!r} did not finish")
        self.policy.closed(failure, after_error=after_error)

    def _failure(self) -> StoreError | None:
        if self._error is None:
            return None
        failure = StoreError(f"writing run {self.name!r} failed: {self._error_text}")
        failure.__cause__ = self._error
        return failure

    def _wait(self, what: str, ready: Any, timeout: float | None = None, *, closing: bool = False) -> float:
        """With the lock held: wait until ``ready()`` (or the writer failed, unless closing), bounded by
        :func:`~.sink.wait_bounded`. A stall becomes the writer's error (recording of the run stops)."""
        try:
            return wait_bounded(
                lambda: ready() or (not closing and self._error is not None),
                progress=lambda: (self._handled, self.records_written, self._queued_bytes),
                pause=lambda: self._cond.wait(min(0.5, max(_sink.STALL_SECS / 20, 0.01))),
                what=what,
                who=f"the writer thread of run {self.name!r}",
                owner="`BackgroundWriter`",
                stuck="it is stuck. Recording of this run stops. HINT: check the disk or the store it writes to.",
                warn=self.policy.warn_once,
                on_error=self.on_error,
                timeout=timeout,
            )
        except WaitTimedOut:
            raise
        except StoreError as exc:  # stalled: the thread stops writing too (it may never come back)
            if self._error is None:
                self._error, self._error_text = exc, str(exc)
                self._worker.error, self._worker.error_text = exc, str(exc)
            return 0.0

    def _check_error(self) -> bool:
        return self.policy.check(self._failure())

    # ------------------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        try:
            self._worker.run()
        except BaseException as exc:  # the loop itself broke: report it, never leave training waiting
            self._worker.fail(exc)
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()


class _QueueTransport:
    """The in-memory transport of :class:`BackgroundWriter` (the writer thread's side)."""

    def __init__(self, owner: BackgroundWriter) -> None:
        self.owner = owner

    def receive(self, timeout: float | None) -> Any:
        owner = self.owner
        with owner._cond:
            if not owner._queue:
                owner._cond.wait_for(lambda: bool(owner._queue), timeout)
            return owner._queue.popleft() if owner._queue else IDLE

    def take(self, message: Any) -> HostRecord | None:
        if not isinstance(message, HeldRecord):
            raise StoreError(f"`BackgroundWriter`: expected a record, an operation, a flush or a close, got {message!r}.")
        return message.item.materialize()  # None: an armed step nobody kept

    def taken(self, message: Any) -> None:
        with self.owner._cond:
            self.owner._queued_bytes -= getattr(message, "nbytes", 0)  # as counted when queued: materialize() frees the tensors
            self.owner._cond.notify_all()

    def progressed(self, records: int = 0, committed: int = 0) -> None:
        with self.owner._cond:
            self.owner._handled += 1
            self.owner.records_written += committed
            self.owner._cond.notify_all()

    def flushed(self, flush_id: int) -> None:
        with self.owner._cond:
            self.owner._flushed = flush_id
            self.owner._cond.notify_all()

    def closed(self) -> None:
        pass

    def failed(self, exc: BaseException, text: str) -> None:
        log.error("comgra: writer failed:\n%s", "".join(traceback.format_exception(exc)))
        with self.owner._cond:
            if self.owner._error is None:
                self.owner._error, self.owner._error_text = exc, text
            self.owner._cond.notify_all()


def _flush_live_writers() -> None:
    """At interpreter exit, commit what is queued (a run's status stays "running": it did not finish)."""
    for bg in list(_LIVE):
        try:
            bg.flush(timeout=30)
        except Exception as exc:  # the store is gone; what was committed before stays valid
            log.error("comgra: could not write the last records of run %r at exit: %s", bg.name, exc)


def _register_exit_flush() -> None:
    """Flush writers at exit while zarr can still write.

    zarr writes local chunks through thread pools, and ``concurrent.futures`` shuts its pools down in a
    ``threading`` exit hook that runs *before* ``atexit`` handlers. Registered in that same hook after zarr
    was imported, ours runs first (they run in reverse order). ``atexit`` is the fallback where the hook is
    missing (then records still queued at exit may be lost).
    """
    if _exit_flush_registered:
        return
    _exit_flush_registered.append(True)
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(_flush_live_writers)
    else:  # pragma: no cover - every CPython from 3.9 has it
        atexit.register(_flush_live_writers)


_exit_flush_registered: list[bool] = []
