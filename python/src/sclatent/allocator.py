"""Keep large CPU tensor buffers in the process instead of returning them to the kernel after every step.

A CPU training step allocates and frees tens of (cell, gene) tensors of several MB. glibc's malloc serves blocks
above its mmap threshold with mmap and trims the heap top when much is free, so the next step gets fresh pages
that the kernel zero-fills on first touch; raising both thresholds lets freed blocks be reused (`mallopt`, glibc
only; a no-op elsewhere and for CUDA tensors). Set SCLATENT_MALLOC_TUNING=0 to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit systems
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024

_done = False


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if glibc accepted both settings."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("SCLATENT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing
    _done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.debug("malloc thresholds raised: %s", _done)
    return _done
