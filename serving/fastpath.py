"""A fast path past FastAPI's per-request machinery for the hot search endpoints.

FastAPI answers each request by solving the endpoint's dependencies and validating
every query parameter against its declared annotation; for the image and vector
search endpoints that costs more CPU on the event loop than parsing the upload
(~0.1 ms of the ~0.5 ms a batched image query costs). A ``FastRoute`` is an ordinary
``APIRoute`` (its OpenAPI operation comes from the endpoint's signature as always)
that may carry a ``fast`` handler: ``fast(request)`` answers the common, well-formed
request itself, or returns None to hand the request to FastAPI unchanged. A fast
handler accepts only what FastAPI would accept with the same values (see
``search_params``) and leaves everything else to FastAPI, errors included, with one
exception: a JSON body the vector and batch handlers have parsed and validated (off the
event loop when large) and found invalid is answered as FastAPI answers it, through the app's
handler of ``RequestValidationError`` (``lookalike.serving.validation``: a 422, or a 400 for a
body that is not JSON), rather than parsed a second time. Responses and error bodies are the same on both paths (tests compare them).

``dispatch_fast_first`` also puts a ``FastDispatch`` outside the app's middleware
stack, so those requests skip the ten or so ASGI layers in front of the router
(error and exception middleware, metrics, body limit, routing): about 0.05 ms of CPU
per request on the event loop, a tenth of a batched image query. It does itself
what those layers would do for a request the fast handler answers.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.routing import Match
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lookalike.serving.engine import NO_FILTERS, Filters
from lookalike.serving.metrics import arrival_time
from lookalike.serving.schemas import DEFAULT_K, KINDS, MAX_K

FastHandler = Callable[[Request], Awaitable[Response | None]]

# A count in 1..999 written plainly (no sign, space, leading zero or underscore): read the
# same by int() and by pydantic; anything else goes to FastAPI for its verdict.
_PLAIN_COUNT = re.compile(r"[1-9][0-9]{0,2}")
_FILTER_PARAMS = ("kind", "group", "source", "tag", "max_per_group")
_SEARCH_PARAMS = frozenset(("k", *_FILTER_PARAMS))


# Set in the scope of a request whose fast handler already declined it (see FastDispatch).
FAST_DECLINED = "lookalike.fast_declined"


class FastRoute(APIRoute):
    """An APIRoute that first offers each request to its ``fast`` handler (if it has one)."""

    fast: FastHandler | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast
        if fast is None or scope["method"] not in self.methods or scope.get(FAST_DECLINED):
            await super().handle(scope, receive, send)
            return
        consumed: list[Message] = []

        async def recording_receive() -> Message:
            message = await receive()
            consumed.append(message)
            return message

        response = await fast(Request(scope, recording_receive, send))
        if response is not None:
            await response(scope, receive, send)
            return

        async def replay() -> Message:  # FastAPI reads whatever the fast handler already did
            return consumed.pop(0) if consumed else await receive()

        await super().handle(scope, replay, send)


class FastDispatch:
    """The outermost layer of an app's middleware stack: a request to a route with a fast
    handler is offered to that handler before any middleware runs (``dispatch_fast_first``).

    What the layers skipped would do for a request the handler answers is done here: the
    request is counted and timed in ``metrics`` as ``RequestMetrics`` does, a body declared
    larger than ``max_body`` (or not declared) is left to the full stack (``BodySizeLimit``
    answers 413), and an HTTPException the handler raises is answered by the app's own
    exception handler, as ``ExceptionMiddleware`` would. A request the handler declines
    (None) or fails on otherwise goes through the whole stack, with what the handler read
    of its body replayed, and FastRoute does not offer it to the handler again.
    """

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, metrics: Any, max_body: int):
        self.app = app
        self.fastapi_app = fastapi_app
        self.metrics = metrics
        self.max_body = max_body
        self.routes: dict[tuple[str, str], FastRoute] = {
            (route.path, method): route
            for route in fastapi_app.router.routes if isinstance(route, FastRoute) and "{" not in route.path
            for method in route.methods
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get((scope.get("path"), scope.get("method"))) if scope["type"] == "http" else None
        fast = route.fast if route is not None else None
        if fast is None or scope.get("root_path") or not self._declared_within_limit(scope["headers"]):
            await self.app(scope, receive, send)
            return
        started = arrival_time(scope)
        consumed: list[Message] = []

        async def recording_receive() -> Message:
            message = await receive()
            consumed.append(message)
            return message

        request = Request(scope, recording_receive, send)
        try:
            response = await fast(request)
        except (HTTPException, RequestValidationError, ClientDisconnect) as e:  # answered as the app would
            response = await self._handled(request, e)
        except Exception:  # the full stack answers (500 for a bug), as without the fast path
            response = None
        if response is None:
            scope[FAST_DECLINED] = True

            async def replay() -> Message:
                return consumed.pop(0) if consumed else await receive()

            await self.app(scope, replay, send)
            return
        status = response.status_code
        try:
            await response(scope, receive, send)
        finally:
            count, observe = self.metrics.request_observers(route.path, scope["method"], status)
            count()
            observe(time.perf_counter() - started)

    def _declared_within_limit(self, headers: list[tuple[bytes, bytes]]) -> bool:
        declared = None
        for name, value in headers:
            if name == b"content-length":
                declared = value
        return declared is not None and declared.isdigit() and int(declared) <= self.max_body

    async def _handled(self, request: Request, exc: Exception) -> Response | None:
        """The app's answer to ``exc`` (its exception handler's), None if it has none."""
        handlers = self.fastapi_app.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                response = handlers[cls](request, exc)
                return await response if inspect.isawaitable(response) else response
        return None


def dispatch_fast_first(app: FastAPI, metrics: Any, max_body: int) -> None:
    """Put a ``FastDispatch`` outside ``app``'s middleware stack (built at its first request)."""
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return FastDispatch(build(), app, metrics, max_body)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


def set_fast_path(app: FastAPI, path: str, method: str, fast: FastHandler) -> None:
    """Give the route of ``method path`` (a FastRoute) its fast handler."""
    for route in app.router.routes:
        if isinstance(route, FastRoute) and route.path == path and method in route.methods:
            route.fast = fast
            return
    raise LookupError(f"no FastRoute for {method} {path}")


def fast_routes_first(app: FastAPI) -> None:
    """Move the routes with fast handlers to the front of the routing table, so their
    requests are matched at once rather than after every other route's pattern.

    Only routes whose path no other route matches move, so the route answering any
    request stays the same; /openapi.json is written first, so it lists the
    operations in the order they were declared.
    """
    app.openapi()
    routes = app.router.routes
    fast = [r for r in routes if isinstance(r, FastRoute) and r.fast is not None]
    for route in fast:
        probe = {"type": "http", "path": route.path, "root_path": "", "method": next(iter(route.methods))}
        others = [other for other in routes if other is not route and other.matches(dict(probe))[0] != Match.NONE]
        if others:
            raise ValueError(f"{route.path} is also matched by {[getattr(o, 'path', o) for o in others]}: it cannot move first")
    routes[:] = fast + [r for r in routes if not any(r is f for f in fast)]


def _count(values: list[str]) -> int | None:
    """The one plain count in 1..MAX_K among ``values``, else None."""
    if len(values) != 1 or not _PLAIN_COUNT.fullmatch(values[0]):
        return None
    value = int(values[0])
    return value if value <= MAX_K else None


def search_params(query_string: bytes) -> tuple[int, Filters] | None:
    """``k`` and the filters of a search's query string when FastAPI would accept them with
    these very values (``k``, ``kind``, ``group``, ``source``, ``tag``, ``max_per_group`` as declared in
    ``lookalike.serving.app``); None for anything else, errors included, and for any
    other parameter (FastAPI answers 422 naming it: ``queries.no_unknown_query_params``)."""
    if not query_string:
        return DEFAULT_K, NO_FILTERS
    params = QueryParams(query_string)
    if any(name not in _SEARCH_PARAMS for name in params.keys()):
        return None
    k = DEFAULT_K
    if "k" in params:
        k = _count(params.getlist("k"))
        if k is None:
            return None
    if not any(name in params for name in _FILTER_PARAMS):
        return k, NO_FILTERS
    kind = max_per_group = None
    if "kind" in params:
        kinds = params.getlist("kind")
        if len(kinds) != 1 or kinds[0] not in KINDS:
            return None
        kind = kinds[0]
    group, source, tag = (params.getlist(name) or None for name in ("group", "source", "tag"))
    if any(values is not None and (len(values) > MAX_K or "" in values) for values in (group, source, tag)):
        return None
    if "max_per_group" in params:
        max_per_group = _count(params.getlist("max_per_group"))
        if max_per_group is None:
            return None
    return k, Filters.of(kind, group, max_per_group, source, tag)
