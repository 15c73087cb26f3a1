"""The plain sums of a tensor in one pass over its memory: a numba kernel for the CPU (optional).

:func:`comgra_callbacks.stats.sums_torch` reads a tensor in six torch reductions and three element-wise
passes (~11 passes over its memory); :func:`sums_fused` computes the same ``(g, len(SUM_NAMES), k)`` sums
(sum, sum of squares, sum of absolute values, non-zero count, min, max per neuron) while reading each element
once, vectorised by LLVM: about 2.5x faster on the transformer's activations (docs/benchmarks.md), and it
releases the GIL, so the two threads of ``reduce.share_work`` run it side by side.

numba is an optional dependency (``pip install comgra_callbacks[fast]``): where it is missing, or
``COMGRA_KERNEL=torch`` is set, :func:`available` is False and the recorder uses torch's kernels (the same
numbers). It is imported, and the kernels compiled (cached on disk by numba), only when a step large enough
to gain from it is first reduced (``reduce.FUSED_MIN_NUMEL``), so small runs and tests never pay for it.

How the kernels read (a 3-D view ``(g, items, k)`` over axis 1, or ``(g, k, items)`` over axis 2):

* over axis 1, where a neuron's items are ``k`` apart: rows of ``k`` are added into per-neuron float32
  accumulators, folded into float64 totals every ``BLOCK`` rows (so float32 rounding builds up over at most
  ``BLOCK`` items);
* over axis 2, a neuron's items are contiguous: each ``BLOCK`` of them is summed in x's dtype with
  re-association allowed (SIMD: the block's loop runs over a slice of its own, ``block_sums``, which LLVM
  vectorises where a loop over ``range(i0, i1)`` of the row stayed scalar) and folded into float64 totals,
  about the mean of its first ``BLOCK``; a long row (``_fused_kernels.WIDE_ROW`` items or more) is read as
  128 lanes, as over axis 1, and the lanes' sums added up;
* min and max compare the floats' bits as integers (an order-preserving map), which vectorises where float
  comparisons with NaN semantics do not, in the same loop as the sums (each element is read once), and in
  the bits' own width (numba widens integer operators to int64, which AVX2 cannot min and max in vectors:
  the kernel's ufunc calls keep int32). A NaN makes the sum non-finite, and the caller then takes the
  masked kernel, so the min and max of a tensor with a NaN are never used.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from comgra_callbacks.stats import SUM_NAMES

KERNEL_ENV = "COMGRA_KERNEL"  # "torch": never use the fused kernel; "numba": the writer process too from its first record (tests)
BLOCK = 64  # rows added in float32 before they are folded into the float64 totals
COMPILE_NOTE_SECS = 2.0  # a first call this long (a compilation) is reported once

_STATE: dict[str, Any] = {}  # "kernels": the compiled functions, or None where numba is missing
_LOCK = threading.Lock()


def available() -> bool:
    """Whether numba can be imported here (without importing it) and the kernel is not switched off."""
    if os.environ.get(KERNEL_ENV, "").lower() == "torch":
        return False
    if "kernels" in _STATE:
        return _STATE["kernels"] is not None
    if "found" not in _STATE:  # looked up once: find_spec walks sys.path (tens of us, on every large step)
        import importlib.util

        _STATE["found"] = importlib.util.find_spec("numba") is not None
    return bool(_STATE["found"])


def _kernels() -> dict[str, Any] | None:
    """The compiled kernels (built on first use, once per process; None where numba cannot be imported)."""
    with _LOCK:
        if "kernels" not in _STATE:
            try:
                _STATE["kernels"] = _build()
            except ImportError:
                _STATE["kernels"] = None
            else:
                import numpy as np

                _NUMPY_BITS[np.dtype(np.float32)] = (np.int32, np.int32(31), np.int32(0x7FFFFFFF))
                _NUMPY_BITS[np.dtype(np.float64)] = (np.int64, np.int64(63), np.int64(0x7FFFFFFFFFFFFFFF))
        return _STATE["kernels"]


# per dtype the kernels read (numpy's, and torch's in _BITS): the integer view of its bits, and the shift and
# mask of ``order``; filled when the kernels are built, so that a step's ~100 groups find them in one lookup
# (a group's Python is on the training thread, under the GIL: ~25 us of checks and lookups a call was ~2.5 ms
# of a transformer's step). Nothing here imports torch: the writer process reads numpy arrays with the same
# kernels (:func:`derived_numpy`).
_NUMPY_BITS: dict[Any, tuple[Any, Any, Any]] = {}
_BITS: dict[Any, tuple[Any, Any, Any]] = {}
_CALLED: set[tuple[str, Any]] = set()  # (kernel, dtype) called once already: compiled or loaded


def preload() -> None:
    """Build the kernels and load their float32 versions (numba's cache, or a compilation), as a first call
    would: for a thread that does this while another goes on without them (the writer process,
    :func:`~.reduce_numpy.reduce_arrays`). :func:`ready` is True afterwards."""
    import numpy as np

    from comgra_callbacks.stats import N_NEURON_STATS, N_PARTIALS

    if _kernels() is not None:
        one = np.ones((1, 2, 2), dtype=np.float32)
        partials, code, neurons = np.empty((N_PARTIALS, 2)), np.zeros(2, dtype=np.int64), np.empty((N_NEURON_STATS, 2), dtype=np.float32)
        for dim in (1, 2):
            derived_numpy(one, dim, 0, partials, code, neurons)
    _STATE["ready"] = True


def ready() -> bool:
    """Whether :func:`preload` has finished (the kernels can be called without a wait)."""
    return bool(_STATE.get("ready"))


def _build() -> dict[str, Any]:
    # imports numba; each kernel is compiled (or loaded from numba's cache) on its first call
    from comgra_callbacks.recording import _fused_kernels as k

    return {"rows": k.over_rows, "cols": k.over_cols, "rows+derive": k.rows_derived, "cols+derive": k.cols_derived}


def sums_fused(x: Any, dim: int) -> Any:
    """:func:`~comgra_callbacks.stats.sums_torch` of a float32 / float64 C-contiguous CPU tensor ``x`` (3-D,
    reduced over ``dim``, 1 or 2), as float64 (the sums about the mean of each neuron's first ``BLOCK``
    items: its ``shift``); None where the kernel does not apply (numba missing, another dtype or device, a
    strided view): the caller then uses torch's. The recorder calls :func:`derived_fused`, which runs the
    same sums and derives from them in one call; this is the sums alone, what tests hold against torch's."""
    import torch

    run = _prepare(x, dim)
    if run is None:
        return None
    kernel, args, out = run
    _call(kernel, dim, args, args[0].dtype)
    return torch.from_numpy(out)


def derived_fused(x: Any, dim: int, c0: int, partials: Any, code: Any, neurons: Any) -> bool:
    """The sums of :func:`sums_fused` turned at once, in the same call, into the partial sums, codes and
    per-neuron statistics of ``x``'s columns, written into the step's arrays from column ``c0`` (see
    ``_fused_kernels.derive``): the derivation then costs the training thread nothing. False where the kernel
    does not apply (nothing written)."""
    run = _prepare(x, dim)
    if run is None:
        return False
    return _derive(run, dim, c0, partials, code, neurons)


def derive_call(x: Any, dim: int, c0: int, partials: Any, code: Any, neurons: Any) -> Callable[[], None] | None:
    """:func:`derived_fused` prepared but not run: a function of no arguments that calls the kernel alone, for
    work prepared on one thread and run by two (``reduce.reduce_tensors``: the kernels release the GIL, the
    preparation does not). None where the kernel does not apply."""
    run = _prepare(x, dim)
    if run is None:
        return None
    name, full, dtype = _derive_arguments(run, c0, partials, code, neurons)
    if (name, dtype) not in _CALLED:  # its first call: compiled or loaded, and said so if that is slow
        return functools.partial(_call, name, dim, full, dtype)
    return functools.partial(_STATE["kernels"][name], *full)


def derived_numpy(a: Any, dim: int, c0: int, partials: Any, code: Any, neurons: Any) -> bool:
    """:func:`derived_fused` of a numpy array (3-D, C-contiguous, float32 or float64): the writer process's
    way in, which never imports torch. False where the kernel does not apply (nothing written)."""
    run = _prepare_numpy(a, dim)
    if run is None:
        return False
    return _derive(run, dim, c0, partials, code, neurons)


def _derive(run: tuple[str, tuple[Any, ...], Any], dim: int, c0: int, partials: Any, code: Any, neurons: Any) -> bool:
    name, full, dtype = _derive_arguments(run, c0, partials, code, neurons)
    _call(name, dim, full, dtype)
    return True


def _derive_arguments(run: tuple[str, tuple[Any, ...], Any], c0: int, partials: Any, code: Any, neurons: Any) -> tuple[str, tuple[Any, ...], Any]:
    """The derive kernel's name, all its arguments and the dtype it reads, for a run of :func:`_prepare`."""
    from comgra_callbacks.stats import CANCELLATION_SHARE

    kernel, args, _ = run
    return f"{kernel}+derive", (*args, CANCELLATION_SHARE, c0, partials, code, neurons), args[0].dtype


def _prepare(x: Any, dim: int) -> tuple[str, tuple[Any, ...], Any] | None:
    """The kernel's name, its first arguments and its output, or None where it does not apply."""
    bits = _BITS.get(x.dtype)
    if bits is None:  # the kernels not built yet, or another dtype
        import numpy as np
        import torch

        if x.dtype not in (torch.float32, torch.float64) or _kernels() is None:
            return None
        bits = _BITS[x.dtype] = _NUMPY_BITS[np.dtype(np.float32 if x.dtype == torch.float32 else np.float64)]
    if not x.is_cpu or x.dim() != 3 or not x.is_contiguous():
        return None
    return _arguments(x.numpy(), dim, bits)


def _prepare_numpy(a: Any, dim: int) -> tuple[str, tuple[Any, ...], Any] | None:
    bits = _NUMPY_BITS.get(a.dtype)
    if bits is None:
        if _kernels() is None or a.dtype not in _NUMPY_BITS:
            return None
        bits = _NUMPY_BITS[a.dtype]
    if a.ndim != 3 or not a.flags.c_contiguous:
        return None
    return _arguments(a, dim, bits)


def _arguments(a: Any, dim: int, bits: tuple[Any, Any, Any]) -> tuple[str, tuple[Any, ...], Any]:
    import numpy as np

    ints, shift, mask = bits
    out = np.zeros((a.shape[0], len(SUM_NAMES), a.shape[2] if dim == 1 else a.shape[1]), dtype=np.float64)
    return ("rows" if dim == 1 else "cols"), (a, a.view(ints), shift, mask, out), out


def _call(name: str, dim: int, args: tuple[Any, ...], dtype: Any) -> None:
    kernels = _STATE["kernels"]
    if (name, dtype) in _CALLED:
        kernels[name](*args)
        return
    started = time.perf_counter()
    kernels[name](*args)
    # numba compiles a kernel on its first call: ~2-8 s once, then it loads from numba's cache
    _CALLED.add((name, dtype))
    took = time.perf_counter() - started
    if took > COMPILE_NOTE_SECS:
        warnings.warn(
            f"comgra: compiled the one-pass statistics kernel (numba, {name}, {dtype}) in {took:.1f} s; "
            "later runs load it from numba's cache.",
            RuntimeWarning,
            stacklevel=5,
        )
