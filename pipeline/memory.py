"""Freed memory kept for the next batch instead of handed back to the OS and faulted in again.

Every inference batch allocates and frees the same few megabytes (pixels, XLA buffers,
Arrow tables). glibc's malloc serves blocks over its mmap threshold (128 KB at start) with
fresh mappings and returns freed memory at the top of a heap to the OS, so until its
thresholds have adapted, each batch touches new pages: in the first 50,000-image run of a
process, 1.2-1.5 million page faults, about 45 us of CPU per image (9 % of the run), against
50,000 in the next run. Fixing the mmap threshold at glibc's maximum and trimming only
beyond 1 GiB of free memory makes the first run behave like the later ones (125,000
faults). The process keeps up to that much freed memory for reuse, which a batch job
wants. Only glibc has ``mallopt``; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD_BYTES = 1024 ** 3


@functools.cache
def keep_freed_memory() -> bool:
    """Set malloc's mmap and trim thresholds (once per process); False where that is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    log.debug("malloc keeps freed memory (mmap threshold %d, trim threshold %d): %s",
              MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, ok)
    return ok
