"""Request body size limit, enforced while the body streams in.

A declared ``Content-Length`` over the limit is refused with 413 before anything
is read; a body without one (chunked) is counted as it arrives and refused as soon
as it passes the limit, so a huge upload never ends up in memory.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class PayloadTooLarge(HTTPException):
    """413; an HTTPException so FastAPI's body parsing passes it through unchanged."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"the request body exceeds the limit of {size_text(limit)}")


def size_text(num_bytes: int) -> str:
    """``10 MiB (10485760 bytes)`` for a whole number of MiB or KiB, else ``1000 bytes``."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= size and num_bytes % size == 0:
            return f"{num_bytes // size} {unit} ({num_bytes} bytes)"
    return f"{num_bytes} bytes"


class BodySizeLimit:
    """ASGI middleware refusing request bodies over ``limit + slack`` bytes.

    ``slack`` leaves room for multipart framing around a file of up to ``limit``
    bytes (the endpoint checks the file itself exactly); 413 messages name ``limit``.
    """

    def __init__(self, app: ASGIApp, limit: int, slack: int = 0):
        self.app = app
        self.limit = limit
        self.max_bytes = limit + slack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": PayloadTooLarge(self.limit).detail}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)
