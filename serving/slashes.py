"""A trailing slash names the same resource: ``POST /v1/search/image/`` is ``/v1/search/image``.

Starlette answers a path that differs from a route only by its trailing slash with a 307
redirect and an empty body. A browser follows it, but ``curl -F file=@q.png .../image/``
without ``-L`` printed nothing at all, and a client that does not re-send a POST body on a
redirect lost the upload. ``SlashAlias`` (ASGI middleware) instead hands the app the path
without its trailing slashes whenever some route matches that path (any method: the route
then answers, or says 405): the app's own routes, the included routers' (admin, items) and
an item's URL (no id ends in ``/``). Any other path is left alone, so an unknown one is
still a 404.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send


def matched_without_slash(scope: Scope, routes: Iterable[BaseRoute]) -> str | None:
    """The request's path without its trailing slashes if a route matches that, else None."""
    path: str = scope["path"]
    stripped = path.rstrip("/")
    if not stripped or stripped == path:
        return None
    probe = {**scope, "path": stripped}
    return stripped if any(route.matches(probe)[0] != Match.NONE for route in routes) else None


class SlashAlias:
    def __init__(self, app: ASGIApp, routes: Callable[[], Iterable[BaseRoute]]):
        """``routes``: the app's routes, read at each request that ends in a slash."""
        self.app = app
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/"):
            stripped = matched_without_slash(scope, self._routes())
            if stripped is not None:
                raw = scope.get("raw_path")
                scope = {**scope, "path": stripped, "raw_path": raw.rstrip(b"/") if raw else raw}
        await self.app(scope, receive, send)
