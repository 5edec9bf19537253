"""The HTTP API and the search page: ``create_app(load_backend)`` returns a FastAPI app.

The first Backend (encoder + index) is loaded in the app's lifespan by the callable
the caller passes in (the server passes ``lambda: load_backend(workdir)``; a test can
pass anything that returns a Backend). Endpoints read the served Backend from a
``BackendSlot`` once, at their start, and use that reference to the end, so a hot
swap (``lookalike.serving.swap``) never changes the version under a request.
Image queries are decoded, embedded and searched in batches, other searches batched
too, by the micro-batchers of a ``QueryEngine`` (``lookalike.serving.engine``,
``lookalike.serving.queries``).

Bad input is always a 4xx with a reason: 413 for an oversized body, 400 for a malformed one
(a multipart form that does not parse, a JSON body that is not JSON), 422 for bytes
that are not an image, vectors of the wrong length or with NaN, or ``k`` out of
range, or a query parameter the endpoint does not take, 404 for an unknown item id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from lookalike.serving.admin import AdminAuth, admin_router, watch_store
from lookalike.serving.disconnects import ClientDisconnect, client_disconnected_handler
from lookalike.serving.items import items_router
from lookalike.serving.backend import Backend
from lookalike.serving.engine import BatchingConfig, Filters, QueryEngine, SearchItem
from lookalike.serving.fastpath import FastRoute, dispatch_fast_first, fast_routes_first, search_params, set_fast_path
from lookalike.serving.head import HeadAsGet
from lookalike.serving.heap import settle
from lookalike.serving.limits import BodySizeLimit
from lookalike.serving.metrics import CONTENT_TYPE, RequestMetrics, ServingMetrics
from lookalike.serving.params import (
    IMAGE_REQUEST_BODY,
    K,
    STRICT_QUERY,
    BackendDep,
    GroupFilter,
    KindFilter,
    RETRY_WHILE_LOADING,
    PerGroup,
    SourceFilter,
    TagFilter,
    errors,
)
from lookalike.serving.queries import (
    row_of,
    check_model_version,
    batch_images,
    echo,
    filters_of,
    read_upload,
    search_by_image,
    search_or_422,
    search_response,
    unknown_item,
    unit_query,
)
from lookalike.serving.schemas import (
    DEFAULT_K,
    BatchQuery,
    BatchSearch,
    BatchSearchResponse,
    Health,
    Info,
    Ready,
    SearchResponse,
    VectorQuery,
)
from lookalike.serving.results import json_text_response
from lookalike.serving.slashes import SlashAlias
from lookalike.serving.swap import DEFAULT_WATCH_INTERVAL_S, BackendSlot, StoreReloader, without_store_root
from lookalike.serving.uploads import DEFAULT_WAIT_TIMEOUT_S, default_large_uploads, limit_large_uploads
from lookalike.serving.validation import body_parse_error_handler, parse_json_body, short_input, validation_error_handler

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_OVERHEAD_BYTES = 16 * 1024

def index_quality(manifest: dict[str, Any]) -> dict[str, Any]:
    """The recall (and its k and target) measured when the index was built, from its manifest
    (None, with ``skipped`` saying why, for an index too small to measure it on)."""
    tuning = manifest.get("tuning") or {}
    quality = {key: value for key, value in tuning.items() if value is None or isinstance(value, (int, float, str))}
    if tuning.get("skipped"):
        quality.update(recall=None, recall_stderr=None, target_met=None)
    return quality


def item_summary(index: Any) -> dict[str, Any]:
    """How many live items are video frames, and one live item's id (None for an empty index)."""
    live = index.live_mask()
    frames = index.items.rows_where({"kind": {"frame"}})
    first = np.flatnonzero(live)[:1]
    return {
        "frame_count": int(np.count_nonzero(live[frames])),
        "example_item_id": index.items.ids_of(first)[0] if len(first) else None,
    }


def load_page() -> str:
    return resources.files("lookalike.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(
    load_backend: Callable[[], Backend],
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    reloader: StoreReloader | None = None,
    watch_interval_s: float | None = DEFAULT_WATCH_INTERVAL_S,
    batching: BatchingConfig = BatchingConfig(),
    admin_token: str | None = None,
    load_in_background: bool = False,
    settle_heap: bool = False,
    max_large_uploads: int | None = None,
    large_upload_wait_s: float = DEFAULT_WAIT_TIMEOUT_S,
) -> FastAPI:
    """The API and page.

    ``load_backend`` is called once at startup, in a worker thread: before the server
    accepts requests, or after (``load_in_background``; /readyz says 503 until it is
    done). With a ``reloader`` the app follows the store's CURRENT pointer every
    ``watch_interval_s`` seconds (None: only on ``POST /v1/admin/reload``).
    ``admin_token`` defaults to $LOOKALIKE_ADMIN_TOKEN; without one, admin endpoints
    answer 403. ``settle_heap`` (for a server process of its own, not a test) freezes
    the loaded objects out of garbage collection after each load
    (``lookalike.serving.heap``). Requests with a body over 1 MiB (large uploads) are taken
    in ``max_large_uploads`` at a time (None: two per CPU), a 503 after waiting
    ``large_upload_wait_s`` (``lookalike.serving.uploads``).
    """
    if watch_interval_s is not None and not 0 <= watch_interval_s <= 3600:
        raise ValueError(f"watch_interval_s must be between 0 (off) and 3600 seconds, got {watch_interval_s}")
    metrics = ServingMetrics()
    large_uploads = max_large_uploads or default_large_uploads()
    slot = BackendSlot()
    engine = QueryEngine(metrics, batching)

    async def first_load() -> None:
        started = time.perf_counter()
        backend = await run_in_threadpool(load_backend)
        slot.swap(backend)
        if settle_heap:
            await run_in_threadpool(settle)
        metrics.served(backend.index.version, backend.encoder.version, len(backend.index))
        log.info("ready: index %s (%d items), model %s, after %.1fs of loading",
                 backend.index.version, len(backend.index), backend.encoder.version, time.perf_counter() - started)

    async def background_load() -> None:
        try:
            await first_load()
        except Exception as e:  # one line (its message names the file and what to do), the traceback with -v
            log.error("loading the model and index failed: %s: %s", type(e).__name__, e)
            log.debug("loading the model and index failed", exc_info=True)
            e.logged_as_error = True  # `lookalike serve` exits 1 without printing it a second time
            reason = f"loading failed: {type(e).__name__}: {e}"
            slot.refuse(None, without_store_root(reason, reloader.store.root) if reloader is not None else reason)
            app.state.startup_error = e
            stop = app.state.stop_server  # the server exits (non-zero) rather than serving nothing
            if stop is not None:
                stop()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        tasks = []
        try:
            if load_in_background:
                tasks.append(asyncio.create_task(background_load(), name="first load"))
            else:
                await first_load()
        except Exception as e:
            app.state.startup_error = e  # the server reports it after uvicorn gives up
            await engine.stop()
            raise
        if reloader is not None and watch_interval_s:
            tasks.append(asyncio.create_task(watch_store(app, watch_interval_s), name="store watcher"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await engine.stop()

    # FastAPIOffline: FastAPI whose /docs (Swagger UI) loads its script and styles from this
    # server (/static-offline-docs), not from a CDN, so it works offline. No /redoc: ReDoc
    # still fetches its logo from cdn.redoc.ly.
    app = FastAPIOffline(
        redoc_url=None,
        title="lookalike",
        summary="Visual similarity search: find the indexed images that look like a query.",
        version="1",
        lifespan=lifespan,
    )
    app.router.route_class = FastRoute  # the search endpoints get fast paths below
    app.state.slot = slot
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.reloader = reloader
    app.state.admin = AdminAuth.from_env(admin_token)
    app.state.startup_error = None
    app.state.stop_server = None  # set by whoever runs the app: called if a background first load fails
    app.state.settle_heap = settle_heap
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes, slack=MULTIPART_OVERHEAD_BYTES)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(HeadAsGet)  # HEAD on every GET resource, without a second operation per route
    app.add_middleware(SlashAlias, routes=lambda: app.routes)  # outermost: metrics see the route's own path
    app.include_router(admin_router)
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, body_parse_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, client_disconnected_handler)  # type: ignore[arg-type]
    page = load_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        """The process is up (it may still be loading; see /readyz)."""
        return Health()

    @app.get("/readyz", response_model=Ready, tags=["service"], responses=errors(503))
    def readyz() -> Ready | JSONResponse:
        """200 once a model and index are loaded and queries can be answered, 503 before."""
        backend = slot.backend
        if backend is None:
            if slot.last_reload_error:  # the first load failed: the server is stopping
                return JSONResponse({"detail": slot.last_reload_error}, status_code=503)
            return JSONResponse({"detail": "the model and index are still loading"}, status_code=503,
                                headers=RETRY_WHILE_LOADING)
        return Ready(index_version=backend.index.version)

    @app.get("/metrics", response_class=Response, tags=["service"], responses={200: {"content": {CONTENT_TYPE: {}}}})
    def prometheus_metrics() -> Response:
        """Prometheus metrics: requests and latency per endpoint and stage, batching, versions."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/info", response_model=Info, tags=["service"], responses=errors(503))
    def info(backend: BackendDep) -> Info:
        enc, index = backend.encoder, backend.index
        manifest = index.manifest
        return Info(
            model_version=enc.version,
            index_version=index.version,
            item_count=len(index),
            embed_dim=index.embed_dim,
            image_size=enc.spec.image_size,
            channels=enc.spec.channels,
            same_item_threshold=enc.same_item_threshold,
            same_item_means=enc.same_item_means,
            loaded_unix_s=backend.loaded_unix_s,
            max_upload_bytes=max_upload_bytes,
            max_large_uploads=large_uploads,
            index_build=manifest.get("build") or {},
            index_quality=index_quality(manifest),
            last_reload_error=slot.last_reload_error,
            last_reload_unix_s=slot.last_reload_unix_s,
            reload_count=slot.reload_count,
            batching={
                "max_batch": batching.max_batch, "max_embed_batch": batching.max_embed_batch,
                "max_wait_ms": batching.max_wait_s * 1000, "inline_max_ms": batching.inline_max_s * 1000,
            },
            **item_summary(index),
        )

    @app.post(
        "/v1/search/image",
        response_model=SearchResponse,
        tags=["search"],
        dependencies=STRICT_QUERY,
        openapi_extra=IMAGE_REQUEST_BODY,
        # 400: a malformed multipart form (no boundary, more than one file); 415: a JSON body
        responses=errors(400, 413, 415, 422, 503),
    )
    async def search_image(
        request: Request, backend: BackendDep, k: K = DEFAULT_K, kind: KindFilter = None, group: GroupFilter = None,
        source: SourceFilter = None, tag: TagFilter = None, max_per_group: PerGroup = None,
    ) -> Response:
        """Items that look like the uploaded image, most similar first."""
        return await image_search(request, backend, k, Filters.of(kind, group, max_per_group, source, tag))

    async def image_search(request: Request, backend: Backend, k: int, filters: Filters) -> Response:
        upload: list[Any] = []

        async def read() -> bytes:
            upload.extend(await read_upload(request, max_upload_bytes))
            return upload[0]

        try:
            neighbors = await search_by_image(engine, backend, read, k, filters)
        except HTTPException as e:  # an unusable upload is named, as a batch names its query
            if e.status_code != 422 or len(upload) < 2 or not upload[1]:
                raise
            raise HTTPException(status_code=422, detail=f"file {short_input(upload[1])!r}: {e.detail}") from None
        return json_text_response(search_response(backend, echo("image", k, filters, filename=upload[1], bytes=len(upload[0])), neighbors))

    async def search_image_fast(request: Request) -> Response | None:
        backend, params = slot.backend, search_params(request.scope["query_string"])
        if backend is None or params is None:
            return None
        return await image_search(request, backend, *params)

    @app.post("/v1/search/vector", response_model=SearchResponse, tags=["search"],
              responses=errors(400, 409, 413, 422, 503), dependencies=STRICT_QUERY)  # 400: a body that is not JSON
    async def search_vector(body: VectorQuery, backend: BackendDep) -> Response:
        """Items nearest to a query embedding (normalised to unit length)."""
        return await vector_search(body, backend)

    async def vector_search(body: VectorQuery, backend: Backend) -> Response:
        check_model_version(backend, body.model_version)
        try:
            query = unit_query(backend, body.vector)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        filters = filters_of(body)
        neighbors = await search_or_422(engine, SearchItem(backend, query, body.k, filters))
        return json_text_response(search_response(backend, echo("vector", body.k, filters, dim=len(body.vector)), neighbors))

    def json_fast_path(model: type, search: Callable[[Any, Backend], Awaitable[Response]]):
        """The fast handler of a JSON-body search that takes no query parameter (FastAPI's 422)."""
        async def fast(request: Request) -> Response | None:
            backend = slot.backend
            if backend is None or request.scope["query_string"]:
                return None
            body = await parse_json_body(request, model)  # 413 while reading, 400 when not JSON, 422 when invalid
            return None if body is None else await search(body, backend)
        return fast

    set_fast_path(app, "/v1/search/image", "POST", search_image_fast)
    set_fast_path(app, "/v1/search/vector", "POST", json_fast_path(VectorQuery, vector_search))

    @app.post("/v1/search/batch", response_model=BatchSearchResponse, tags=["search"],
              responses=errors(400, 404, 409, 413, 422, 503), dependencies=STRICT_QUERY)  # 400: a body that is not JSON
    async def search_batch(body: BatchSearch, backend: BackendDep) -> Response:
        """Several queries (vectors, item ids, base64 images) in one call; one response per query."""
        return await batch_search(body, backend)

    async def batch_search(body: BatchSearch, backend: Backend) -> Response:
        filters = filters_of(body)
        if any(q.vector is not None for q in body.queries):
            check_model_version(backend, body.model_version)
        images = batch_images(body.queries, backend.encoder.spec.max_pixels)  # 422 or 413 before any work

        async def one(i: int, q: BatchQuery) -> str:
            what = f"queries[{i}]: "
            exclude = None
            if q.vector is not None:
                try:
                    query = unit_query(backend, q.vector)
                except ValueError as e:
                    raise HTTPException(status_code=422, detail=f"{what}{e}") from None
                echoed = echo("vector", body.k, filters, dim=len(q.vector))
            elif q.id is not None:
                exclude = row_of(backend, q.id)
                if exclude is None:
                    raise HTTPException(status_code=404, detail=f"{what}{unknown_item(q.id, backend.index, in_url=False).detail}")
                query = backend.index.embeddings[exclude]
                echoed = echo("item", body.k, filters, id=q.id)
            else:
                data = images[i]
                neighbors = await search_by_image(engine, backend, data, body.k, filters, what)
                return search_response(backend, echo("image", body.k, filters, bytes=len(data)), neighbors)
            neighbors = await search_or_422(engine, SearchItem(backend, query, body.k, filters, exclude), what)
            return search_response(backend, echoed, neighbors)

        tasks = [asyncio.ensure_future(one(i, q)) for i, q in enumerate(body.queries)]
        try:
            return json_text_response('{"responses":[' + ",".join(await asyncio.gather(*tasks)) + "]}")
        finally:
            for task in tasks:
                task.cancel()

    set_fast_path(app, "/v1/search/batch", "POST", json_fast_path(BatchSearch, batch_search))
    app.include_router(items_router)

    fast_routes_first(app)
    dispatch_fast_first(app, metrics, max_body=max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    limit_large_uploads(app, large_uploads, max_upload_bytes + MULTIPART_OVERHEAD_BYTES, metrics, large_upload_wait_s)
    return app
