"""ProcessWriter: write a run from a separate process, so that recording does not compete for the GIL.

Measured on the benchmark workload (docs/benchmarks.md): any Python work on a thread of the training process
slows training far more than its own CPU time, because every torch operation of the training step releases
the GIL and has to win it back. So the training thread only copies a recorded step's tensors into a shared
ring (:mod:`.ring`) and sends a JSON line describing them; the writer process (:mod:`.worker`) computes the
statistics with numpy on another core and does every write. It also outlives a training process killed
with ``SIGKILL`` long enough to commit what it had received.

Same interface as :class:`~comgra_callbacks.store.background.BackgroundWriter`: ``submit_record``, ``op``,
``flush``, ``close``, ``error``, ``wait_seconds``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import warnings
from typing import Any, Literal

import numpy as np

from comgra_callbacks.errors import StoreError
from comgra_callbacks.recording.pending import FULL, PackedStep, PendingStep
from comgra_callbacks.recording.ring import CLOSED, ERROR, FLUSHED, RECORDS, Ring

_NUMPY_DTYPES = {"float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


class ProcessWriter:
    """The training side of a writer process.

    Args:
        root / run / storage_options / resume / meta: where the run is and how to open it (see ``RunWriter``).
        max_queue_bytes: size of the shared ring (memory reserved up front); recorded steps wait when it is
            full, and a warning says so once.
        flush_rows / flush_bytes / flush_secs: how the writer process blocks records (see BackgroundWriter).
        on_error: ``"warn"`` or ``"raise"`` when writing fails.
        start_timeout: seconds to wait for the writer process to open the run.

    Raises:
        StoreError: the writer process could not start or could not open the run (the message says why).
    """

    accepts_raw = True

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
    ) -> None:
        self.name = run
        self.on_error = on_error
        self.wait_seconds = 0.0
        self._warned_slow = self._warned_error = self._closed = False
        self._flush_id = 0
        self._layout: list[Any] | None = None
        self._layout_id = 0
        try:
            self.ring = Ring.create(max_queue_bytes)
        except OSError as exc:
            raise StoreError(f"cannot reserve the recording buffer: {exc}") from exc
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comgra_callbacks.recording.worker", self.ring.path, str(self.ring.size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        try:
            self._send({
                "root": root, "run": run, "storage_options": storage_options, "resume": resume, "meta": meta or {},
                "flush_rows": flush_rows, "flush_bytes": flush_bytes, "flush_secs": flush_secs,
            })
            answer = self._read_answer(start_timeout)
        except BaseException:
            self._kill()
            raise
        finally:
            self.ring.unlink()  # both processes have it mapped (or the writer process is gone)
        if "error" in answer:
            self._kill()
            raise StoreError(answer["error"])

    # ----------------------------------------------------------------------------- plumbing
    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message, separators=(",", ":"), allow_nan=True) + "\n")
        except (BrokenPipeError, OSError) as exc:
            raise StoreError(f"the writer process of run {self.name!r} is gone (exit code {self.proc.poll()})") from exc

    def _read_answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            code = self.proc.poll()
            raise StoreError(
                f"the writer process of run {self.name!r} did not start (exit code {code}); see its error output above."
                if code is not None else f"the writer process of run {self.name!r} did not answer within {timeout:.0f} s."
            )
        return dict(json.loads(line))

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    @property
    def error(self) -> StoreError | None:
        if self.ring.header is not None and self.ring.header[ERROR]:
            return StoreError(f"writing run {self.name!r} failed: {self.ring.error_text()}")
        if self.proc.poll() not in (None, 0):
            return StoreError(f"the writer process of run {self.name!r} stopped (exit code {self.proc.poll()}).")
        return None

    def _check_error(self) -> bool:
        error = self.error
        if error is None:
            return False
        if self.on_error == "raise":
            raise error
        if not self._warned_error:
            self._warned_error = True
            warnings.warn(f"comgra: {error}; recording stops, training goes on.", RuntimeWarning, stacklevel=4)
        return True

    @property
    def records_written(self) -> int:
        return int(self.ring.header[RECORDS]) if self.ring.header is not None else 0

    # ------------------------------------------------------------------------------- records
    def _place(self, nbytes: int) -> int | None:
        if nbytes > self.ring.capacity:
            self._check_error()
            warnings.warn(
                f"comgra: a recorded step of run {self.name!r} needs {nbytes >> 20} MiB, more than max_queue_mb "
                f"({self.ring.capacity >> 20} MiB); it is not recorded. HINT: raise max_queue_mb or keep less (detail=).",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        spot = self.ring.place(nbytes)
        if spot is None:
            started = time.perf_counter()
            while spot is None:
                if self.proc.poll() is not None or self._check_error():
                    return None
                time.sleep(0.0005)
                spot = self.ring.place(nbytes)
            waited = time.perf_counter() - started
            self.wait_seconds += waited
            if not self._warned_slow:
                self._warned_slow = True
                warnings.warn(
                    f"comgra: the writer of run {self.name!r} cannot keep up (buffer full at {self.ring.capacity >> 20} MiB); "
                    f"training waited {waited * 1000:.0f} ms. HINT: record less often (schedule=) or keep less (detail=).",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return spot[0]

    def submit_record(self, item: PendingStep | PackedStep) -> bool:
        """Copy a step into the ring and describe it to the writer process; False when it was dropped."""
        if self._closed:
            raise StoreError(f"the writer of run {self.name!r} is closed; nothing more can be written.")
        if self._check_error():
            return False
        if isinstance(item, PackedStep):
            return self._submit_packed(item)
        return self._submit_raw(item)

    def _submit_raw(self, pending: PendingStep) -> bool:
        """Copy the step's tensors into the ring: one ``torch.cat`` per dtype, straight into the ring."""
        import torch

        snaps = pending.snapshots
        tensors = []
        for snap in snaps:
            t = snap.tensor.detach()
            if str(t.dtype).replace("torch.", "") not in _NUMPY_DTYPES:
                t = t.to(torch.float32)
            tensors.append(t)
        by_dtype: dict[Any, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        blocks = []
        total = 0
        for dtype, members in by_dtype.items():
            size = sum(tensors[i].numel() for i in members) * tensors[members[0]].element_size()
            blocks.append((dtype, members, total, size))
            total += ((size + 63) // 64) * 64
        base = self._place(max(total, 64))
        if base is None:
            return False
        offsets = [0] * len(tensors)  # relative to base
        for dtype, members, start, size in blocks:
            if size:
                out = self.ring.region(base + start, size).view(dtype)
                torch.cat([tensors[i].reshape(-1) for i in members], out=out)
            position = start
            for i in members:
                offsets[i] = position
                position += tensors[i].numel() * tensors[i].element_size()
        value_index = {s.key.node: i for i, s in enumerate(snaps) if s.key.view == "value" and s.is_parameter}
        items = []
        for i, (snap, t) in enumerate(zip(snaps, tensors)):
            k = snap.key
            ref = value_index.get(k.node) if snap.reference is not None else None
            samples = FULL if snap.samples == FULL else int(snap.samples)
            dtype = str(t.dtype).replace("torch.", "")
            items.append([k.node, k.role, k.iteration, k.view, snap.dtype, dtype, list(t.shape), offsets[i], snap.is_parameter, bool(snap.neurons), samples, ref, snap.neuron_axis])
        if items != self._layout:  # the same tensors every step: describe them once
            self._layout, self._layout_id = items, self._layout_id + 1
            self._send({"op": "layout", "id": self._layout_id, "items": items})
        index = pending.sample_index
        self._send({
            "op": "record",
            "layout": self._layout_id,
            "base": base,
            "end": self.ring.produced,
            "nbytes": total,
            "meta": [pending.step, pending.step_type, pending.epoch, pending.batch_idx, pending.time, pending.reason or "schedule"],
            "batch_size": pending.batch_size,
            "sample_index": None if index is None else [int(v) for v in index.reshape(-1).tolist()],
        })
        pending.snapshots = []
        return True

    def _submit_packed(self, packed: PackedStep) -> bool:
        if packed.event is not None:  # statistics computed on an accelerator: one synchronisation here
            packed.event.synchronize()
        flat = packed.host.numpy()
        base = self._place(flat.nbytes)
        if base is None:
            return False
        self.ring.array(base, np.float32, flat.shape)[:] = flat
        layout = [[k.node, k.role, k.iteration, k.view, dtype, ns and list(ns), ss and list(ss)] for k, dtype, ns, ss in packed.layout]
        r = packed.record
        self._send({
            "op": "packed", "end": self.ring.produced, "nbytes": flat.nbytes, "offset": base, "length": int(flat.size), "layout": layout,
            "meta": [r.step, r.step_type, r.epoch, r.batch_idx, r.time, r.reason],
        })
        return True

    # ------------------------------------------------------------------------------ the rest
    def op(self, name: str, *args: Any) -> bool:
        """A sidecar operation (``write_graph``, ``add_notes``, ``start_segment``, ...), in order with records."""
        if self._closed or self._check_error():
            return False
        self._send({"op": name, "args": list(args)})
        return True

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything sent so far is written and committed."""
        self._flush_id += 1
        self._send({"op": "flush", "id": self._flush_id})
        deadline = None if timeout is None else time.monotonic() + timeout
        while int(self.ring.header[FLUSHED]) < self._flush_id:
            if self.proc.poll() is not None or self.ring.header[ERROR]:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise StoreError(f"flushing run {self.name!r} timed out after {timeout} s.")
            time.sleep(0.001)
        self._check_error()

    def close(self, status: Literal["running", "finished", "failed"], error: str | None = None, timeout: float | None = 600.0) -> None:
        """Write what is queued, mark the run, stop the writer process. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        failure = self.error
        try:
            if self.proc.poll() is None:
                if failure is not None:
                    status, error = "failed", error or str(failure)
                self._send({"op": "close", "status": status, "error": error})
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout)
        except (StoreError, subprocess.TimeoutExpired):
            self._kill()
        finally:
            closed = bool(self.ring.header[CLOSED])
            failure = failure or self.error
            self.ring.close()
        if failure is not None and self.on_error == "raise":
            raise failure
        if failure is not None or not closed:
            warnings.warn(f"comgra: run {self.name!r} may be incomplete: {failure or 'the writer process did not close it'}", RuntimeWarning, stacklevel=2)
