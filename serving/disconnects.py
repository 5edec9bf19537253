"""A client that goes away before its request body has arrived is not a server error.

A phone that loses its signal mid-upload, or ``curl --max-time``, makes Starlette raise
``ClientDisconnect`` wherever the body is read (a multipart form, a raw image body, a JSON
body). Left alone it surfaces as an ERROR with a 90-line traceback and a 500 in
``/metrics``, which pages whoever watches 5xx rates while the server is healthy. Here it is
answered with 499, nginx's "client closed request" (which nobody receives: the connection is
gone), logged at DEBUG, and counted under that status.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499


async def client_disconnected_handler(request: Request, exc: ClientDisconnect) -> Response:
    """The answer to a request whose client disconnected before its body was read: 499."""
    log.debug("%s %s: the client disconnected before its request body arrived", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


__all__ = ["CLIENT_CLOSED_REQUEST", "ClientDisconnect", "client_disconnected_handler"]
