"""Statistics with numpy, for the writer process (which never imports torch): the kernels of
:mod:`comgra_callbacks.stats` applied to one array, read once (batch and per-neuron statistics from the
same partial sums; tests hold them to the torch path's numbers).

>>> row, neurons = reduce_array(np.array([[1.0, 2.0], [np.nan, 0.0]], dtype=np.float32), neurons=True)
>>> named = dict(zip(STAT_NAMES, row.round(3).tolist()))
>>> named["mean"], named["nan_count"], named["zero_frac"], neurons.shape
(1.0, 1.0, 0.25, (4, 2))
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

from comgra_callbacks import stats as spec
from comgra_callbacks.stats import N_STATS, STAT_INDEX, STAT_NAMES

__all__ = ["N_STATS", "STAT_INDEX", "STAT_NAMES", "load_kernels", "neuron_matrix_numpy", "reduce_array", "reduce_arrays", "stats_numpy"]

stats_numpy = spec.stats_numpy
KERNEL_AFTER_NUMEL = 1 << 21  # the writer starts loading the one-pass kernel (numba) once it has reduced this many elements
KERNEL_AT_START_NUMEL = KERNEL_AFTER_NUMEL // 8  # raw records this large (expected): loaded at the writer's start
_SEEN = {"numel": 0}  # elements reduced by reduce_arrays in this process (see KERNEL_AFTER_NUMEL)
_LOADER: list[threading.Thread] = []  # the thread loading the kernels (fused.preload), once started
_FAILED: list[str] = []  # why loading them failed, once it did (never tried again)


def reduce_arrays(arrays: list[np.ndarray], wanted: list[tuple[bool, bool, int | None]], *, kernel: bool | None = None) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """:func:`reduce_array` of a whole record at once: batch statistics ``(len(arrays), N_STATS)`` float32 and
    per array its per-neuron statistics or None (``wanted``: per array ``(neurons, is a parameter, neuron
    axis)``), the numbers :func:`~.reduce.reduce_tensors` gives on the training side.

    Each array is read once for its partial sums, by the one-pass kernel of :mod:`.fused` where numba is
    there (``kernel``; default: :func:`_kernel_ready`, so that a short run never pays the ~1.7 s of CPU
    that loading numba and the kernels takes), and by :func:`~comgra_callbacks.stats.partials_numpy`
    otherwise or where the kernel's sums do not describe a neuron exactly (a non-finite value, a mean that
    dwarfs the spread). The batch and per-neuron statistics of every array then derive in one call each:
    the ~40 numpy operations of a derivation cost ~100 us per array when taken one array at a time."""
    if kernel is None:
        kernel = _kernel_ready(sum(int(a.size) for a in arrays))
    matrices = [_matrix(np.asarray(a), *w) for a, w in zip(arrays, wanted)]
    widths = [m.shape[1] for m in matrices]
    spans = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64).tolist()
    columns = spans[-1]
    partials = np.empty((spec.N_PARTIALS, columns))
    code = np.zeros(columns, dtype=np.int64)
    neurons = np.empty((spec.N_NEURON_STATS, columns), dtype=np.float32)
    for i, m in enumerate(matrices):
        start, stop = spans[i], spans[i + 1]
        if kernel and _kernel_sums(m, start, partials, code, neurons) and not code[start:stop].any():
            continue
        p = spec.partials_numpy(m)  # exact where the kernel's sums were not (or no kernel)
        partials[:, start:stop] = p
        neurons[:, start:stop] = spec.neurons_from_partials(p, np)
    segments = spec.Segments(spans[:-1], widths)
    numel = np.array([float(np.asarray(a).size) for a in arrays])
    rows = spec.batch_from_partials(spec.combine_columns(partials, segments, np)[:, :, None], numel, np).astype(np.float32)
    blocks = [neurons[:, spans[i] : spans[i + 1]] if w[0] and np.asarray(a).ndim > 0 else None for i, (a, w) in enumerate(zip(arrays, wanted))]
    return rows, blocks


def _kernel_ready(numel: int) -> bool:
    """Whether this record is read by the one-pass kernel: once this process has reduced
    ``KERNEL_AFTER_NUMEL`` elements, a thread loads numba and the kernels (~1.7 s of CPU) while records go on
    through numpy, so that the ring does not fill behind the load; from then on, the kernel.
    ``COMGRA_KERNEL=numba``: loaded at the first record, which waits for it (tests)."""
    from comgra_callbacks.recording import fused

    if fused.ready():
        return fused.available()
    if not fused.available():
        return False
    if os.environ.get(fused.KERNEL_ENV, "").lower() == "numba":
        fused.preload()
        return True
    _SEEN["numel"] += numel
    if _SEEN["numel"] >= KERNEL_AFTER_NUMEL:
        load_kernels()
    return False


def load_kernels(*, wait: bool = False) -> None:
    """Load numba and the one-pass kernel (once; nothing where numba is missing or switched off): on a thread,
    once this process reduced ``KERNEL_AFTER_NUMEL`` elements; or now (``wait``), before the writer process
    says it is ready, where the trainer said that large raw records will come (``StartMessage.load_kernel``).
    Loading on a thread while such records arrive was measured as a slow start: the loader holds the GIL for
    most of its ~0.7-1 s, the writer took ~30 MLP records a second instead of ~300 meanwhile, and training
    waited ~0.5 s for room in the ring."""
    from comgra_callbacks.recording import fused

    if _LOADER or _FAILED or fused.ready() or not fused.available():
        return
    if wait:
        _load()
        return
    _LOADER.append(threading.Thread(target=_load, name="comgra-kernels", daemon=True))
    _LOADER[0].start()


def _load() -> None:
    """:func:`~.fused.preload`; where it fails (numba broken, a compilation error), the statistics stay
    numpy's, it says so once on standard error (the trainer's terminal), and nothing tries again."""
    from comgra_callbacks.recording import fused

    try:
        fused.preload()
    except Exception as exc:
        _FAILED.append(f"{type(exc).__name__}: {exc}")
        print(f"comgra writer: the one-pass kernel could not be loaded ({_FAILED[0]}); statistics are computed with numpy.", file=sys.stderr)


def _matrix(a: np.ndarray, neurons: bool, is_parameter: bool, axis: int | None) -> np.ndarray:
    """``a`` as ``(items, neurons)`` (one neuron of all its elements without per-neuron statistics)."""
    matrix = neuron_matrix_numpy(a, is_parameter=is_parameter, axis=axis) if neurons else None
    return a.reshape(-1, 1) if matrix is None else matrix


def _kernel_sums(m: np.ndarray, start: int, partials: np.ndarray, code: np.ndarray, neurons: np.ndarray) -> bool:
    """The one-pass kernel's partial sums, codes and per-neuron statistics of the matrix ``m`` (items,
    neurons), written from column ``start``; False where it cannot read ``m``: another dtype."""
    from comgra_callbacks.recording import fused

    if m.dtype not in (np.float32, np.float64):
        return False
    if m.shape[1] == 1 or (m.shape[0] > 1 and m.T.flags.c_contiguous):  # each neuron's items contiguous (parameters, one neuron; a bias's single items are read across)
        return fused.derived_numpy(np.ascontiguousarray(m.T)[None], 2, start, partials, code, neurons)
    return fused.derived_numpy(np.ascontiguousarray(m)[None], 1, start, partials, code, neurons)


def reduce_array(a: np.ndarray, *, neurons: bool, is_parameter: bool = False, axis: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Batch statistics ``(N_STATS,)`` float32 of ``a`` and, when ``neurons``, its per-neuron statistics
    ``(N_NEURON_STATS, neurons)`` (None for a scalar), from one pass of partial sums: :func:`reduce_arrays`
    of one array, with numpy."""
    rows, blocks = reduce_arrays([np.asarray(a)], [(neurons, is_parameter, axis)], kernel=False)
    return rows[0], blocks[0]


def neuron_matrix_numpy(a: np.ndarray, *, is_parameter: bool, axis: int | None = None) -> np.ndarray | None:
    """``a`` viewed as ``(items, neurons)`` (transposed for parameters: one neuron per output unit; the
    neurons on ``axis`` for activations, default the last)."""
    if a.ndim == 0:
        return None
    if is_parameter:
        return a.reshape(a.shape[0], -1).T
    if a.ndim == 1:
        return a.reshape(a.shape[0], 1)
    if axis is not None and axis % a.ndim != a.ndim - 1:
        a = np.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1])
