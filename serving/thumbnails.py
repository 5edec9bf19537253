"""Small PNG previews of indexed items, made on request from the item's own file.

The file is found through the index metadata (the ``uri`` recorded at embed time),
never from a path in the request, so a crafted id cannot reach other files. Images
are only ever shrunk: tiny ones (8x8 digits) stay tiny and the page scales them up
with ``image-rendering: pixelated``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from lookalike.model.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image, to_mode

THUMBNAIL_SIZE = 256


class ThumbnailUnavailable(LookupError):
    """The item exists but its preview cannot be made; the message says why."""


def local_path(uri: str) -> Path:
    """The local file behind ``uri`` (a plain path or file:// URL)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise ThumbnailUnavailable(f"item file {uri!r} is not on the local disk")
    return Path(uri)


def render_thumbnail(item: dict[str, Any], size: int = THUMBNAIL_SIZE) -> bytes:
    """PNG bytes of the item's image, at most ``size`` pixels on its long side."""
    uri = item.get("uri")
    if not uri:
        raise ThumbnailUnavailable(f"item {item['id']!r} has no file recorded")
    try:
        data = local_path(str(uri)).read_bytes()
    except OSError as e:
        raise ThumbnailUnavailable(f"file of item {item['id']!r} cannot be read: {e.strerror or e}") from None
    try:
        img = open_image(data, DEFAULT_MAX_PIXELS)
    except ImageDecodeError as e:
        raise ThumbnailUnavailable(f"file of item {item['id']!r} is not a readable image: {e}") from None
    colour = img.mode == "P" or len(set(img.getbands()) - {"A"}) > 1
    img = to_mode(img, 3 if colour else 1)  # alpha on white, 16-bit scaled, CMYK to RGB
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
