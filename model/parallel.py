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

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from lookalike.model.cpu_threads import available_cpus
from lookalike.model.progress import Progress

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


def holds_big_files(paths: Sequence[str | os.PathLike], sample: int = 8) -> bool:
    """Whether any of the first ``sample`` files has at least PARALLEL_MIN_BYTES: a folder
    worth decoding on a pool (folders usually hold files alike; an unreadable one is left
    for its decode to report)."""
    for path in paths[:sample]:
        try:
            if os.stat(path).st_size >= PARALLEL_MIN_BYTES:
                return True
        except OSError:
            continue
    return False


def decode_in_order(decode: Callable[[T], R], items: Sequence[T], progress: Progress | None = None, *,
                    on_pool: bool = True) -> Iterator[tuple[T, R]]:
    """(item, ``decode(item)``) for each of ``items``, in order, each counted in ``progress``:
    on a pool of one thread per CPU this process may use when ``on_pool`` (``holds_big_files``),
    else inline."""
    threads = available_cpus()
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        for item, result in zip(items, ordered_map(decode, items, pool if on_pool and threads > 1 else None,
                                                   2 * threads)):
            if progress is not None:
                progress.update(progress.count + 1)
            yield item, result


__all__ = ["PARALLEL_MIN_BYTES", "decode_in_order", "holds_big_files", "ordered_map"]
