"""Process-wide CPU settings applied by the command-line entry points (never on import)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_allocator() -> bool:
    """Keep large activation buffers in the heap between forward passes (glibc only).

    By default glibc returns every buffer above a few MB to the OS and maps it again on the
    next call; a batch-16 forward then spends much of its time in page faults (timed by hand during
    development, no committed benchmark). Returns True if applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    ok &= mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    ok &= mallopt(_M_TOP_PAD, 256 * 1024 * 1024)
    return bool(ok)
