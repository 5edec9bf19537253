"""Keep the input pipeline off the critical path: build batches on a background thread.

``Prefetcher(make_batch, steps, depth)`` calls ``make_batch(step)`` for each step on a
daemon thread and hands the results over through a bounded queue, so sampling,
gathering and the host-to-device copy of batch ``s+1`` overlap the jitted step ``s``.
An exception in ``make_batch`` is re-raised in the consumer at the step it happened;
``close()`` (or leaving the ``with`` block) stops the thread early.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``(step, make_batch(step))`` over ``steps``, at most ``depth`` batches ahead."""

    def __init__(self, make_batch: Callable[[int], T], steps: Iterable[int], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._make_batch = make_batch
        self._steps = list(steps)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lookalike-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for step in self._steps:
                if not self._put((step, self._make_batch(step))):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[tuple[int, T]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
