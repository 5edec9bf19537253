"""HEAD for every GET resource: a HEAD request is answered as the GET would be, without the body.

FastAPI routes answer only the methods they declare, and declaring HEAD beside GET gives
a route two OpenAPI operations with one operation id. ``HeadAsGet`` (ASGI middleware)
instead hands the app a GET and sends its status and headers (Content-Length, ETag,
Cache-Control included) with an empty body; and a 405 (OPTIONS, or POST to a GET resource)
lists HEAD in its Allow header beside GET. The GET it hands on carries the client's method
under ``CLIENT_METHOD`` so that metrics count a HEAD as a HEAD.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


CLIENT_METHOD = "lookalike.client_method"  # scope key: the method the client sent, where it differs


def client_method(scope: Scope) -> str:
    """The HTTP method the client sent (``HEAD`` for a HEAD handed on as a GET)."""
    return scope.get(CLIENT_METHOD, scope["method"])


class HeadAsGet:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "GET":  # a GET is never refused for its method by a GET route
            await self.app(scope, receive, send)
            return
        if scope["method"] != "HEAD":

            async def with_head_allowed(message: Message) -> None:
                """A 405's Allow header lists HEAD wherever it lists GET (answered here, not by a route)."""
                if message["type"] == "http.response.start" and message["status"] == 405:
                    message = {**message, "headers": [(name, allow_head(value) if name.lower() == b"allow" else value)
                                                      for name, value in message.get("headers", [])]}
                await send(message)

            await self.app(scope, receive, with_head_allowed)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET", CLIENT_METHOD: "HEAD"}, receive, without_body)


def allow_head(allow: bytes) -> bytes:
    """An Allow header's value with HEAD added after GET when GET is allowed and HEAD is not."""
    methods = [m.strip() for m in allow.split(b",") if m.strip()]
    if b"GET" in methods and b"HEAD" not in methods:
        methods.insert(methods.index(b"GET") + 1, b"HEAD")
    return b", ".join(methods)
