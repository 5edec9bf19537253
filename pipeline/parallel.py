"""Decoding a batch's sources on several threads, results in order.

One thread decodes a small image in tens of microseconds, but a photo takes tens of
milliseconds (a 6-megapixel JPEG: ~23 ms at a quarter of its size with Pillow's draft mode)
and a video clip far longer. With one decoding thread, a corpus of photos kept one core
busy decoding and left the others mostly idle while a small model waited for input.
Pillow, libjpeg-turbo (``simplejpeg``), PyAV and hashlib release the GIL while they work,
so a few threads decode several sources at once.

A thread hand-off costs tens of microseconds of Python, more than decoding a small JPEG,
so ``ordered_map`` runs on the pool only what is worth it (``worth_a_thread``): a group of
small files is decoded inline, as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from lookalike.pipeline.video import is_video_path

T = TypeVar("T")
R = TypeVar("R")

# Sources of at least this many bytes (or whose bytes were left on disk: big ones) are worth a thread.
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


def worth_a_thread(data: bytes | None, uri: str) -> bool:
    """Whether decoding the source at ``uri`` costs more than a thread hand-off: a file whose
    bytes were not carried (``data`` None: large, read again where decoded), one of at least
    PARALLEL_MIN_BYTES, or a video."""
    return data is None or len(data) >= PARALLEL_MIN_BYTES or is_video_path(uri)


__all__ = ["PARALLEL_MIN_BYTES", "ordered_map", "worth_a_thread"]
