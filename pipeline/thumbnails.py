"""Small JPEG thumbnails per item, stored by content hash so runs share them.

Creating a file costs a disk round trip that dwarfs encoding a small JPEG, so the decode
stage hands thumbnails to a ``ThumbnailWriter``: a few threads write them while decoding
goes on. A source file that already is a small RGB JPEG without EXIF is its own
thumbnail: its bytes (already in memory) are written unchanged instead of re-encoded.
They are written as the store's own file, never hard-linked to the source: a link would
share the source's inode, so editing the file in place (``cp other.jpg a.jpg``) would
change the thumbnail stored for its old content, in every index version that shows it.
A thumbnail is complete or absent: written under a temporary name in its folder, then
linked as its path (an existing one is never replaced, except one an earlier version
hard-linked to its source: it is replaced by a copy the next time the file is read). That
costs 50-330 us of CPU per new thumbnail on the development VM's ext4 disk, nearly all of
it creating the inode (a hard link cost 13-20 us), on the writer's threads, off the decode
thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from lookalike.model.preprocess import pixels_to_image, to_mode
from lookalike.pipeline.writers import write_atomically

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 128
# Source JPEGs up to this many bytes, within THUMBNAIL_SIZE and without EXIF, are copied as is.
COPY_MAX_BYTES = 32 * 1024

# Where a decoded item's picture goes: (image, thumbnail path, (source uri, its bytes) for an image file).
ThumbnailSink = Callable[["Image.Image | np.ndarray", str, "tuple[str, bytes] | None"], object]


def thumbnail_path(thumbnails_dir: str, content_hash: str) -> str:
    """``<dir>/<h[:2]>/<h>.jpg`` with h a filename-safe digest of the content hash."""
    return thumbnail_paths(thumbnails_dir, [content_hash])[0]


def thumbnail_paths(thumbnails_dir: str, content_hashes: list[str]) -> list[str]:
    """``thumbnail_path`` of each content hash, in one loop (about half the time per item of
    calling it once per hash)."""
    prefix = f"{thumbnails_dir.rstrip('/')}/" if thumbnails_dir else ""
    sha256 = hashlib.sha256
    return [f"{prefix}{h[:2]}/{h}.jpg" for h in (sha256(c.encode()).hexdigest()[:40] for c in content_hashes)]


def reusable_jpeg(img: Image.Image | np.ndarray, data: bytes | None, size: int = THUMBNAIL_SIZE) -> bool:
    """True when ``data`` (the bytes ``img`` was decoded from: a PIL image, or [H, W, C] uint8
    pixels) can serve as the thumbnail unchanged: a JPEG of at most ``size`` pixels a side and
    COPY_MAX_BYTES, RGB, with no EXIF (so no orientation to apply)."""
    if data is None or data[:3] != b"\xff\xd8\xff" or len(data) > COPY_MAX_BYTES:
        return False
    if isinstance(img, np.ndarray):
        return img.ndim == 3 and img.shape[2] == 3 and max(img.shape[:2]) <= size and b"Exif\x00\x00" not in data
    return img.mode == "RGB" and max(img.size) <= size and "exif" not in img.info


def write_copy(data: bytes, path: str) -> None:
    """Write ``data`` (a reusable JPEG's bytes) as ``path``, the store's own file, unless it
    exists. Written under a temporary name in ``path``'s folder and then hard-linked as
    ``path``, so a crash never leaves a truncated thumbnail that later runs would take as
    written, and a concurrent writer of the same thumbnail (same bytes) is never replaced.
    A present ``path`` with other links (earlier versions hard-linked the source file, which
    may since have been edited in place) is replaced by the copy, atomically."""
    try:
        if os.stat(path).st_nlink == 1:
            return
        linked = True
    except FileNotFoundError:
        linked = False
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    moved = False
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if linked:
            os.replace(tmp, path)
            moved = True
        else:
            with contextlib.suppress(FileExistsError):  # written meanwhile by another worker: the same bytes
                os.link(tmp, path)
    finally:
        if not moved:
            os.unlink(tmp)


def write_thumbnail(img: Image.Image | np.ndarray, path: str, original: tuple[str, bytes] | None = None,
                    size: int = THUMBNAIL_SIZE, make_dirs: bool = True) -> None:
    """Write ``img`` (a PIL image or [H, W, 1 or 3] uint8 pixels) shrunk to fit ``size`` x
    ``size`` (never enlarged) as JPEG, unless present.
    ``original`` (uri, bytes) is the image file ``img`` was decoded from: when
    ``reusable_jpeg`` allows, the thumbnail is a copy of its bytes (``write_copy``).
    ``make_dirs=False``: the caller made the folder."""
    if make_dirs:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if original is not None and reusable_jpeg(img, original[1], size):
        write_copy(original[1], path)
        return
    if os.path.exists(path):
        return
    if isinstance(img, np.ndarray):
        img = pixels_to_image(img)
    thumb = to_mode(img, 3)  # a copy: alpha on white, 16-bit scaled, palette and CMYK to RGB, as the model sees it
    thumb.thumbnail((size, size))
    write_atomically(path, lambda tmp: thumb.save(tmp, format="JPEG", quality=85))


_DONE: Future = Future()  # what ``submit`` returns for a thumbnail already present
_DONE.set_result(None)


class ThumbnailWriter:
    """Writes thumbnails on ``threads`` background threads; ``wait`` blocks until all submitted
    ones are written and raises the first error (an OSError naming the path)."""

    def __init__(self, threads: int = 8):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="thumbnails")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self._dirs: set[str] = set()

    def submit(self, img: Image.Image | np.ndarray, path: str, original: tuple[str, bytes] | None = None) -> Future:
        """Queue ``img`` (not modified afterwards by the caller) for ``path``; the future
        raises what writing it raised. A present thumbnail is skipped at once (a stat, cheaper
        than a thread hand-off)."""
        directory = os.path.dirname(path)
        if directory not in self._dirs:  # one mkdir per folder, not per thumbnail
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(directory)
        try:
            if os.stat(path).st_nlink == 1:  # present (one with other links: see ``write_copy``)
                return _DONE
        except FileNotFoundError:
            pass
        future = self._pool.submit(write_thumbnail, img, path, original, THUMBNAIL_SIZE, False)
        with self._lock:
            self._pending.append(future)
        return future

    def wait(self) -> int:
        """Block until every queued thumbnail is written; returns how many were waited for."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        return len(pending)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
