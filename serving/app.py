"""The HTTP API and the search page: ``create_app(load_backend)`` returns a FastAPI app.

The encoder and index are loaded once, in the app's lifespan, by the callable the
caller passes in (the server passes ``lambda: load_backend(workdir)``; a test can
pass anything that returns a Backend). Endpoints receive them through dependency
injection, never through module globals. Model and ScaNN work runs in the thread
pool (sync endpoints, or ``run_in_threadpool``), so the event loop stays free.

Bad input is always a 4xx with a reason: 413 for an oversized body, 422 for bytes
that are not an image, vectors of the wrong length or with NaN, or ``k`` out of
range, 404 for an unknown item id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import UploadFile

from lookalike.index.searcher import Neighbor
from lookalike.model.preprocess import ImageDecodeError
from lookalike.serving.backend import Backend
from lookalike.serving.limits import BodySizeLimit, PayloadTooLarge
from lookalike.serving.schemas import (
    DEFAULT_K,
    MAX_K,
    ErrorMessage,
    Health,
    Info,
    ItemMetadata,
    QueryEcho,
    SearchResponse,
    SearchResult,
    VectorQuery,
)
from lookalike.serving.thumbnails import ThumbnailUnavailable, render_thumbnail

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_OVERHEAD_BYTES = 16 * 1024
UPLOAD_FIELD = "file"

K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
ItemId = Annotated[str, Path(description="item id as listed in search results (may contain '/')")]

_BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": f"an image file, as multipart field {UPLOAD_FIELD!r} or as the raw request body",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": [UPLOAD_FIELD], "properties": {UPLOAD_FIELD: _BINARY["schema"]}}
            },
            "image/*": _BINARY,
            "application/octet-stream": _BINARY,
        },
    }
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error responses carrying ``{"detail": "reason"}``."""
    return {code: {"model": ErrorMessage} for code in codes}


def get_backend(request: Request) -> Backend:
    """The Backend loaded by the lifespan (503 if asked for before it is ready)."""
    backend = getattr(request.app.state, "backend", None)
    if backend is None:
        raise HTTPException(status_code=503, detail="the model and index are still loading")
    return backend


BackendDep = Annotated[Backend, Depends(get_backend)]


def item_url(item_id: str, suffix: str = "") -> str:
    return f"/v1/items/{quote(item_id, safe='/')}{suffix}"


def item_or_404(backend: Backend, item_id: str) -> dict[str, Any]:
    row = backend.index.row_of(item_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"unknown item id {item_id!r}")
    return backend.index.items[row]


def search_response(backend: Backend, query: QueryEcho, neighbors: list[Neighbor]) -> SearchResponse:
    threshold = backend.encoder.same_item_threshold
    results = []
    for n in neighbors:
        item = backend.index.items[n.row]
        results.append(
            SearchResult(
                id=n.id,
                score=n.score,
                distance=n.distance,
                same_item=threshold is not None and n.distance <= threshold,
                kind=item.get("kind") or "image",
                timestamp_s=item.get("timestamp_s"),
                thumbnail_url=item_url(n.id, "/thumbnail"),
            )
        )
    return SearchResponse(
        query=query, results=results, model_version=backend.encoder.version, index_version=backend.index.version
    )


def search_image_bytes(backend: Backend, data: bytes, k: int) -> list[Neighbor]:
    """Decode, embed and search one image (blocking; run it in the thread pool)."""
    pixels = backend.encoder.preprocess(data)
    return backend.index.search(backend.encoder.embed(pixels[None]), k)[0]


def unit_query(backend: Backend, vector: list[float]) -> np.ndarray:
    """A [1, D] unit-length query; ValueError with the reason if it cannot be one."""
    if len(vector) != backend.index.embed_dim:
        raise ValueError(f"vector has {len(vector)} values but the index holds {backend.index.embed_dim}-dimensional embeddings")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
        q = backend.index.check_queries(np.asarray(vector, dtype=np.float32))
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("query vector has zero (or overflowing) length and no direction")
    return q / norm


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """The uploaded image bytes and file name, from a multipart form or the raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get(UPLOAD_FIELD)
            if not isinstance(upload, UploadFile):
                raise HTTPException(status_code=422, detail=f"multipart upload needs a file in field {UPLOAD_FIELD!r}")
            data, name = await upload.read(max_bytes + 1), upload.filename
    else:
        data, name = await request.body(), None
    if len(data) > max_bytes:
        raise PayloadTooLarge(max_bytes)
    return data, name


def load_page() -> str:
    return resources.files("lookalike.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(
    load_backend: Callable[[], Backend],
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The API and page; ``load_backend`` is called once at startup, in a worker thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            app.state.backend = await run_in_threadpool(load_backend)
        except Exception as e:
            app.state.startup_error = e  # the server reports it after uvicorn gives up
            raise
        log.info("serving after %.1fs of loading", time.perf_counter() - started)
        yield

    app = FastAPI(
        title="lookalike",
        summary="Visual similarity search: find the indexed images that look like a query.",
        version="1",
        lifespan=lifespan,
    )
    app.state.backend = None
    app.state.startup_error = None
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes, slack=MULTIPART_OVERHEAD_BYTES)
    page = load_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz(backend: BackendDep) -> Health:
        return Health()

    @app.get("/v1/info", response_model=Info, tags=["service"])
    def info(backend: BackendDep) -> Info:
        enc, index = backend.encoder, backend.index
        return Info(
            model_version=enc.version,
            index_version=index.version,
            item_count=len(index),
            embed_dim=index.embed_dim,
            image_size=enc.spec.image_size,
            channels=enc.spec.channels,
            same_item_threshold=enc.same_item_threshold,
            loaded_unix_s=backend.loaded_unix_s,
            max_upload_bytes=max_upload_bytes,
        )

    @app.post(
        "/v1/search/image",
        response_model=SearchResponse,
        tags=["search"],
        openapi_extra=IMAGE_REQUEST_BODY,
        responses=errors(413, 422),
    )
    async def search_image(request: Request, backend: BackendDep, k: K = DEFAULT_K) -> SearchResponse:
        """Items that look like the uploaded image, most similar first."""
        data, name = await read_upload(request, max_upload_bytes)
        try:
            neighbors = await run_in_threadpool(search_image_bytes, backend, data, k)
        except ImageDecodeError as e:
            raise HTTPException(status_code=422, detail=f"not a usable image: {e}") from None
        query = QueryEcho(type="image", k=k, filename=name, bytes=len(data))
        return search_response(backend, query, neighbors)

    @app.post("/v1/search/vector", response_model=SearchResponse, tags=["search"], responses=errors(413, 422))
    def search_vector(body: VectorQuery, backend: BackendDep) -> SearchResponse:
        """Items nearest to a query embedding (normalised to unit length)."""
        try:
            neighbors = backend.index.search(unit_query(backend, body.vector), body.k)[0]
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        return search_response(backend, QueryEcho(type="vector", k=body.k, dim=len(body.vector)), neighbors)

    # The /similar and /thumbnail routes come before the catch-all metadata route:
    # {item_id:path} would otherwise swallow the suffix.
    @app.get("/v1/items/{item_id:path}/similar", response_model=SearchResponse, tags=["items"], responses=errors(404, 422))
    def similar(item_id: ItemId, backend: BackendDep, k: K = DEFAULT_K) -> SearchResponse:
        """Items that look like an indexed item (the item itself excluded)."""
        try:
            neighbors = backend.index.similar_to(item_id, k)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"unknown item id {item_id!r}") from None
        return search_response(backend, QueryEcho(type="item", k=k, id=item_id), neighbors)

    @app.get(
        "/v1/items/{item_id:path}/thumbnail",
        response_class=Response,
        tags=["items"],
        responses={200: {"content": {"image/png": {}}}, **errors(404)},
    )
    def thumbnail(item_id: ItemId, backend: BackendDep) -> Response:
        """A PNG preview of the item's image (never upscaled)."""
        item = item_or_404(backend, item_id)
        try:
            png = render_thumbnail(item)
        except ThumbnailUnavailable as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/v1/items/{item_id:path}", response_model=ItemMetadata, tags=["items"], responses=errors(404))
    def item_metadata(item_id: ItemId, backend: BackendDep) -> ItemMetadata:
        """What the index knows about an item (its file path on the server is not exposed)."""
        item = item_or_404(backend, item_id)
        return ItemMetadata(
            id=item_id,
            kind=item.get("kind") or "image",
            width=item.get("width"),
            height=item.get("height"),
            content_hash=item.get("content_hash"),
            timestamp_s=item.get("timestamp_s"),
            thumbnail_url=item_url(item_id, "/thumbnail"),
            similar_url=item_url(item_id, "/similar"),
        )

    return app
