"""A background thread that writes records so that training never waits on the file system.

The training thread hands over *pending* records (still packed; unpacking happens here) and sidecar
operations; the thread writes them in submission order. The queue is bounded in bytes: when the writer falls
behind, :meth:`BackgroundWriter.submit_record` waits, and says so once with a warning, rather than letting
memory grow without limit. Records are appended in blocks of ``flush_rows``, or whatever is waiting after
``flush_secs`` so that a live dashboard sees new steps.

No wait on the thread is without end: waiting for room, a flush or the close ends when the thread makes
progress; after ``STALL_WARN_SECS`` without progress a warning says so, after ``STALL_SECS`` the wait gives
up and ``on_error`` decides (a thread stuck on an unreachable file system cannot be stopped, only left).
Closing after an exception (``status="failed"``) never raises over it: a write error becomes a note.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, Protocol

from comgra_callbacks.errors import StoreError
from comgra_callbacks.store.format import RunStatus
from comgra_callbacks.store.writer import HostRecord, RunWriter

log = logging.getLogger(__name__)
OnError = Literal["warn", "raise"]
_LIVE: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()
STALL_WARN_SECS = 5.0  # a wait on the writer warns after this long without progress ...
STALL_SECS = 60.0  # ... and gives up after this long (then ``on_error`` decides)


class PendingRecord(Protocol):
    """A record handed to the writer thread: its size, and how to turn it into a :class:`HostRecord`."""

    @property
    def nbytes(self) -> int: ...

    def materialize(self) -> HostRecord | None:
        """The record, or None when it is not to be written after all (an armed step nobody kept)."""


class BackgroundWriter:
    """Writes records and sidecars on a daemon thread.

    Args:
        writer: the synchronous writer it drives (owned by this object from now on).
        max_queue_bytes: bound on the bytes of records waiting to be written.
        flush_rows: most records per appended block.
        flush_bytes: a block is also appended once its records hold this many bytes.
        flush_secs: longest time a record waits before it is committed (liveness for readers).
        on_error: ``"warn"`` (default): a failing write stops recording with a warning and training goes on;
            ``"raise"``: the next call from the training thread raises :class:`StoreError`.
    """

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
        self.max_queue_bytes = max_queue_bytes
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self.flush_secs = flush_secs
        self.on_error = on_error
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, Any, int]] = deque()  # (kind, item, bytes counted when queued)
        self._queued_bytes = 0
        self._submitted = 0
        self._done = 0
        self._flush_wanted = 0
        self._stopping = False
        self._closed = False
        self.error: BaseException | None = None
        self._error_text = ""
        self._warned_error = False
        self._warned_slow = False
        self._warned_stall = False
        self._raised = False
        self._finished = False  # set by the thread as it ends
        self.wait_seconds = 0.0  # time the training thread spent waiting for room in the queue
        self.records_written = 0
        self._thread = threading.Thread(target=self._run, name=f"comgra-writer-{writer.location.name}", daemon=True)
        self._thread.start()
        _LIVE.add(self)
        _register_exit_flush()

    # ---------------------------------------------------------------------------- training thread
    def submit_record(self, record: PendingRecord) -> bool:
        """Queue a record; returns False when it was dropped because writing has failed."""
        return self._submit("record", record, max(int(record.nbytes), 1))

    accepts_raw = False  # records must be reduced before they are submitted (see recording/pending.py)

    def op(self, name: str, *args: Any) -> bool:
        """A sidecar operation by name (``write_graph``, ``add_notes``, ...): ``RunWriter.<name>(*args)``."""
        method = getattr(RunWriter, name)

        def run(writer: RunWriter) -> None:
            method(writer, *args)

        return self.submit(run)

    def submit(self, operation: Callable[[RunWriter], None]) -> bool:
        """Queue a sidecar operation, run on the writer thread in order with the records."""
        return self._submit("op", operation, 0)

    def _submit(self, kind: str, item: Any, nbytes: int) -> bool:
        if self._closed:
            raise StoreError(f"the writer of run {self.writer.location.name!r} is closed; nothing more can be written.")
        if self._check_error():
            return False
        with self._cond:
            if self._queued_bytes and self._queued_bytes + nbytes > self.max_queue_bytes:
                started = time.perf_counter()
                self._wait_locked("find room in its queue", lambda: not self._queued_bytes or self._queued_bytes + nbytes <= self.max_queue_bytes)
                waited = time.perf_counter() - started
                self.wait_seconds += waited
                if not self._warned_slow and self.error is None:
                    self._warned_slow = True
                    warnings.warn(
                        f"comgra: the writer of run {self.writer.location.name!r} cannot keep up "
                        f"(queue full at {self.max_queue_bytes >> 20} MiB); training waited {waited * 1000:.0f} ms. "
                        "HINT: record less often (every_n_steps / schedule) or keep fewer samples.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            if self.error is not None:  # it stopped answering while we waited
                return not self._check_error()
            self._queue.append((kind, item, nbytes))
            self._queued_bytes += nbytes
            self._submitted += 1
            self._cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything submitted so far is written and committed."""
        with self._cond:
            target = self._submitted
            self._flush_wanted += 1
            self._cond.notify_all()
            if not self._wait_locked("flush", lambda: self._done >= target, timeout):
                raise StoreError(f"flushing run {self.writer.location.name!r} timed out after {timeout} s.")
        self._check_error()

    def close(self, status: RunStatus, error: str | None = None, timeout: float | None = 600.0) -> None:
        """Write what is queued, mark the run, stop the thread. Safe to call twice."""
        if self._closed:
            return
        after_error = status == "failed"  # an exception is on its way: never raise over it
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._wait_locked("write what is queued", lambda: self._finished, timeout, closing=True)
        self._thread.join(1.0)
        self._closed = True
        _LIVE.discard(self)
        failure: BaseException | None
        if self._thread.is_alive():  # stuck: it cannot be stopped, and the store must not get two writers
            failure = self.error or StoreError(f"the writer thread of run {self.writer.location.name!r} did not finish")
        else:
            if self.error is not None:
                status, error = "failed", error or f"writing failed: {self._error_text}"
            try:
                self.writer.close(status, error)
            except Exception as exc:  # the store is gone; nothing more we can do but say so
                log.error("comgra: could not mark run %r as %s: %s", self.writer.location.name, status, exc)
            failure = None if self.error is None else StoreError(f"writing run {self.writer.location.name!r} failed: {self._error_text}")
        if failure is None:
            return
        in_flight = sys.exc_info()[1]
        if in_flight is not None and not self._raised:
            in_flight.add_note(f"comgra: {failure} (the run {self.writer.location.name!r} may be incomplete)")
        if self.on_error == "raise" and not self._raised and not after_error and in_flight is None:
            self._raised = True
            raise failure from self.error
        warnings.warn(f"comgra: run {self.writer.location.name!r} may be incomplete: {failure}", RuntimeWarning, stacklevel=2)

    def _wait_locked(self, what: str, ready: Callable[[], bool], timeout: float | None = None, *, closing: bool = False) -> bool:
        """With the lock held: wait until ``ready()``. Warns after STALL_WARN_SECS without progress of the
        thread; after STALL_SECS without progress it records a StoreError as the writer's error. False when
        ``timeout`` (in all) ran out first."""
        started = changed = time.monotonic()
        seen = self._progress()
        while not ready() and (closing or self.error is None):
            now = time.monotonic()
            if self._progress() != seen:
                seen, changed = self._progress(), now
            idle = now - changed
            if timeout is not None and now - started >= timeout:
                return False
            if idle >= STALL_SECS:
                if closing and self.error is not None:
                    break
                self.error = StoreError(
                    f"`BackgroundWriter`: the writer thread of run {self.writer.location.name!r} made no progress for "
                    f"{round(idle, 1):g} s while training waited to {what}: it is stuck. Recording of this run stops. "
                    "HINT: check the disk or the store it writes to."
                )
                self._error_text = str(self.error)
                break
            if idle >= STALL_WARN_SECS and not self._warned_stall:
                self._warned_stall = True
                warnings.warn(
                    f"comgra: the writer thread of run {self.writer.location.name!r} has made no progress for "
                    f"{round(idle, 1):g} s; training waits to {what}, at most {STALL_SECS:g} s, then on_write_error="
                    f"{self.on_error!r} decides.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._cond.wait(min(0.5, max(STALL_SECS / 20, 0.01)))
        return True

    def _progress(self) -> tuple[int, int, int]:
        return self._done, self.records_written, self._queued_bytes

    def _check_error(self) -> bool:
        if self.error is None:
            return False
        if self.on_error == "raise":
            self._raised = True
            raise StoreError(
                f"writing run {self.writer.location.name!r} failed: {self._error_text}"
            ) from self.error
        if not self._warned_error:
            self._warned_error = True
            warnings.warn(
                f"comgra: writing run {self.writer.location.name!r} failed; recording stops, training goes on. "
                f"Cause: {self._error_text}",
                RuntimeWarning,
                stacklevel=4,
            )
        return True

    # ------------------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _loop(self) -> None:
        pending: list[HostRecord] = []
        pending_items = 0
        pending_bytes = 0
        last_flush = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not self._stopping and not self._flush_wanted:
                    timeout = self.flush_secs - (time.monotonic() - last_flush) if pending else None
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                batch = list(self._queue)
                self._queue.clear()
                flush_wanted, self._flush_wanted = self._flush_wanted, 0
                stopping = self._stopping
            done_now = 0
            for kind, item, nbytes in batch:
                if self.error is None:
                    try:
                        if kind == "record":
                            pending.append(item.materialize())  # armed steps nobody kept never get here
                            pending_items += 1
                            pending_bytes += nbytes
                            if len(pending) >= self.flush_rows or pending_bytes >= self.flush_bytes:
                                self._append(pending)
                                pending, pending_bytes, last_flush = [], 0, time.monotonic()
                        else:
                            item(self.writer)
                    except BaseException as exc:  # keep the thread alive; report to the trainer
                        self._fail(exc)
                if kind == "record":
                    with self._cond:
                        self._queued_bytes -= nbytes  # as counted when queued: materialize() frees the tensors
                        self._cond.notify_all()
                else:
                    done_now += 1
            due = pending and (time.monotonic() - last_flush >= self.flush_secs)
            if pending and (flush_wanted or stopping or due) and self.error is None:
                try:
                    self._append(pending)
                except BaseException as exc:
                    self._fail(exc)
                pending, pending_bytes, last_flush = [], 0, time.monotonic()
            if not pending or self.error is not None:
                done_now += pending_items
                pending, pending_items, pending_bytes = [], 0, 0
            with self._cond:
                self._done += done_now
                self._cond.notify_all()
            if stopping and not self._queue:
                return

    def _append(self, records: list[HostRecord]) -> None:
        self.writer.append(records)
        self.records_written += len(records)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._error_text = f"{type(exc).__name__}: {exc}"
        log.error("comgra: writer failed:\n%s", "".join(traceback.format_exception(exc)))
        with self._cond:
            self._cond.notify_all()


def _flush_live_writers() -> None:
    """At interpreter exit, commit what is queued (a run's status stays "running": it did not finish)."""
    for bg in list(_LIVE):
        try:
            bg.flush(timeout=30)
        except Exception as exc:  # the store is gone; what was committed before stays valid
            log.error("comgra: could not write the last records of run %r at exit: %s", bg.writer.location.name, exc)


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
