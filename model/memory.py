"""Freed memory kept for the next batch instead of handed back to the OS and faulted in again.

Every forward of the encoder makes XLA allocate and free its temporary buffers, and every
batch of the embed pipeline allocates and frees the same few megabytes (pixels, Arrow
tables). glibc's malloc serves large blocks with fresh mappings and hands freed memory
back to the OS, so each batch touches new pages: a forward of 256 CIFAR-size images through
the pipeline benchmark's small conv net took 18,900 page faults (74 MB of new pages) and ran
at 3,600-4,200 images/s on the development VM; with this setting, 0 faults and 5,100-6,200
images/s, a third less CPU per image. The thresholds glibc adapts on its own settle only
sometimes, which likely is why that benchmark's bare encoder used to swing between ~3,300
and ~6,600 images/s from run to run.

``keep_freed_memory`` fixes the mmap threshold at glibc's maximum (32 MiB: smaller blocks
come from the heap) and trims the heap only beyond 1 GiB of free memory, so a process keeps
what it freed for reuse. Loading an encoder (``artifact.load_encoder``: serving, evaluation
and every pipeline worker, through the Beam model handler), training and the embed job call
it; it acts once per process. Only glibc has ``mallopt``; elsewhere it does nothing.

``long_lived_objects_frozen`` keeps CPython's full garbage collections off the objects that
existed before a batch job (the modules of Beam, JAX, Arrow: ~260k objects) while it runs.
Without it, one full collection in an embed run of 10,000 CIFAR-10 images took 0.2 s, holding
the GIL on the thread that feeds the encoder.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def long_lived_objects_frozen() -> Iterator[bool]:
    """Within the block, the cyclic garbage collector skips every object alive on entry
    (``gc.freeze``); on exit they are collectable again (``gc.unfreeze``). No collection
    first (0.15 s in a process that only imported its libraries): garbage alive on entry stays
    until the block ends, so a job that did other work first (reindex and demo train before
    they embed) collects before it (``gc.collect``). Yields whether it froze: not when
    something else (a server's ``serving.heap.settle``) already froze objects, which stay frozen."""
    if gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()
