"""A bound on how many large request bodies the server takes in at once.

An image upload costs several times its size while it is in flight (the body as it arrives,
the parsed form, the file's bytes, the decoded picture): about 40 MB for a 10 MiB photo, so
thirty at once took the server to 2 GB. A request whose declared body is over
``LARGE_BODY_BYTES``, or that sends one without declaring its size (chunked), first waits for
one of ``count`` slots; its body stays in the client and the kernel (TCP flow control) until
it has one, never in this process. Small requests (vector and id searches, most query
images) never wait. One that waits longer than ``wait_timeout_s`` is answered 503 with
``Retry-After``, so slow uploads holding every slot cannot hang the others forever.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lookalike.serving.limits import size_text
from lookalike.serving.head import client_method
from lookalike.serving.metrics import ServingMetrics, endpoint_of

LARGE_BODY_BYTES = 1 << 20  # a body over this waits for a slot
DEFAULT_WAIT_TIMEOUT_S = 30.0


def default_large_uploads() -> int:
    """Two slots per CPU this process may use: enough to keep every core decoding, while the
    bodies in flight stay within a few hundred MB."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 * max(1, cpus)


def is_large_body(headers: list[tuple[bytes, bytes]], max_body_bytes: int) -> bool:
    """Whether a request with ``headers`` sends a large body: declared over LARGE_BODY_BYTES
    (but within ``max_body_bytes``: a larger one is refused with 413 before it is read), or
    of undeclared size (``Transfer-Encoding``, chunked)."""
    declared = chunked = None
    for name, value in headers:
        if name == b"content-length":
            declared = value
        elif name == b"transfer-encoding":
            chunked = value
    if declared is not None:
        return declared.isdigit() and LARGE_BODY_BYTES < int(declared) <= max_body_bytes
    return chunked is not None


class LargeBodySlots:
    """ASGI middleware, outermost: requests with a large body (``is_large_body``) run one
    of at most ``count`` at a time, from before their body is read until their response is
    sent; one kept waiting ``wait_timeout_s`` is a 503 (counted in ``metrics`` under its
    route, as ``RequestMetrics`` counts the others)."""

    def __init__(self, app: ASGIApp, count: int, max_body_bytes: int, metrics: ServingMetrics,
                 wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S):
        if count < 1:
            raise ValueError(f"expected at least 1 large-upload slot, got {count}")
        self.app = app
        self.count = count
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.wait_timeout_s = wait_timeout_s
        self._slots = asyncio.Semaphore(count)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_large_body(scope["headers"], self.max_body_bytes):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_timeout_s)
        except TimeoutError:
            await self._refuse(scope, receive, send, started)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        detail = (f"the server is busy taking in {self.count} other large uploads (over "
                  f"{size_text(LARGE_BODY_BYTES)} each) and this one waited {self.wait_timeout_s:g} s for its turn: "
                  "retry shortly, or send a smaller image")
        retry_after_s = max(1, math.ceil(self.wait_timeout_s / 10))
        response = JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry_after_s),
                                                                              "Connection": "close"})
        try:
            await response(scope, receive, send)
        finally:
            count, observe = self.metrics.request_observers(endpoint_of(scope), client_method(scope), 503)
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
