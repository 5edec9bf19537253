"""Keep CPython's full garbage collections short in a long-running server.

A loaded backend brings hundreds of thousands of long-lived Python objects (JAX, Flax,
TensorFlow and ScaNN modules, the model's structures, item metadata). A full
(generation 2) collection traverses every one of them, holding the GIL: under load it
ran every few seconds and stopped all requests for 0.4-0.8 s each time (3 pauses of
397-772 ms in 8 s at 64 clients, 20k items, on 2 busy cores), which was the whole
64-client p99. ``settle()`` collects once, then moves everything alive into the
permanent generation (``gc.freeze``), so later collections only look at objects
created since. It unfreezes first, so after a hot swap the reference cycles of the
versions no longer served are freed.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

# After a swap, requests still running on the old version hold it for a moment;
# settling later lets its objects become garbage first.
SETTLE_AFTER_SWAP_S = 5.0


def settle() -> float:
    """Collect everything, then exclude the survivors from future collections; returns the seconds spent."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    seconds = time.perf_counter() - started
    log.info("garbage collected, %d long-lived objects frozen out of later collections (%.2fs)", gc.get_freeze_count(), seconds)
    return seconds
