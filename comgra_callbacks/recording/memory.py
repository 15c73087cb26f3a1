"""Memory a recorded step frees, kept by the C allocator for the next one (glibc's malloc, Linux).

A recorded step keeps its activations and gradients alive until it ends (~70 MB a step on the transformer
benchmark), where an unrecorded step frees each gradient as soon as autograd has used it. glibc's malloc
gives the top of its heap back to the system once more than ``M_TRIM_THRESHOLD`` of it is free: by default
twice the largest block freed so far, at most 64 MiB. So after every recorded step those pages go back,
and the next recorded step's backward pass maps them again: ~5 000 page faults, 8.5 ms of a 55 ms backward
pass on the transformer benchmark; with the memory kept, none (docs/benchmarks.md).

:func:`keep_freed` raises the trim threshold above what a recorded step holds (and fixes the threshold for
``mmap``'d blocks at 32 MiB, glibc's own upper limit for it: setting one of them stops glibc from adjusting
the other). The memory stays in the process for the next step instead of going back to the system between
recorded steps. ``COMGRA_KEEP_FREED_MEMORY=0`` leaves malloc as it is; other C libraries and allocators
(musl, jemalloc or tcmalloc preloaded) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

ENV = "COMGRA_KEEP_FREED_MEMORY"  # "0": never change malloc's thresholds
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
MIN_TRIM = 256 << 20  # the least free heap top kept
MAX_TRIM = 1 << 30  # the most (mallopt takes an int)

_STATE: dict[str, Any] = {"trim": 0}


def keep_freed(nbytes: int) -> bool:
    """Let glibc keep up to twice ``nbytes`` (a recorded step's tensors; at least 256 MiB, at most 1 GiB) of
    freed heap for reuse instead of giving it back to the system. True where malloc's thresholds are set (now
    or before); False where they are left alone (not glibc, switched off, or mallopt refused)."""
    if os.environ.get(ENV, "").strip() == "0":
        return False
    want = min(max(MIN_TRIM, 2 * int(nbytes)), MAX_TRIM)
    if _STATE["trim"] >= want:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, want)):
        _STATE["mallopt"] = None  # refused: do not ask again
        return False
    _STATE["trim"] = want
    return True


def _mallopt() -> Any:
    """glibc's ``mallopt`` (looked up once), or None elsewhere."""
    if "mallopt" not in _STATE:
        function = None
        if sys.platform.startswith("linux") and _libc().startswith("glibc"):
            try:
                function = ctypes.CDLL(None).mallopt
                function.argtypes, function.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                function = None
        _STATE["mallopt"] = function
    return _STATE["mallopt"]


def _libc() -> str:
    """The C library's name and version, e.g. ``glibc 2.36`` ("" where the system does not say)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return ""
