"""Small JPEG thumbnails per item, stored by content hash so runs share them."""

from __future__ import annotations

import hashlib
import os
import uuid

from PIL import Image

THUMBNAIL_SIZE = 128


def thumbnail_path(thumbnails_dir: str, content_hash: str) -> str:
    """``<dir>/<h[:2]>/<h>.jpg`` with h a filename-safe digest of the content hash."""
    h = hashlib.sha256(content_hash.encode()).hexdigest()[:40]
    return os.path.join(thumbnails_dir, h[:2], f"{h}.jpg")


def write_thumbnail(img: Image.Image, path: str, size: int = THUMBNAIL_SIZE) -> None:
    """Write ``img`` shrunk to fit ``size`` x ``size`` (never enlarged) as JPEG, unless present."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    thumb = img.convert("RGB") if img.mode != "RGB" else img.copy()
    thumb.thumbnail((size, size))
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    thumb.save(tmp, format="JPEG", quality=85)
    os.replace(tmp, path)
