"""ProcessWriter: write a run from a separate process, so that recording does not compete for the GIL.

Measured on the benchmark workload (docs/benchmarks.md): any Python work on a thread of the training process
slows training far more than its own CPU time, because every torch operation of the training step releases
the GIL and has to win it back. So the training thread only copies a recorded step's tensors into a shared
ring (:mod:`.ring`) and sends a JSON line describing them; the writer process (:mod:`.worker`) computes the
statistics with numpy on another core and does every write.

What the training side promises (docs/reliability.md):

- **No wait without end.** Every wait on the writer process (room in the ring, the pipe, a flush, the close)
  ends when the writer makes progress; after ``STALL_WARN_SECS`` without progress a warning says so, after
  ``STALL_SECS`` the wait gives up and ``on_error`` decides: ``"warn"`` stops recording and training goes on,
  ``"raise"`` raises :class:`StoreError`.
- **Bounded loss.** No record waits in the ring longer than ``flush_secs`` (training waits instead), and the
  writer commits every record at most ``flush_secs`` after it took it: what was recorded more than about
  ``2 * flush_secs`` ago is committed, even if every process is killed.
- **Any step fits.** A step larger than the ring goes in parts; a tensor larger than half the ring is reduced
  here, where it lives (:func:`~.pending.pack`), and only its results travel (:mod:`.parts`).
- **The user's exception wins.** Closing after an exception (``status="failed"``) never raises; a writer's
  error is attached to the exception in flight as a note.

It is a :class:`~comgra_callbacks.store.sink.Sink` like the thread writer: the same typed messages
(:mod:`~comgra_callbacks.store.messages`, sent as JSON lines), the same loop on the other side
(:class:`~comgra_callbacks.store.sink.Worker`), the same bounded wait and error policy; what is its own is
the ring and the choice of what travels raw (:meth:`ProcessWriter.submit`).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from comgra_callbacks.errors import FormatVersionError, StoreError
from comgra_callbacks.recording.parts import (
    Part,
    RawPart,
    describe_raw,
    plan_raw,
    raw_signature,
    reduce_in_writer,
    split_packed,
)
from comgra_callbacks.recording.pending import PackedStep, PendingStep, pack, updated
from comgra_callbacks.recording.reduce_numpy import KERNEL_AT_START_NUMEL
from comgra_callbacks.recording.ring import CLOSED, CONSUMED, ERROR, FLUSHED, PROGRESS, RECORDS, Ring
from comgra_callbacks.store.messages import (
    Answer,
    CloseMessage,
    ErrorAnswer,
    FlushMessage,
    LayoutMessage,
    Message,
    OpMessage,
    PackedItem,
    PackedLayoutMessage,
    PackedMessage,
    RawItem,
    RecordMessage,
    StartMessage,
    StepMeta,
    decode_answer,
    encode,
)
from comgra_callbacks.store.sink import ErrorPolicy, WaitTimedOut, slow_warning, wait_bounded

CLOSE_SECS_AFTER_ERROR = 30.0  # closing after an exception waits at most this long; the writer finishes alone
NICE_ENV = "COMGRA_WRITER_NICE"  # the writer process's niceness where torch's threads use every core (see _yield_cores)
WRITER_NICE: int | str = 0
_LAYOUTS_KEPT = 64  # the writer process keeps the last 64 layouts (worker.py)
_PLANS_KEPT = 16  # raw plans kept by signature (_raw_parts): step types, a few shapes
_FINISHING_ALONE: list[subprocess.Popen[bytes]] = []  # writers left to finish after close: reaped later


class ProcessWriter:
    """The training side of a writer process.

    Args:
        root / run / storage_options / resume / meta: where the run is and how to open it (see ``RunWriter``).
        max_queue_bytes: size of the shared ring (memory reserved up front); recorded steps wait when it is
            full, and a warning says so once.
        flush_rows / flush_bytes / flush_secs: how the writer process blocks records (see BackgroundWriter);
            ``flush_secs`` also bounds how long a record may wait in the ring.
        on_error: ``"warn"`` or ``"raise"`` when writing fails or the writer process stops answering.
        start_timeout: seconds to wait for the writer process to open the run.
        expected_numel: about how many elements a recorded step will carry (e.g. three times the model's
            parameters): from ``reduce_numpy.KERNEL_AT_START_NUMEL`` on, where the writer process reduces raw
            steps, it loads its one-pass kernel before it answers (~1 s more at the start) instead of while
            the first steps arrive, when it falls behind and training waits for room in the ring.

    Raises:
        StoreError: the writer process could not start or could not open the run (the message says why).
    """

    deferred_updates = True  # takes updates still kept as the weight after the step (store/sink.py)

    def __init__(
        self,
        *,
        root: str,
        run: str,
        storage_options: dict[str, Any] | None = None,
        resume: bool = False,
        meta: dict[str, Any] | None = None,
        max_queue_bytes: int = 256 << 20,
        flush_rows: int = 256,
        flush_bytes: int = 32 << 20,
        flush_secs: float = 2.0,
        on_error: Literal["warn", "raise"] = "warn",
        start_timeout: float = 120.0,
        expected_numel: int = 0,
    ) -> None:
        self.name = run
        self._nice = writer_nice()
        self.on_error = on_error
        self.policy = ErrorPolicy(run, on_error)
        self.flush_secs = flush_secs
        self.wait_seconds = 0.0
        self._root, self._storage_options = root, storage_options
        self._closed = False
        self._failure: StoreError | None = None  # found on this side: the writer stopped answering
        self._flush_id = 0
        self._layout_ids: dict[tuple[Any, ...], int] = {}  # raw and packed layouts, one counter
        self._next_layout = 0
        self._plans: dict[tuple[Any, ...], list[RawPart]] = {}  # raw plans by step signature (_raw_parts)
        self._in_ring: deque[tuple[int, float]] = deque()  # (produced counter after a message, when it was sent)
        self._records_written = 0
        try:
            self.ring = Ring.create(max_queue_bytes)
        except OSError as exc:
            raise StoreError(f"`ProcessWriter`: cannot reserve the recording buffer: {exc}") from exc
        _FINISHING_ALONE[:] = [p for p in _FINISHING_ALONE if p.poll() is None]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "comgra_callbacks.recording.worker", str(self.ring.fd), str(self.ring.size)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(self.ring.fd,),
                start_new_session=True,  # signals sent to the trainer's process group do not reach it
                env=env,
            )
        except BaseException:
            self.ring.close()
            raise
        self._yield_cores()
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin.fileno()
        os.set_blocking(self._stdin, False)  # every write is bounded (_send)
        try:
            load_kernel = expected_numel >= KERNEL_AT_START_NUMEL and reduce_in_writer()  # within 8 records anyway
            self._send(StartMessage(root, run, storage_options, resume, meta or {}, flush_rows, flush_bytes, flush_secs, load_kernel))
            answer = self._read_answer(start_timeout)
            if isinstance(answer, ErrorAnswer):
                raise StoreError(answer.error)
        except BaseException:
            self._kill()
            self.ring.close()
            raise

    def _yield_cores(self) -> None:
        """Where torch's threads use every core, the writer process runs at a lower priority: it then takes a
        core when training leaves one (its Python between operations, data loading), not in the middle of a
        parallel operation, whose other threads would wait for the one it preempted. Back-pressure bounds how
        far it falls behind (the ring, ``flush_secs``)."""
        nice = self._nice
        if nice == 0 or reduce_in_writer():
            return
        try:
            if nice == "idle":
                if hasattr(os, "SCHED_IDLE"):
                    os.sched_setscheduler(self.proc.pid, os.SCHED_IDLE, os.sched_param(0))
            elif hasattr(os, "setpriority"):  # relative to the trainer's own niceness
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + int(nice)))
        except OSError:  # not allowed here: it runs at the trainer's priority
            pass

    # ----------------------------------------------------------------------------- plumbing
    def _send(self, message: Message) -> None:
        """Write one message without ever blocking for long (see :meth:`_wait`).

        Every message starts on a new line (:func:`~comgra_callbacks.store.messages.encode`): one torn by an
        interrupt (Ctrl+C while it was written) ends there, the writer process skips it and reads the next
        one whole."""
        data = encode(message)
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(self._stdin, view)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    raise self._gone() from exc
                if n:
                    view = view[n:]
                else:
                    self._wait("send to it", lambda: bool(select.select([], [self._stdin], [], 0.005)[1]))
        except BaseException:
            if len(view) != len(data):
                self._layout_ids.clear()  # a layout may have been torn: describe every layout again
            raise

    def _send_nowait(self, message: Message) -> None:
        data = encode(message)
        try:
            os.write(self._stdin, data)  # all of it, or a torn line the writer process skips
        except OSError:
            pass

    def _read_answer(self, timeout: float) -> Answer:
        """The writer process's answer to the start (:func:`~comgra_callbacks.store.messages.decode_answer`),
        waiting at most ``timeout`` seconds for it to begin; an answer it cannot read says so, naming the run."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        while line == b"\n":  # every message starts on a new line (encode); the answer follows in the same write
            line = self.proc.stdout.readline()
        if not line:
            code = self.proc.poll()
            raise StoreError(
                f"`ProcessWriter`: the writer process of run {self.name!r} did not start (exit code {code}); see its error output above."
                if code is not None else f"`ProcessWriter`: the writer process of run {self.name!r} did not answer within {timeout:.0f} s."
            )
        try:
            return decode_answer(line)
        except (StoreError, FormatVersionError) as exc:
            raise type(exc)(f"`ProcessWriter`: the writer process of run {self.name!r} answered its start with {line[:200]!r}: {exc}") from exc

    def _gone(self) -> StoreError:
        return StoreError(f"the writer process of run {self.name!r} stopped (exit code {self.proc.poll()}).")

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float | None = None, *, closing: bool = False) -> float:
        """Wait until ``ready()``, bounded (:func:`~comgra_callbacks.store.sink.wait_bounded`); also ends
        when the writer process is gone or reported an error. Returns the seconds waited."""
        pauses = [0.0002]

        def pause() -> None:  # short at first: most waits end within a millisecond
            time.sleep(pauses[0])
            pauses[0] = min(pauses[0] * 2, 0.005)

        def check() -> None:
            if self.proc.poll() is not None:
                raise self._gone()
            if self.ring.header[ERROR] and not closing:
                raise self._writer_error()

        return wait_bounded(
            ready,
            progress=self._progress,
            pause=pause,
            what=what,
            who=f"the writer process of run {self.name!r} (pid {self.proc.pid})",
            owner="`ProcessWriter`",
            stuck=(
                "it is stopped or hung. Recording of this run stops. "
                f"HINT: `kill -CONT {self.proc.pid}` if it was stopped; check the disk or the store it writes to."
            ),
            warn=self.policy.warn_once,
            on_error=self.on_error,
            timeout=timeout,
            check=check,
        )

    def _progress(self) -> tuple[int, int]:
        return int(self.ring.header[CONSUMED]), int(self.ring.header[PROGRESS])

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:  # a pipe to a dead process: closing it still releases it
                    pass

    def _writer_error(self) -> StoreError:
        return StoreError(f"writing run {self.name!r} failed: {self.ring.error_text()}")

    @property
    def error(self) -> StoreError | None:
        if self._failure is not None:
            return self._failure
        if self.ring.header is not None and self.ring.header[ERROR]:
            return self._writer_error()
        if self.proc.poll() not in (None, 0):
            return self._gone()
        return None

    def _check_error(self) -> bool:
        return self.policy.check(self.error)

    @property
    def records_written(self) -> int:
        """Records the writer process has taken so far (committed within ``flush_secs``)."""
        if self.ring.header is not None:
            self._records_written = int(self.ring.header[RECORDS])
        return self._records_written

    # ------------------------------------------------------------------------------- records
    def submit(self, step: PendingStep | PackedStep) -> bool:
        """Hand a step to the writer process; False when it was dropped (writing has failed).

        Where its statistics are computed is this sink's placement, decided here alone
        (:func:`travels_raw`): a step of CPU tensors travels raw when the writer process has a core of its
        own, and is reduced here (:func:`~.pending.pack`) otherwise; a packed step travels as is."""
        if self._closed:
            raise StoreError(f"the writer of run {self.name!r} is closed; nothing more can be written.")
        if self._check_error():
            return False
        if isinstance(step, PendingStep) and not travels_raw(step):
            step = pack(step)  # reduced here, on the tensors' device
        warn = self.policy.warn_once
        try:
            if isinstance(step, PackedStep):
                r = step.record
                meta = StepMeta(r.step, r.step_type, r.epoch, r.batch_idx, r.time, r.reason)
                self._send_all(meta, None, (Part(packed=p) for p in split_packed(step, self.ring.capacity, warn, self.name)))
            else:
                meta = StepMeta(step.step, step.step_type, step.epoch, step.batch_idx, step.time, step.reason or "schedule")
                self._send_all(meta, step, self._raw_parts(step))
                step.snapshots = []
        except StoreError as exc:
            if self.error is None:
                self._failure = exc
            self._check_error()
            return False
        return True

    def _raw_parts(self, step: PendingStep) -> Iterator[Part | RawPart]:
        """A step's parts: the plan of the last steps with the same tensors (layouts, dtype blocks, offsets:
        what ~40 tensors cost ~1 ms of Python to work out), or a new plan. Parts reduced here are not kept."""
        signature = raw_signature(step.snapshots)
        plan = self._plans.get(signature)
        if plan is not None:
            return iter(plan)
        parts = plan_raw(step, self.ring.capacity, self.policy.warn_once, self.name)
        if any(part.reduce is not None for part in parts):
            return self._resolve(step, parts)
        plan = [describe_raw(step, part.raw or []) for part in parts]
        if len(self._plans) >= _PLANS_KEPT:
            self._plans.clear()
        self._plans[signature] = plan
        return iter(plan)

    def _resolve(self, pending: PendingStep, parts: list[Part]) -> Iterator[Part]:
        """Parts as they are sent: snapshots reduced here become results (one ``pack`` per group, when due)."""
        for part in parts:
            if part.reduce is None:
                yield part
                continue
            p = pending
            sub = PendingStep(p.step, p.step_type, p.epoch, p.batch_idx, p.time, p.reason, [p.snapshots[i] for i in part.reduce], p.sample_index, p.batch_size)
            for piece in split_packed(pack(sub), self.ring.capacity, self.policy.warn_once, self.name):
                yield Part(packed=piece)

    def _send_all(self, meta: StepMeta, pending: PendingStep | None, parts: Iterator[Part | RawPart]) -> None:
        """Send the parts of one record; every message but the last says ``more``."""
        current = next(parts, None)
        index = 0
        while current is not None:
            following = next(parts, None)
            part = {"part": index, "more": following is not None}
            if isinstance(current, RawPart):
                assert pending is not None
                self._send_raw(pending, current, meta, part)
            elif current.packed is not None:
                self._send_packed(current.packed, meta, part)
            else:
                assert pending is not None and current.raw is not None
                self._send_raw(pending, describe_raw(pending, current.raw), meta, part)
            current, index = following, index + 1

    def _room(self, nbytes: int) -> int:
        """Where ``nbytes`` go in the ring: waits (bounded) for room, and while the oldest record in the ring
        has waited longer than ``flush_secs`` (what SIGKILL can take is bounded by time, not by size)."""
        now = time.monotonic()
        consumed = int(self.ring.header[CONSUMED])
        while self._in_ring and self._in_ring[0][0] <= consumed:
            self._in_ring.popleft()
        overdue = [end for end, sent in self._in_ring if now - sent > self.flush_secs]
        waited = 0.0
        if overdue:
            target = overdue[-1]
            waited += self._wait("take records older than flush_secs", lambda: int(self.ring.header[CONSUMED]) >= target)
        box: list[tuple[int, int]] = []

        def placed() -> bool:
            spot = self.ring.place(nbytes)
            if spot is not None:
                box.append(spot)
            return spot is not None

        if not placed():
            waited += self._wait("find room in the buffer", placed)
        if waited:
            self.wait_seconds += waited
            why = f"buffer of {self.ring.capacity >> 20} MiB full, or records waited more than flush_secs={self.flush_secs:g} s"
            self.policy.warn_once("slow", slow_warning(self.name, why, waited))
        return box[0][0]

    def _sent(self) -> None:
        self._in_ring.append((self.ring.produced, time.monotonic()))

    def _send_raw(self, pending: PendingStep, raw: RawPart, meta: StepMeta, part: dict[str, Any]) -> None:
        """Copy a part's tensors into the ring (one ``torch.cat`` per dtype, straight into the ring) and send
        the message that names its layout."""
        import torch

        snaps, indices, converted = pending.snapshots, raw.indices, raw.converted
        base = self._room(max(raw.total, 64))
        with torch.no_grad():  # views without autograd's bookkeeping: cheaper than detach() per tensor
            for dtype, members, start, size in raw.blocks:
                if size:
                    out = self.ring.region(base + start, size).view(dtype)
                    flat = [snaps[indices[j]].tensor.reshape(-1) for j in members]
                    if raw.resolve:  # deferred updates whose weight before travels in another part
                        flat = [updated(snaps[indices[j]]).reshape(-1) if j in raw.resolve else t for j, t in zip(members, flat)]
                    if converted:
                        flat = [t.to(dtype) if j in converted else t for j, t in zip(members, flat)]
                    torch.cat(flat, out=out)
        if not raw.layout or raw.layout <= self._next_layout - _LAYOUTS_KEPT:  # new, or forgotten by the writer process
            raw.layout = self._layout(raw.items)
        index = pending.sample_index
        self._send(RecordMessage(
            meta, raw.layout, base, self.ring.produced, raw.total, pending.batch_size,
            None if index is None else tuple(int(v) for v in index.reshape(-1).tolist()),
            **part,  # which part of the step, and whether more follow
        ))
        self._sent()

    def _layout(self, items: tuple[RawItem, ...]) -> int:
        """The id of a layout the writer process knows (the same tensors every step: described once)."""
        return self._layout_id(items, lambda number: LayoutMessage(number, items))

    def _packed_layout(self, layout: list[tuple[Any, str, Any, Any]]) -> int:
        """The id of a packed record's series the writer process knows (described once, like raw layouts)."""
        entries: tuple[tuple[Any, str, tuple[int, ...] | None, tuple[int, ...] | None], ...] = tuple(
            (k, dtype, None if ns is None else tuple(ns), None if ss is None else tuple(ss)) for k, dtype, ns, ss in layout
        )

        def message(number: int) -> PackedLayoutMessage:
            return PackedLayoutMessage(number, tuple(PackedItem(k.node, k.role, k.iteration, k.view, dtype, ns, ss) for k, dtype, ns, ss in entries))

        return self._layout_id(("packed", entries), message)

    def _layout_id(self, key: tuple[Any, ...], message: Callable[[int], Message]) -> int:
        known = self._layout_ids.get(key)
        if known is not None and known > self._next_layout - _LAYOUTS_KEPT:
            return known
        self._next_layout += 1
        self._send(message(self._next_layout))
        self._layout_ids[key] = self._next_layout
        if len(self._layout_ids) > 2 * _LAYOUTS_KEPT:
            self._layout_ids = {k: v for k, v in self._layout_ids.items() if v > self._next_layout - _LAYOUTS_KEPT}
        return self._next_layout

    def _send_packed(self, packed: PackedStep, meta: StepMeta, part: dict[str, Any]) -> None:
        if packed.event is not None:  # statistics computed on an accelerator: one synchronisation here
            packed.event.synchronize()
        flat = packed.host.numpy() if not isinstance(packed.host, np.ndarray) else packed.host
        base = self._room(flat.nbytes)
        self.ring.array(base, np.float32, flat.shape)[:] = flat
        layout = self._packed_layout(packed.layout)
        self._send(PackedMessage(meta, base, int(flat.size), self.ring.produced, int(flat.nbytes), layout, **part))
        self._sent()

    # ------------------------------------------------------------------------------ the rest
    def op(self, name: str, *args: Any) -> bool:
        """A sidecar operation (``write_graph``, ``add_notes``, ``start_segment``, ...), in order with records."""
        message = OpMessage(name, args)  # an unknown name is a clear error here, not in the writer process
        if self._closed or self._check_error():
            return False
        try:
            self._send(message)
        except StoreError as exc:
            self._note_failure(exc)
            self._check_error()
            return False
        return True

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything sent so far is written and committed (bounded: see :meth:`_wait`)."""
        if self._check_error():
            return
        self._flush_id += 1
        target = self._flush_id
        try:
            self._send(FlushMessage(target))
            self._wait("flush", lambda: int(self.ring.header[FLUSHED]) >= target, timeout)
        except StoreError as exc:
            if isinstance(exc, WaitTimedOut) and self._failure is None:
                raise StoreError(f"flushing run {self.name!r} timed out after {timeout} s.") from exc
            self._note_failure(exc)
        self._check_error()

    def _note_failure(self, exc: StoreError) -> None:
        """An error met while talking to the writer process. One it reported itself (in the ring's header) is not
        kept here: the process still reads its input and, told to close, marks the run ``failed`` itself
        (:meth:`close` waits for that); only an error of this side's (a broken pipe, a writer that stopped
        answering) makes :meth:`close` leave the process to finish alone."""
        if self._failure is None and not (self.ring.header is not None and self.ring.header[ERROR]):
            self._failure = exc

    def close(self, status: Literal["running", "finished", "failed"], error: str | None = None, timeout: float | None = 600.0) -> None:
        """Write what is queued, mark the run, stop the writer process. Safe to call twice.

        With ``status="failed"`` (an exception is on its way) it waits at most CLOSE_SECS_AFTER_ERROR and never
        raises: a writer's error becomes a note on the exception being handled. A writer process that does
        not finish in time is left to finish alone (it has everything; it ignores the signals meant for
        training)."""
        if self._closed:
            return
        self._closed = True
        after_error = status == "failed"
        limit = min(timeout or CLOSE_SECS_AFTER_ERROR, CLOSE_SECS_AFTER_ERROR) if after_error else timeout
        failure = self.error
        if failure is not None:
            status, error = "failed", error or str(failure)
        try:
            if self.proc.poll() is None and self._failure is None:
                self._send(CloseMessage(status, error))
                self._close_pipes()
                self._wait("write what it holds and close the run", lambda: self.proc.poll() is not None, limit, closing=True)
            elif self.proc.poll() is None:  # it stopped answering: one try, so that it says why when it goes on
                self._send_nowait(CloseMessage(status, error))
        except StoreError as exc:
            failure = failure or exc
        finally:
            self._close_pipes()  # the writer process sees the end of its input: it finishes alone if it must
            closed = bool(self.ring.header[CLOSED])
            failure = failure or (None if closed else self.error)
            self.records_written  # noqa: B018 - keep the last count
            self.ring.close()
            if self.proc.poll() is None:
                _FINISHING_ALONE.append(self.proc)
        if not closed and self.proc.poll() is not None:
            self._mark_failed("; ".join(x for x in (error, str(failure or "the writer process ended without closing the run")) if x))
        self.policy.closed(failure, after_error=after_error)

    def _mark_failed(self, reason: str) -> None:
        """The writer process died: mark the run ``failed`` from here (what it committed stays valid)."""
        from comgra_callbacks.store import format as fmt
        from comgra_callbacks.store.storage import open_root

        try:
            location = open_root(self._root, self._storage_options).run(self.name)
            meta = location.read_json(fmt.META_FILE) or {}
            if meta.get("status") == "running":
                meta.update(status="failed", finished=time.time(), error=reason)
                location.write_json(fmt.META_FILE, meta)
        except Exception as exc:  # the store is gone too; a reader sees "running" with an old heartbeat
            warnings.warn(f"comgra: could not mark run {self.name!r} as failed: {exc}", RuntimeWarning, stacklevel=3)


def writer_nice() -> int | str:
    """How much nicer than the trainer the writer process runs where torch's threads use every core
    (``"idle"``: Linux's ``SCHED_IDLE``, only on a core nothing else wants): ``COMGRA_WRITER_NICE``, else
    :data:`WRITER_NICE`."""
    text = os.environ.get(NICE_ENV, "").strip().lower()
    if not text:
        return WRITER_NICE
    if text == "idle":
        return text
    if not text.isdigit() or int(text) > 19:
        raise StoreError(f"`{NICE_ENV}={text!r}`: expected a niceness, an integer from 0 to 19 (0: the trainer's priority), or 'idle'.")
    return int(text)


def travels_raw(step: PendingStep) -> bool:
    """Whether a step's raw tensors go to the writer process, which reduces them: only CPU tensors (an
    accelerator's are reduced where they live), and only when the writer has a core torch does not use
    (:func:`~.parts.reduce_in_writer`, measured in docs/benchmarks.md)."""
    return reduce_in_writer() and all(s.tensor.is_cpu for s in step.snapshots)
