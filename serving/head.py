"""HEAD for every GET resource: a HEAD request is answered as the GET would be, without the body.

FastAPI routes answer only the methods they declare, and declaring HEAD beside GET gives
a route two OpenAPI operations with one operation id. ``HeadAsGet`` (ASGI middleware)
instead hands the app a GET and sends its status and headers (Content-Length, ETag,
Cache-Control included) with an empty body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
