"""A bound on how many large request bodies the server takes in at once.

An image upload costs several times its size while it is in flight (the body as it arrives,
the parsed form, the file's bytes, the decoded picture): about 40 MB for a 10 MiB photo, so
thirty at once took the server to 1.3 GB. A request whose declared body is over
``LARGE_BODY_BYTES`` first waits for one of ``count`` slots; its body stays in the client and
the kernel (TCP flow control) until it has one, never in this process. A body of unknown size
(chunked) waits once that much of it has arrived. Small requests (vector and id searches,
most query images) never wait. One that waits longer than ``wait_timeout_s`` is answered 503
with ``Retry-After`` (its body read and dropped first, so that clients that send the whole
body before reading get the answer, not a reset connection). A body that stops arriving while
it holds a slot is a 408 after ``idle_timeout_s``, and so is one that, from then on, arrives
slower than ``DEFAULT_MIN_BYTES_PER_S``, so idle or trickling connections cannot hold the slots
for ever; the slot goes back as soon as the request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lookalike.serving.limits import size_text
from lookalike.serving.head import client_method
from lookalike.serving.metrics import ARRIVED_S, ServingMetrics, endpoint_of

LARGE_BODY_BYTES = 1 << 20  # a body over this waits for a slot
DEFAULT_WAIT_TIMEOUT_S = 30.0
UPLOAD_WAIT_STAGE = "upload_wait"  # lookalike_stage_seconds{stage=...}: a large body's wait for its slot
# While it holds a slot, a body must keep arriving: a gap this long ends it (408). Without it a
# few idle connections, headers sent and nothing after, would hold every slot for ever.
DEFAULT_IDLE_TIMEOUT_S = 10.0
# The least rate a body holding a slot must keep after its first DEFAULT_IDLE_TIMEOUT_S
# (Apache's mod_reqtimeout asks 500 bytes/s): an old EDGE uplink (10-20 KB/s) passes, a 10 MiB
# body holds a slot 43 minutes at most, and a client trickling a byte every few seconds is cut off.
DEFAULT_MIN_BYTES_PER_S = 4 << 10


def default_large_uploads() -> int:
    """Two slots per CPU this process may use: enough to keep every core decoding, while the
    bodies in flight stay within a few hundred MB."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 * max(1, cpus)


def body_size(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body size a request declares: its ``Content-Length``, -1 for a body of unknown size
    (``Transfer-Encoding``, chunked), None for no body (or an unusable length, which the
    server refuses)."""
    declared = chunked = None
    for name, value in headers:
        if name == b"content-length":
            declared = value
        elif name == b"transfer-encoding":
            chunked = value
    if declared is not None:
        return int(declared) if declared.isdigit() else None
    return -1 if chunked is not None else None


def is_large_body(headers: list[tuple[bytes, bytes]], max_body_bytes: int) -> bool:
    """Whether a request with ``headers`` declares a large body: over LARGE_BODY_BYTES (but
    within ``max_body_bytes``: a larger one is refused with 413 before it is read). A body of
    unknown size is large only once more than LARGE_BODY_BYTES of it have arrived."""
    size = body_size(headers)
    return size is not None and LARGE_BODY_BYTES < size <= max_body_bytes


class UploadStalled(HTTPException):
    """408: a body holding a slot stopped arriving."""

    def __init__(self, idle_s: float):
        super().__init__(status_code=408, headers={"Connection": "close"},
                         detail=f"the request body stopped arriving: nothing came for {idle_s:g} s")


class UploadTooSlow(HTTPException):
    """408: a body holding a slot arrives slower than the least rate."""

    def __init__(self, received: int, seconds: float, min_bytes_per_s: int):
        super().__init__(status_code=408, headers={"Connection": "close"},
                         detail=f"the request body arrives too slowly: {received} bytes in {seconds:.1f} s, "
                                f"under the {min_bytes_per_s / 1024:g} KiB/s an upload over "
                                f"{LARGE_BODY_BYTES >> 20} MiB must keep while it holds one of the few large-upload slots")


class LargeBodySlots:
    """ASGI middleware, outermost: requests with a large body run at most ``count`` at a time,
    from before their body is read (one of unknown size: from when its first LARGE_BODY_BYTES
    have arrived) until their response is sent. One kept waiting ``wait_timeout_s`` is a 503
    with Retry-After (counted in ``metrics`` under its route, as ``RequestMetrics`` counts the
    others; a client gone meanwhile, 499), and one whose body stops arriving for
    ``idle_timeout_s`` while it holds a slot is a 408, as is one that, ``idle_timeout_s``
    after it took its slot, has arrived at under ``min_bytes_per_s`` since then."""

    def __init__(self, app: ASGIApp, count: int, max_body_bytes: int, metrics: ServingMetrics,
                 wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S):
        if count < 1:
            raise ValueError(f"expected at least 1 large-upload slot, got {count}")
        self.app = app
        self.count = count
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.wait_timeout_s = wait_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.min_bytes_per_s = DEFAULT_MIN_BYTES_PER_S
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(count)

    async def _acquire(self) -> bool:
        """A slot, waiting up to ``wait_timeout_s``; False if none came. The slots belong to the
        running event loop (an app served by another loop later gets fresh ones)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._slots = loop, asyncio.Semaphore(self.count)
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_timeout_s)
        except TimeoutError:
            return False
        finally:
            self.metrics.observe_stage(UPLOAD_WAIT_STAGE, time.perf_counter() - started)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = body_size(scope["headers"]) if scope["type"] == "http" else None
        if size is None or size > self.max_body_bytes or 0 <= size <= LARGE_BODY_BYTES:
            await self.app(scope, receive, send)
            return
        started = scope[ARRIVED_S] = time.perf_counter()  # the request's latency counts its wait for a slot
        held = size > 0  # a declared large body; one of unknown size takes its slot once it is large
        if held and not await self._acquire():
            await self._refuse(scope, receive, send, started)
            return
        received, complete = 0, False
        held_since, received_before = time.perf_counter(), 0  # when the slot was taken, and what had come by then

        async def guarded_receive() -> Message:
            nonlocal received, complete, held, held_since, received_before
            if complete:  # e.g. waiting for a disconnect while streaming a response: no deadline
                return await receive()
            try:
                message = await (asyncio.wait_for(receive(), self.idle_timeout_s) if held else receive())
            except TimeoutError:
                raise UploadStalled(self.idle_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if not held and received > LARGE_BODY_BYTES:
                    if not await self._acquire():
                        raise HTTPException(status_code=503, detail=self._busy_detail(),
                                            headers={"Retry-After": self._retry_after(), "Connection": "close"})
                    held, held_since, received_before = True, time.perf_counter(), received
                elif held and not complete:
                    holding_s = time.perf_counter() - held_since
                    if holding_s > self.idle_timeout_s and received - received_before < self.min_bytes_per_s * holding_s:
                        raise UploadTooSlow(received - received_before, holding_s, self.min_bytes_per_s)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            if held:
                self._slots.release()

    def _busy_detail(self) -> str:
        return (f"the server is busy taking in {self.count} other large uploads (over {size_text(LARGE_BODY_BYTES)} "
                f"each) and this one waited {self.wait_timeout_s:g} s for its turn: retry shortly, or send a smaller image")

    def _retry_after(self) -> str:
        return str(max(1, math.ceil(self.wait_timeout_s / 10)))

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """503 for a declared large body that found no slot in time. Its body is read first and
        dropped as it comes (no memory held), so that a client that sends its whole body before
        reading the answer gets the 503, not a connection reset; a client gone meanwhile is a
        499 with no answer."""
        status, drained = 503, False
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                break
            if message["type"] == "http.disconnect":
                status = 499
                break
            if not message.get("more_body", False):
                drained = True
                break
        try:
            if status == 503:
                headers = {"Retry-After": self._retry_after()} | ({} if drained else {"Connection": "close"})
                await JSONResponse({"detail": self._busy_detail()}, status_code=503, headers=headers)(scope, receive, send)
        finally:
            path = scope.get("path", "/")
            count, observe = self.metrics.request_observers(endpoint_of({**scope, "path": path.rstrip("/") or "/"}),
                                                            client_method(scope), status)
            count()
            observe(time.perf_counter() - started)


def limit_large_uploads(app: FastAPI, count: int, max_body_bytes: int, metrics: ServingMetrics,
                        wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> None:
    """Put a ``LargeBodySlots`` outside ``app``'s whole stack (built at its first request),
    fast paths included."""
    slots = LargeBodySlots(None, count, max_body_bytes, metrics, wait_timeout_s)  # type: ignore[arg-type]
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        slots.app = build()
        return slots

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    app.state.large_upload_slots = slots
