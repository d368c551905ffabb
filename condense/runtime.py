"""Process-level settings for entry points (CLI, benchmarks, tests) — never applied on import."""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)
_KEPT = False


def keep_freed_memory() -> bool:
    """glibc only: serve large blocks from the heap and never trim it (``mallopt``).

    By default glibc gives every allocation over its mmap threshold (up to 32 MB) a fresh
    ``mmap`` that is unmapped on free, so each training/matching iteration page-faults its big
    activation tensors in again (zero-filled by the kernel): measured here as most of the system
    time of a DM iteration and 2x its wall time. Same effect as
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1``. Returns whether it was applied.
    """
    global _KEPT
    if _KEPT:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    _KEPT = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    log.debug("glibc heap kept: %s", _KEPT)
    return _KEPT
