"""Bounded resident memory for long passes over many cells (ADR 0082).

glibc serves allocations above its mmap threshold with ``mmap`` and returns them to the system
on ``free``; but after freeing such a block it raises the threshold (up to 32 MB), so the next
large temporary arrays (a 4,096-cell chunk's dense input, its nonzero indices) come from the heap,
interleaved with small long-lived objects, and the heap can no longer shrink. Over a streamed
pass the resident size then grows with the number of cells read. Fixing the threshold turns the
adjustment off: every array above it is mapped and unmapped on its own."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD_BYTES", "pin_mmap_threshold"]

log = logging.getLogger(__name__)

#: Above this size an allocation is mapped on its own (1 MiB: a 128-cell minibatch's dense
#: 2,000-gene tensors, 1,024,000 bytes, stay on the heap and are reused step after step).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_pinned = False


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process (once); False where there is no
    glibc ``mallopt`` (macOS, musl: nothing to do there)."""
    global _pinned
    if _pinned:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _pinned = bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    if not _pinned:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", nbytes)
    return _pinned
