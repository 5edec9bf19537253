"""Keep CPython's full garbage collections short in a long-running server.

A loaded backend brings hundreds of thousands of long-lived Python objects (JAX, Flax,
TensorFlow and ScaNN modules, the model's structures, item metadata). A full
(generation 2) collection traverses every one of them, holding the GIL: under load it
ran every few seconds and stopped all requests for 0.4-0.8 s each time (3 pauses of
397-772 ms in 8 s at 64 clients, 20k items, on 2 busy cores), which was the whole
64-client p99. ``settle()``, once the first version is loaded, collects once, then moves
everything alive into the permanent generation (``gc.freeze``), so later collections only
look at objects created since (a few thousand per version loaded later).

Nothing is unfrozen after a hot swap: that meant one more full collection, a pause of
0.2-0.4 s for every request in flight, only to free the old version's reference cycles.
A backend has none (``serving.results`` caches on its rows, not on a bound method), so
the version no longer served, frozen or not, is freed by reference counting when its last
request ends; versions loaded after the first are not frozen at all.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

def settle() -> float:
    """Collect everything, then exclude the survivors from future collections (for good:
    nothing here unfreezes them); returns the seconds spent."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    seconds = time.perf_counter() - started
    log.info("garbage collected, %d long-lived objects frozen out of later collections (%.2fs)", gc.get_freeze_count(), seconds)
    return seconds
