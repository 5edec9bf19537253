"""Decoding many files on several threads, results in order (training's folder, the embed pipeline).

One thread decodes a small image in tens of microseconds, but a photo takes tens of
milliseconds (a 6-megapixel JPEG: ~23 ms at a quarter of its size with Pillow's draft mode)
and a video clip far longer. With one decoding thread, a folder of photos kept one core
busy decoding and left the others idle. Pillow, libjpeg-turbo (``simplejpeg``), PyAV and
hashlib release the GIL while they work, so a few threads decode several files at once.

A thread hand-off costs tens of microseconds of Python, more than decoding a small JPEG,
so callers put on the pool only files of at least PARALLEL_MIN_BYTES (and videos: see
``lookalike.pipeline.sources.worth_a_thread``); small ones are decoded inline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Files of at least this many bytes are worth a thread (a JPEG of ~300x200 px or more).
PARALLEL_MIN_BYTES = 32 * 1024


def ordered_map(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor | None, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` on ``pool`` (inline if None), results in the items' order, at most
    ``ahead`` items submitted beyond the one the caller waits for (bounded memory). An
    exception ``fn`` raises is raised where its result is due."""
    if pool is None:
        yield from map(fn, items)
        return
    window: deque[Future] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:  # the caller stopped early (an error): drop the work not started yet
        for future in window:
            future.cancel()


__all__ = ["PARALLEL_MIN_BYTES", "ordered_map"]
