"""Micro-batching: many concurrent requests, one model forward or one ScaNN call.

A ``MicroBatcher`` lives on the server's event loop. Requests ``submit`` one item and
await its result; a single collector task takes what is queued (up to ``max_batch``),
runs the batch function in its own worker thread (so the loop stays free) and hands
each request its own result. While one batch runs, new arrivals queue up and form
the next one, so batches grow with load without any waiting.

The bounded wait (``max_wait_s``, a few milliseconds) is only spent when more items
are known to be on their way: a request announces itself with ``expect()`` before
its slow preparation (reading and decoding the upload), and the collector waits for
announced items, never for hypothetical ones. A lone request therefore never waits.

A lone item can skip the worker thread altogether (``inline_max_s``): handing an item
to the thread and its result back costs two thread wake-ups and four trips through
the event loop, measured at 0.2-0.3 ms on a 2-core VM, more than a small ScaNN
search itself, and that only pays when the loop has other requests to serve
meanwhile. So an item submitted with ``inline=True`` while nothing is queued, running
or arriving with it (it first yields once to the loop, so that requests read in the
same loop iteration reach ``submit`` too) is run on the loop directly, as long as
batches of one item have recently taken at most ``inline_max_s``. Under load items
meet in the queue and are batched in the thread as before.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_WAIT_S = 0.002
# Weight of the newest batch of one in the running estimate of its duration.
SINGLE_DURATION_WEIGHT = 0.2


class BatcherClosed(RuntimeError):
    """The batcher was stopped (server shutting down) before the item was answered."""


class Expected(Generic[T, R]):
    """An announced item: ``submit`` it once it is ready, or leave the ``with`` block to withdraw."""

    def __init__(self, batcher: "MicroBatcher[T, R]"):
        self._batcher = batcher
        self._open = True
        batcher._announce(+1)

    async def submit(self, item: T, *, inline: bool = False) -> R:
        self._close()
        return await self._batcher.submit(item, inline=inline)

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._announce(-1)

    def __enter__(self) -> "Expected[T, R]":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()


class MicroBatcher(Generic[T, R]):
    """Collects items submitted concurrently into batches for ``run_batch``.

    ``run_batch(items)`` runs in a dedicated worker thread and returns one result per
    item, in order; a result that is an exception is raised to that item's caller
    only. If ``run_batch`` itself raises, every item of the batch gets the error.
    ``on_batch(size)`` is called for each batch (metrics). ``inline_max_s`` > 0 lets a
    lone item run on the event loop (see the module docstring) while batches of one
    take at most that long (a running average, so one slow item turns it off).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        on_batch: Callable[[int], None] | None = None,
        inline_max_s: float = 0.0,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not 0 <= max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be between 0 and 1 second, got {max_wait_s}")
        if not 0 <= inline_max_s <= 1:
            raise ValueError(f"inline_max_s must be between 0 (off) and 1 second, got {inline_max_s}")
        self.name = name
        self.inline_max_s = inline_max_s
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._expected = 0
        self._in_flight = 0
        self._arriving = 0  # lone items yielding once before deciding to run inline
        self._single_s = 0.0  # running average duration of a batch of one item
        self.inline_runs = 0

    # --- lifecycle (on the event loop) ----------------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._changed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(BatcherClosed(f"{self.name} batcher stopped"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # --- requests ---------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch plus items in the batch being run."""
        return (self._queue.qsize() if self._queue is not None else 0) + self._in_flight

    def expect(self) -> Expected[T, R]:
        """Announce an item that will be submitted soon (see the module docstring)."""
        return Expected(self)

    async def submit(self, item: T, *, inline: bool = False) -> R:
        """``item``'s result (its exception raised); ``inline`` allows running it on the
        event loop when it is alone (see the module docstring)."""
        if self._queue is None or self._task is None or self._task.done():
            raise BatcherClosed(f"{self.name} batcher is not running")
        if inline and self._may_inline():
            self._arriving += 1
            try:
                await asyncio.sleep(0)  # requests read with this one reach submit meanwhile
            finally:
                self._arriving -= 1
            if self._arriving == 0 and self._may_inline():
                return self._run_inline(item)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        self._changed.set()
        try:
            return await future
        finally:  # a raised result's traceback holds this frame: no cycle through the future
            del future

    def _may_inline(self) -> bool:
        return (0 < self.inline_max_s and self._single_s <= self.inline_max_s and self._in_flight == 0
                and self._expected <= 0 and self._queue is not None and self._queue.empty())

    def _run_inline(self, item: T) -> R:
        self.inline_runs += 1
        if self._on_batch is not None:
            self._on_batch(1)
        try:
            results = self._timed_run([item])
            if len(results) != 1:
                raise RuntimeError(f"{self.name}: batch of 1 item gave {len(results)} results")
        except Exception:
            log.exception("%s batch of 1 failed", self.name)
            raise
        result = results[0]
        del results
        if isinstance(result, BaseException):
            try:
                raise without_frame_locals(result)
            finally:  # the traceback holds this frame: no cycle through the local
                del result
        return result

    def _timed_run(self, items: list[T]) -> Sequence[R | BaseException]:
        """``run_batch(items)``, keeping the running average duration of batches of one."""
        started = time.perf_counter()
        results = self._run_batch(items)
        if len(items) == 1:
            self._single_s += SINGLE_DURATION_WEIGHT * (time.perf_counter() - started - self._single_s)
        return results

    def _announce(self, delta: int) -> None:
        self._expected += delta
        if delta < 0 and self._changed is not None:
            self._changed.set()

    # --- the collector task -------------------------------------------------------
    async def _next_batch(self) -> list[tuple[T, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        self._in_flight = 1  # taken items count as running, so none runs inline meanwhile
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                self._in_flight = len(batch)
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch or remaining <= 0 or self._expected <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return batch

    async def _collect(self) -> None:
        while True:
            # Each batch is answered in a frame of its own: nothing of it (items, results, the
            # backends they hold) stays referenced here until the next batch, so a version
            # swapped out is freed when its last request ends (``serving.heap``).
            await self._answer(await self._next_batch())

    async def _answer(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        batch = [(item, future) for item, future in batch if not future.cancelled()]
        self._in_flight = len(batch)
        if not batch:
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            results = await loop.run_in_executor(self._executor, self._timed_run, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: batch of {len(batch)} items gave {len(results)} results")
        except Exception as e:  # every caller of this batch sees the failure
            log.exception("%s batch of %d failed", self.name, len(batch))
            results = [e] * len(batch)
        finally:
            self._in_flight = 0
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(without_frame_locals(result))
            else:
                future.set_result(result)
        del batch, results, future, result  # a failed batch's exception holds this frame in its traceback


def without_frame_locals(error: BaseException) -> BaseException:
    """``error`` with the local variables of the finished frames of its traceback, and of their
    finished callers, cleared (file and line stay). A batch function that stores an item's
    exception in its results list makes a reference cycle (exception, traceback, frame, or
    the frame's caller through ``f_back``, results list, exception) that holds the item's
    upload and backend until a full garbage collection, which ``serving.heap`` makes rare.
    A frame still running, or of a coroutine or generator (clearing one would close it),
    ends the walk up its callers. Returns ``error``."""
    tb = error.__traceback__
    while tb is not None:
        frame: types.FrameType | None = tb.tb_frame
        while frame is not None and not frame.f_code.co_flags & _SUSPENDABLE:
            try:
                frame.clear()
            except RuntimeError:  # still running: it and its callers are live
                break
            frame = frame.f_back
        tb = tb.tb_next
    return error


_SUSPENDABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE
