"""A trailing slash names the same resource: ``POST /v1/search/image/`` is ``/v1/search/image``.

Starlette answers a path that differs from a route only by its trailing slash with a 307
redirect and an empty body. A browser follows it, but ``curl -F file=@q.png .../image/``
without ``-L`` printed nothing at all, and a client that does not re-send a POST body on a
redirect lost the upload. ``SlashAlias`` (ASGI middleware) instead hands the app the path
without its slash, for the routes without path parameters (the item routes take their
``/similar/`` and ``/thumbnail/`` aliases themselves, as an id never ends in ``/``). Any
other path is left alone, so an unknown one is still a 404.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send


def fixed_paths(routes: Iterable[BaseRoute]) -> frozenset[str]:
    """Paths of the routes without path parameters, except ``/`` (no ``//`` alias)."""
    return frozenset(r.path for r in routes if isinstance(r, Route) and "{" not in r.path and r.path != "/")


class SlashAlias:
    def __init__(self, app: ASGIApp, routes: Callable[[], Iterable[BaseRoute]]):
        """``routes``: the app's routes, read at the first request (after every route is added)."""
        self.app = app
        self._routes = routes
        self._paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                if self._paths is None:
                    self._paths = fixed_paths(self._routes())
                if path[:-1] in self._paths:
                    raw = scope.get("raw_path")
                    scope = {**scope, "path": path[:-1], "raw_path": raw[:-1] if raw and raw.endswith(b"/") else raw}
        await self.app(scope, receive, send)
