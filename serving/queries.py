"""Between HTTP and the query engine: request inputs become queries, neighbours become responses.

Shared by every search endpoint: unknown query parameters refused (422), unit-length
query vectors (422 reasons for bad ones), upload reading (multipart or raw body, size
checked exactly), image decoding through the embed batcher, and the response shape with
per-result metadata (kind, video timestamp and group, same-item flag, thumbnail URL;
never the server's file path).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import types
import unicodedata
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile

from lookalike.index.filtered import live_matches
from lookalike.index.searcher import ItemIndex, Neighbor
from lookalike.model.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError
from lookalike.serving.backend import Backend
from lookalike.serving.decode import LARGE_IMAGE_PIXELS, image_pixels, looks_like_heif, looks_like_video
from lookalike.serving.engine import Filters, ImageQuery, QueryEngine, SearchItem
from lookalike.serving.limits import PayloadTooLarge
from lookalike.serving.notes import empty_result_note
from lookalike.serving.results import search_json
from lookalike.serving.schemas import BatchQuery, FilterFields
from lookalike.serving.validation import FLOAT32_MAX, short_input

UPLOAD_FIELD = "file"
# Uploads up to this size are decoded in the image batch (well under a millisecond each);
# larger ones in the thread pool before they join a batch, so a big photo never stalls others.
INLINE_DECODE_BYTES = 64 * 1024
# The image queries of one batch request may have this many pixels in all (one image's limit).
MAX_BATCH_PIXELS = DEFAULT_MAX_PIXELS


def _takes_many(annotation: Any) -> bool:
    """Whether a query parameter's annotation is a list (``list[str] | None`` included)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return any(typing.get_origin(option) in (list, tuple, set, frozenset) for option in options)


def declared_query_params(route: Any) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameter names ``route`` (a FastAPI APIRoute) declares, its dependencies'
    included, and those of them that take a single value (not a list); remembered on the route."""
    names = getattr(route, "_lookalike_query_names", None)
    if names is None:
        found: set[str] = set()
        single: set[str] = set()
        pending = [route.dependant]
        while pending:
            dependant = pending.pop()
            for field in dependant.query_params:
                found.add(field.alias)
                if not _takes_many(field.field_info.annotation):
                    single.add(field.alias)
            pending.extend(dependant.dependencies)
        names = route._lookalike_query_names = (frozenset(found), frozenset(single))
    return names


async def no_unknown_query_params(request: Request) -> None:
    """A route dependency: 422 naming each query parameter the endpoint does not declare, as
    for unknown JSON body fields, so a typo (``max_per_grop=1``) is not silently an unfiltered
    search. (Async: FastAPI runs a plain ``def`` dependency in a thread.)"""
    params = request.query_params
    if not params:
        return
    route = request.scope.get("route")
    allowed, single = declared_query_params(route) if route is not None else (frozenset(params.keys()), frozenset())
    unknown = [name for name in dict.fromkeys(params.keys()) if name not in allowed]
    if unknown:
        takes = ", ".join(sorted(allowed)) if allowed else "none"
        raise RequestValidationError([
            {"type": "extra_forbidden", "loc": ("query", name), "input": params.get(name),
             "msg": f"unknown query parameter {name!r} (this endpoint takes: {takes})"}
            for name in unknown
        ])
    repeated = [name for name in dict.fromkeys(params.keys()) if name in single and len(params.getlist(name)) > 1]
    if repeated:  # ?k=5&k=6 would silently use the last one
        raise RequestValidationError([
            {"type": "repeated", "loc": ("query", name), "input": params.getlist(name),
             "msg": f"query parameter {name!r} takes one value, got {len(params.getlist(name))}"}
            for name in repeated
        ])


NO_ITEM_ID = ("no item id in the URL: an item is /v1/items/{id}, with an id as search results list it; "
              "there is no listing of every item")


def unknown_item(item_id: str, index: ItemIndex | None = None, in_url: bool = True) -> HTTPException:
    """The 404 for an id the index does not hold; for a video's path, how its frames are named
    (in a URL, a '#' sent unescaped starts the fragment, which never reaches the server); for
    a moment of an indexed video that was not sampled, the nearest frames that were."""
    from lookalike.pipeline.video import is_video_path

    if not item_id:  # GET /v1/items or /v1/items/: there is no listing of every item
        return HTTPException(status_code=404, detail=NO_ITEM_ID)
    shown = short_input(item_id)  # a 20,000-character id is not echoed whole, as in a 422
    hint = (f": a video's frames are the items '{shown}#t=<seconds>'" + (" (in a URL, send '#' as %23)" if in_url else "")
            if is_video_path(item_id) else "")
    if not hint and index is not None:
        hint = nearest_frames_hint(index, item_id)
    return HTTPException(status_code=404, detail=f"unknown item id {shown!r}{hint}")


NEAREST_FRAMES_SHOWN = 2


def nearest_frames_hint(index: ItemIndex, item_id: str) -> str:
    """``: <video> has no frame at T s; its nearest sampled frames are '<id>' and '<id>'`` for
    a frame id ``<video>#t=<seconds>`` (seconds as frame ids write them) of a video the index
    holds frames of, else "". Cheap for any other id: the video's name is checked, then its
    group among the live groups (cached per index state), before the group's rows are looked up."""
    from bisect import bisect_left

    from lookalike.pipeline.video import FRAME_TIME, is_video_path
    from lookalike.serving.notes import live_groups

    frame = FRAME_TIME.match(item_id)
    if frame is None or not is_video_path(frame["video"]):
        return ""
    video, wanted = frame["video"], float(frame["seconds"])
    groups = live_groups(index)[0]
    at = bisect_left(groups, video)
    if at == len(groups) or groups[at] != video:
        return ""
    rows = live_matches(index, {"group": {video}})[1]  # cached per index state, as the search filters are
    times = np.asarray([t if t is not None else np.nan for t in index.items.column_values("timestamp_s", rows)], float)
    nearest = np.argsort(np.abs(times - wanted), kind="stable")[:NEAREST_FRAMES_SHOWN]
    nearest = nearest[np.argsort(times[nearest], kind="stable")]
    ids = index.items.ids_of(rows[nearest])
    return (f": {short_input(video)} has no frame at {wanted:.3f} s; its nearest sampled "
            f"frame{'s are' if len(ids) > 1 else ' is'} " + " and ".join(repr(i) for i in ids))


def row_of(backend: Backend, item_id: str) -> int | None:
    """The index row of ``item_id``; a frame id whose seconds are written otherwise than the
    index writes them (``clip.mp4#t=1.2`` for ``clip.mp4#t=1.200``) finds that frame too, and
    an id typed in another Unicode normal form than the file's name (macOS writes names
    decomposed, NFD: ``e`` and a combining accent; a keyboard types them composed, NFC)."""
    row = backend.index.row_of(item_id)
    if row is None:
        from lookalike.pipeline.video import canonical_frame_id

        canonical = canonical_frame_id(item_id)
        row = backend.index.row_of(canonical) if canonical != item_id else None
        if row is None and not canonical.isascii():
            for form in ("NFC", "NFD"):
                spelled = unicodedata.normalize(form, canonical)
                row = backend.index.row_of(spelled) if spelled != canonical else None
                if row is not None:
                    break
    return row


def item_or_404(backend: Backend, item_id: str) -> dict[str, Any]:
    row = row_of(backend, item_id)
    if row is None:
        raise unknown_item(item_id, backend.index)
    return backend.index.items[row]


def search_response(backend: Backend, query: dict[str, Any], neighbors: list[Neighbor]) -> str:
    """A ``SearchResponse`` as JSON text (see ``lookalike.serving.results``)."""
    results = backend.results_json.encode(backend.encoder.same_item_threshold, neighbors)
    note = empty_result_note(backend.index, query) if not neighbors else None
    return search_json(query, results, backend.encoder.version, backend.index.version, note)


def echo(type_: str, k: int, filters: Filters, *, filename: str | None = None, bytes: int | None = None,
         dim: int | None = None, id: str | None = None) -> dict[str, Any]:
    """A ``QueryEcho``: what was searched for, as the server understood it."""
    return {
        "type": type_, "k": k, "filename": filename, "bytes": bytes, "dim": dim, "id": id,
        "kind": filters.where.get("kind"), "group": filters.where.get("group"), "source": filters.where.get("source"),
        "tag": filters.where.get("tags"), "max_per_group": filters.max_per_group,
    }


def filters_of(body: FilterFields) -> Filters:
    return Filters.of(body.kind, body.group, body.max_per_group, body.source, body.tag)


def check_model_version(backend: Backend, model_version: str | None) -> None:
    """409 when query embeddings made by ``model_version`` are not of the served model's space."""
    served = backend.encoder.version
    if model_version is not None and model_version != served:
        raise HTTPException(status_code=409, detail=(
            f"the query embeddings are from model {model_version!r} but the index serves model {served!r}: "
            f"embed the query with {served!r} (see /v1/info)"))


def unit_query(backend: Backend, vector: list[float]) -> np.ndarray:
    """A [D] unit-length float32 query; ValueError with the reason if it cannot be one. The
    length is computed in float64 on the vector scaled by its largest value, so large values
    (1e20) normalise fine; values beyond float32's range are refused as such."""
    if len(vector) != backend.index.embed_dim:
        raise ValueError(f"vector has {len(vector)} value{'' if len(vector) == 1 else 's'} but the index holds "
                         f"{backend.index.embed_dim}-dimensional embeddings")
    q = np.asarray(vector, dtype=np.float64)
    finite = np.isfinite(q)
    if not finite.all():
        at = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"vector has NaN or infinite values (the first at position {at})")
    largest = float(np.abs(q).max()) if len(q) else 0.0
    if largest > FLOAT32_MAX:
        at = int(np.argmax(np.abs(q)))
        raise ValueError(f"vector value {float(q[at])!r} at position {at} overflows float32 (largest magnitude {FLOAT32_MAX:.4g})")
    if largest == 0.0:
        raise ValueError("query vector has zero length and no direction")
    scaled = q / largest
    return (scaled / math.sqrt(float(np.dot(scaled, scaled)))).astype(np.float32)


def require_complete_form(content_type: str, body: bytes) -> None:
    """400 for a multipart body without its closing boundary (``--<boundary>--``): cut short in
    transit or by the client, it would parse as a form without the file (a misleading 422). A
    boundary cannot occur inside the parts, so its closing form anywhere in the body is the
    end of the form. A missing boundary is left to Starlette's own 400."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in body:
        raise HTTPException(status_code=400, detail=(
            f"malformed multipart upload: the body ({len(body):,} bytes) ends before the form's closing boundary "
            f"'--{boundary.decode('latin-1')}--' (cut short in transit, or not a multipart form?)"))


def opens_as_image(data: bytes) -> bool:
    """Whether Pillow recognises ``data`` as an image (its header only: nothing is decoded).
    A TGA has no magic number, and its first byte may be '{'."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """The uploaded image bytes and file name, from a multipart form or the raw body.

    422 for a form without a file in field ``UPLOAD_FIELD`` or with any other field (naming
    it: FastAPI's 422 shape, through the validation handler), and for a request with no body
    at all (no image was sent; an empty file that was sent is left to the decoder: "empty file").
    """
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):  # media types ignore case
        require_complete_form(content_type, await request.body())  # the form is parsed from the body read here
        async with request.form(max_files=1, max_fields=16) as form:
            extra = [name for name in dict.fromkeys(form.keys()) if name != UPLOAD_FIELD]
            if extra:  # e.g. k sent as a form field: refused, as an unknown JSON field is, not silently ignored
                raise RequestValidationError([
                    {"type": "extra_forbidden", "loc": ("body", name),
                     "input": form.get(name) if isinstance(form.get(name), str) else "<a file>",
                     "msg": f"unknown multipart field {name!r}: the form takes only the image, as field {UPLOAD_FIELD!r}; "
                            "k and the filters are query parameters (/v1/search/image?k=5)"}
                    for name in extra
                ])
            upload = form.get(UPLOAD_FIELD)
            if not isinstance(upload, UploadFile):
                raise HTTPException(status_code=422, detail=f"multipart upload needs a file in field {UPLOAD_FIELD!r}")
            data, name = await upload.read(max_bytes + 1), upload.filename
    else:
        data, name = await request.body(), None
        if not data:
            raise HTTPException(status_code=422, detail="no image in the request: send the image file as the body "
                                                        f"or as multipart field {UPLOAD_FIELD!r}")
        if data.lstrip()[:1] in (b"{", b"[") and not opens_as_image(data):  # JSON, whatever its Content-Type says
            raise HTTPException(status_code=415, detail=(
                "a JSON body is not an image: /v1/search/image takes the image file as the body or as multipart "
                f"field {UPLOAD_FIELD!r}; a JSON query by vector goes to /v1/search/vector, one by a stored item's "
                "id to /v1/items/{id}/similar"))
    if len(data) > max_bytes:
        raise PayloadTooLarge(max_bytes)
    return data, name


async def search_by_image(engine: QueryEngine, backend: Backend, data: bytes | Callable[[], Awaitable[bytes]], k: int,
                          filters: Filters, what: str = "") -> list[Neighbor]:
    """Image bytes (or an async callable giving them) -> neighbours, through the image batcher:
    the upload is decoded, embedded and searched in the batcher's worker thread, together
    with the other image queries of its batch (a large upload is decoded beforehand, in the
    thread pool, so it never holds up a batch). 422 with the reason for an unusable image."""
    with engine.images.expect() as expected:
        if callable(data):
            data = await data()
        try:
            image: bytes | np.ndarray = data
            size = image_pixels(data, backend.encoder.spec.max_pixels)
            if size is not None and size[0] * size[1] > LARGE_IMAGE_PIXELS:
                async with engine.decode_slots:  # a bounded number at once: each costs hundreds of MB
                    image = await run_in_threadpool(engine.decode, backend, data)
            elif len(data) > INLINE_DECODE_BYTES:
                image = await run_in_threadpool(engine.decode, backend, data)
            return await expected.submit(ImageQuery(backend, image, k, filters), inline=not filters.active)
        except ImageDecodeError as e:
            reason = str(e)
            if looks_like_heif(data):  # (bytes by now)
                reason = ("a HEIF/HEIC image (as iPhones save photos) cannot be decoded here: convert it to JPEG or "
                          "PNG first")
            elif looks_like_video(data):
                reason = ("a video is not accepted as a query: search by the id of one of its frames, "
                          "'<video id>#t=<seconds>' as a frame result shows it (e.g. clips/a.mp4#t=1.500): "
                          "the page's id box, `lookalike query --id`, or GET /v1/items/<id>/similar with '#' sent as %23")
            raise HTTPException(status_code=422, detail=f"{what}not a usable image: {reason}") from None
        except ValueError as e:  # the search refused the query
            raise HTTPException(status_code=422, detail=f"{what}{e}") from None


_DATA_URL = re.compile(r"[ \t\r\n]*data:[^,]{0,200};base64,", re.IGNORECASE)
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=_ \t\r\n-]")
_WHITESPACE = re.compile(r"[ \t\r\n]+")


def decode_base64(text: str) -> bytes:
    """The bytes of ``text`` in base64 as people send it: a browser's ``data:image/png;base64,``
    prefix, line breaks (``base64`` wraps at 76 columns) and the URL-safe alphabet (padding
    optional) are accepted; a character of neither alphabet is a ValueError naming it and its
    position in ``text``, and so is a mix of the two alphabets."""
    prefix = _DATA_URL.match(text)
    start = prefix.end() if prefix else 0
    bad = _NOT_BASE64.search(text, start)
    if bad:
        raise ValueError(f"character {bad.group(0)!r} at position {bad.start()} is not base64")
    body = _WHITESPACE.sub("", text[start:])
    url_safe = "-" in body or "_" in body
    if url_safe and ("+" in body or "/" in body):
        raise ValueError("it mixes the standard alphabet (+ /) with the URL-safe one (- _)")
    if url_safe:
        body = body.translate(str.maketrans("-_", "+/"))
    if len(body) % 4:  # URL-safe base64 often drops its padding
        body += "=" * (-len(body) % 4)
    return base64.b64decode(body, validate=True)


def batch_images(queries: list[BatchQuery], max_pixels: int) -> dict[int, bytes]:
    """The decoded ``image_base64`` of a batch's queries by position: 422 for bad base64 or an
    image over ``max_pixels``, 413 when their pixels add up to more than MAX_BATCH_PIXELS
    (each costs memory and CPU to decode: one request must not hold many large images)."""
    images, total = {}, 0
    for i, q in enumerate(queries):
        if q.image_base64 is None:
            continue
        what = f"queries[{i}]: "
        try:
            data = images[i] = decode_base64(q.image_base64)
        except (binascii.Error, ValueError) as e:
            raise HTTPException(status_code=422, detail=f"{what}image_base64 is not valid base64 ({e}): give the file's "
                                                        "bytes in base64, standard or URL-safe alphabet") from None
        try:
            size = image_pixels(data, max_pixels)
        except ImageDecodeError as e:
            raise HTTPException(status_code=422, detail=f"{what}not a usable image: {e}") from None
        total += size[0] * size[1] if size is not None else 0
    if total > MAX_BATCH_PIXELS:
        raise HTTPException(status_code=413, detail=f"the batch's images have {total} pixels in all, over the limit of "
                                                    f"{MAX_BATCH_PIXELS} pixels per request (send fewer or smaller images)")
    return images


async def search_or_422(engine: QueryEngine, item: SearchItem, what: str = "") -> list[Neighbor]:
    try:
        return await engine.search(item)
    except ValueError as e:
        raise HTTPException(status_code=422, detail=f"{what}{e}") from None
