"""The item endpoints: items like an indexed one, its thumbnail and its metadata."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from starlette.convertors import PathConvertor, register_url_convertor

from lookalike.index.rows import user_columns
from lookalike.serving.engine import Filters, SearchItem
from lookalike.serving.params import (
    K,
    STRICT_QUERY,
    BackendDep,
    EngineDep,
    GroupFilter,
    ItemId,
    KindFilter,
    PerGroup,
    SourceFilter,
    TagFilter,
    errors,
)
from lookalike.serving.queries import NO_ITEM_ID, echo, item_or_404, row_of, search_or_422, search_response, unknown_item
from lookalike.serving.results import group_of, item_url, json_metadata, json_text_response, thumbnail_url
from lookalike.serving.schemas import DEFAULT_K, ItemMetadata, SearchResponse
from lookalike.serving.thumbnails import ThumbnailUnavailable, etag_matches, render_thumbnail, thumbnail_version


class ItemIdConvertor(PathConvertor):
    """An item id in a URL path: any characters, '/' and a newline (``%0A``) included.
    Starlette's ``path`` convertor matches ``.*``, which stops at a newline: an item whose file
    name holds one was indexed but its URLs answered a bare 404."""

    regex = r"[\s\S]*"


register_url_convertor("item_id", ItemIdConvertor())

items_router = APIRouter()


# The /similar and /thumbnail routes come before the catch-all metadata route:
# {item_id:item_id} would otherwise swallow the suffix (with a trailing slash too: no id ends in '/').
@items_router.get("/v1/items/{item_id:item_id}/similar/", include_in_schema=False, dependencies=STRICT_QUERY)
@items_router.get("/v1/items/{item_id:item_id}/similar", response_model=SearchResponse, tags=["items"], responses=errors(404, 422, 503),
    dependencies=STRICT_QUERY)
async def similar(
    item_id: ItemId, backend: BackendDep, engine: EngineDep, k: K = DEFAULT_K, kind: KindFilter = None,
    group: GroupFilter = None, source: SourceFilter = None, tag: TagFilter = None, max_per_group: PerGroup = None,
) -> Response:
    """Items that look like an indexed item (the item itself excluded)."""
    row = row_of(backend, item_id)
    if row is None:
        raise unknown_item(item_id, backend.index)
    filters = Filters.of(kind, group, max_per_group, source, tag)
    item = SearchItem(backend, backend.index.embeddings[row], k, filters, exclude_row=row)
    neighbors = await search_or_422(engine, item)
    return json_text_response(search_response(backend, echo("item", k, filters, id=item_id), neighbors))


ThumbnailVersion = Annotated[str | None, Query(description=(
    "the picture's version, as the thumbnail_url of results and metadata give it: with it the answer may be cached "
    "for a year (Cache-Control immutable), since that URL always shows that picture; without it, or with another "
    "value, it is revalidated (ETag)"))]


# A static resource: GET (and HEAD, as every GET resource: ``lookalike.serving.head``),
# conditional on its ETag, and a query string (``?v=`` versions) is not refused.
@items_router.get("/v1/items/{item_id:item_id}/thumbnail/", include_in_schema=False, response_class=Response)
@items_router.get(
    "/v1/items/{item_id:item_id}/thumbnail",
    response_class=Response,
    tags=["items"],
    responses={200: {"content": {"image/png": {}}}, 304: {"description": "not modified (If-None-Match)"},
               **errors(404, 422, 503)},
)
def thumbnail(item_id: ItemId, backend: BackendDep, request: Request, v: ThumbnailVersion = None) -> Response:
    """A PNG preview of the item's image (never upscaled)."""
    item = item_or_404(backend, item_id)
    version = thumbnail_version(item)
    # A URL naming the picture's version (as results and metadata link it) always shows that
    # picture: cache it for long. Any other URL may show another picture tomorrow: revalidate.
    current = version is not None and request.query_params.getlist("v") == [version]  # ?v=x&v=<version>: not it
    headers = {"Cache-Control": "public, max-age=31536000, immutable" if current else "public, no-cache"}
    if item.get("content_hash"):  # same bytes, same preview: no need to render to compare
        headers["ETag"] = f'"{item["content_hash"][:32]}-{item.get("timestamp_s") or 0}"'
        if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
            return Response(status_code=304, headers=headers)
    try:
        png = render_thumbnail(item, backend.store_root)
    except ThumbnailUnavailable as e:
        raise HTTPException(status_code=404, detail=str(e)) from None
    return Response(png, media_type="image/png", headers=headers)


@items_router.get("/v1/items", include_in_schema=False)
def no_item_id() -> None:
    """``/v1/items`` itself (which Starlette would redirect to ``/v1/items/``): a 404 saying why."""
    raise HTTPException(status_code=404, detail=NO_ITEM_ID)


@items_router.get("/v1/items/{item_id:item_id}", response_model=ItemMetadata, tags=["items"], responses=errors(404, 422, 503),
    dependencies=STRICT_QUERY)
def item_metadata(item_id: ItemId, backend: BackendDep) -> ItemMetadata:
    """What the index knows about an item (its file path on the server is not exposed)."""
    item = item_or_404(backend, item_id)
    item_id = str(item["id"])  # as the index writes it (a frame's seconds with three decimals)
    return ItemMetadata(
        id=item_id,
        kind=item.get("kind") or "image",
        width=item.get("width"),
        height=item.get("height"),
        content_hash=item.get("content_hash"),
        timestamp_s=item.get("timestamp_s"),
        group=group_of(item),
        thumbnail_url=thumbnail_url(item_id, item.get("content_hash")),
        similar_url=item_url(item_id, "/similar"),
        metadata=json_metadata({key: item[key] for key in user_columns(list(item))}),
    )

