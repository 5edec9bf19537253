"""Small PNG previews of indexed items: the thumbnail the embed pipeline stored for the
item (what the index holds; the only picture a video frame has), else made on request
from the item's file.

Files are found through the index metadata (``thumbnail``/``uri`` recorded at embed time),
never from a path in the request, so a crafted id cannot reach other files. Images
are only ever shrunk: tiny ones (8x8 digits) stay tiny and the page scales them up
with ``image-rendering: pixelated``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from lookalike.model.preprocess import DEFAULT_MAX_PIXELS, SHRINK_MIN_SIDE_PX, ImageDecodeError, open_image, to_mode
from lookalike.model.store import resolve_in_store

THUMBNAIL_SIZE = 256


class ThumbnailUnavailable(LookupError):
    """The item exists but its preview cannot be made; the message says why."""


def local_path(uri: str, root: Path | None = None) -> Path:
    """The local file behind ``uri`` (a plain path or file:// URL), a relative path (a file
    inside the store) relative to the store ``root`` (see ``resolve_in_store``)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise ThumbnailUnavailable(f"item file {uri!r} is not on the local disk")
    return resolve_in_store(uri, root)


def stored_thumbnail(item: dict[str, Any], root: Path | None = None) -> bytes | None:
    """The JPEG thumbnail the embed pipeline wrote for the item (the only picture of a video
    frame), or None when the index predates thumbnails or the file is gone.

    A small plain JPEG's thumbnail is a hard link to its source file (``lookalike.pipeline.
    thumbnails``): while that file exists (more than one link), it is served only if its bytes
    are still the item's (their sha256 is the content hash); ThumbnailUnavailable if the source
    was edited in place since, rather than show the new picture for the old item."""
    path = item.get("thumbnail")
    if not path:
        return None
    try:
        with open(local_path(str(path), root), "rb") as f:
            data = f.read()
            linked = os.fstat(f.fileno()).st_nlink > 1
    except (OSError, ThumbnailUnavailable):
        return None
    if linked and not holds_content(item, data):
        raise ThumbnailUnavailable(f"the file of item {item['id']!r} was changed in place after it was indexed: "
                                   "its picture is gone (embed the corpus again to index the new one)")
    return data


def holds_content(item: dict[str, Any], data: bytes) -> bool:
    """Whether ``data`` are the bytes the item was embedded from: their sha256 is its content
    hash (an image's; True when the item has no such hash to compare, e.g. a video frame)."""
    content_hash = str(item.get("content_hash") or "")
    if len(content_hash) != 64:
        return True
    return hashlib.sha256(data).hexdigest() == content_hash


def render_thumbnail(item: dict[str, Any], root: Path | None = None, size: int = THUMBNAIL_SIZE) -> bytes:
    """PNG bytes of the item's image, at most ``size`` pixels on its long side: from the
    thumbnail the pipeline stored when it indexed the item (it shows what the index holds,
    even after the file was replaced; the only picture of a video frame), else, for an index
    without one, from the item's file. Paths are resolved against the store ``root``
    (``resolve_in_store``)."""
    img = _stored_image(item, root)
    if img is not None:
        return _png(img, size)
    if item.get("kind") == "frame":
        raise ThumbnailUnavailable(f"video frame {item['id']!r} has no stored thumbnail")
    uri = item.get("uri")
    if not uri:
        raise ThumbnailUnavailable(f"item {item['id']!r} has no file recorded")
    try:
        data = local_path(str(uri), root).read_bytes()
    except OSError as e:
        raise ThumbnailUnavailable(f"file of item {item['id']!r} cannot be read: {e.strerror or e}") from None
    if not holds_content(item, data):
        raise ThumbnailUnavailable(f"the file of item {item['id']!r} was replaced after it was indexed: "
                                   "its picture is gone (embed the corpus again to index the new one)")
    try:
        img = open_image(data, DEFAULT_MAX_PIXELS, max(size, SHRINK_MIN_SIDE_PX))  # a large photo decoded shrunk
    except ImageDecodeError as e:
        raise ThumbnailUnavailable(f"file of item {item['id']!r} is not a readable image: {e}") from None
    return _png(img, size)


def thumbnail_version(item: dict[str, Any]) -> str | None:
    """What a thumbnail URL carries as ``?v=``: the start of the item's content hash, so a
    replaced picture gets a new URL (and a cached old one is never shown for it)."""
    content_hash = item.get("content_hash")
    return str(content_hash)[:12] if content_hash else None


def _stored_image(item: dict[str, Any], root: Path | None) -> Image.Image | None:
    """The item's stored thumbnail decoded, or None when there is none or it is unreadable."""
    stored = stored_thumbnail(item, root)
    if stored is None:
        return None
    try:
        return open_image(stored, DEFAULT_MAX_PIXELS)
    except ImageDecodeError:
        return None


def _png(img: Image.Image, size: int) -> bytes:
    colour = img.mode == "P" or len(set(img.getbands()) - {"A"}) > 1
    img = to_mode(img, 3 if colour else 1)  # alpha on white, 16-bit scaled, CMYK to RGB
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, as RFC 9110 asks)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in if_none_match.split(","))
