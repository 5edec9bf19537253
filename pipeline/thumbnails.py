"""Small JPEG thumbnails per item, stored by content hash so runs share them.

Creating a file costs a disk round trip that dwarfs encoding a small JPEG, so the decode
stage hands thumbnails to a ``ThumbnailWriter``: a few threads write them while decoding
goes on. A source file that already is a small RGB JPEG without EXIF is its own
thumbnail, at once on the decode thread: a hard link to it (``link_or_copy``), a new
directory entry and no new inode: 17-22 us of CPU on the development VM's ext4 disk, where
creating a file costs 180-330 us (a copy doubled the embed time of a small-JPEG corpus),
and no second copy of the bytes on disk. A link survives the source being renamed or
deleted, but shares its inode: a source edited in place (``cp other.jpg a.jpg``) changes
the linked thumbnail too. Its bytes are then no longer those of the content hash they are
stored under, which the server checks before serving a linked thumbnail
(``lookalike.serving.thumbnails``): it answers that the picture is gone rather than show
the new one. Where linking is impossible (another filesystem, a remote file) the bytes
are copied (``write_copy``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from lookalike.model.preprocess import pixels_to_image, to_mode
from lookalike.pipeline.writers import write_atomically

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 128
# A thumbnail made (linked, written or its source changed: its inode's change time) this recently
# may be a running embed's (``embed --no-publish`` takes no store lock): never pruned.
PRUNE_GRACE_S = 3600.0
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


def sources_missing_thumbnails(source_hashes: Sequence[str], content_hashes: Sequence[str],
                               thumbnails_dir: str) -> set[str]:
    """Of cached rows (``source_hashes[i]`` yielded content ``content_hashes[i]``), the source
    hashes with a content whose thumbnail is not under ``thumbnails_dir`` (deleted or moved):
    reusing their embeddings would publish items without pictures. The thumbnails present are
    listed folder by folder (no stat per thumbnail)."""
    present: set[str] = set()
    try:
        folders = [entry for entry in os.scandir(thumbnails_dir) if entry.is_dir()]
    except OSError:  # no thumbnails at all
        folders = []
    for folder in folders:
        try:
            present.update(f"{folder.name}/{name}" for name in os.listdir(folder.path))
        except OSError:
            pass
    wanted = thumbnail_paths("", list(content_hashes))
    return {s for s, path in zip(source_hashes, wanted) if path not in present}


def stale_linked_thumbnails(files: Sequence[Any], thumbnails_dir: str) -> list[str]:
    """The thumbnails under ``thumbnails_dir`` that are hard links to one of ``files`` (listed
    with their inode: ``reuse.ListedFile``; files the run sees changed) and whose bytes no
    longer hash to their content address: the file was edited in place, so the thumbnail shows
    its new picture under its old bytes' address, which byte-identical copies still use. A
    link to a file only touched, moved or linked again is intact and kept. One directory scan
    (inodes come with it); the device and bytes are checked only for a thumbnail whose inode
    matches."""
    by_inode = {inode: m.path for m in files if (inode := getattr(m, "inode", None))}
    if not by_inode:
        return []
    stale = []
    for folder, entry in _thumbnail_entries(thumbnails_dir):
        path = by_inode.get(entry.inode())
        with contextlib.suppress(OSError):
            if path is not None and os.path.samefile(entry.path, path):
                if entry.stat().st_size > COPY_MAX_BYTES:  # only files this small are linked: it grew, so it changed
                    stale.append(entry.path)
                    continue
                with open(entry.path, "rb") as f:
                    content_hash = hashlib.sha256(f.read(COPY_MAX_BYTES + 1)).hexdigest()
                if thumbnail_paths("", [content_hash])[0] != f"{folder.name}/{entry.name}":
                    stale.append(entry.path)
    return stale


def _thumbnail_folders(thumbnails_dir: str | os.PathLike) -> list[os.DirEntry]:
    """The ``<dir>/<xx>`` folder entries (none without ``thumbnails_dir``)."""
    try:
        return [entry for entry in os.scandir(thumbnails_dir) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _thumbnail_entries(thumbnails_dir: str | os.PathLike,
                       folders: list[os.DirEntry] | None = None) -> Iterator[tuple[os.DirEntry, os.DirEntry]]:
    """(folder, file) entries of every thumbnail ``<dir>/<xx>/<name>``, folder by folder (of
    ``folders`` if given); a folder that cannot be listed is skipped."""
    for folder in _thumbnail_folders(thumbnails_dir) if folders is None else folders:
        try:
            entries = list(os.scandir(folder.path))
        except OSError:
            continue
        for entry in entries:
            yield folder, entry


def reusable_jpeg(img: Image.Image | np.ndarray, data: bytes | None, size: int = THUMBNAIL_SIZE) -> bool:
    """True when ``data`` (the bytes ``img`` was decoded from: a PIL image, or [H, W, C] uint8
    pixels) can serve as the thumbnail unchanged: a JPEG of at most ``size`` pixels a side and
    COPY_MAX_BYTES, RGB, with no EXIF (so no orientation to apply)."""
    if data is None or data[:3] != b"\xff\xd8\xff" or len(data) > COPY_MAX_BYTES:
        return False
    if isinstance(img, np.ndarray):
        return img.ndim == 3 and img.shape[2] == 3 and max(img.shape[:2]) <= size and b"Exif\x00\x00" not in data
    return img.mode == "RGB" and max(img.size) <= size and "exif" not in img.info


def link_or_copy(original: tuple[str, bytes], path: str) -> None:
    """Make ``path`` a hard link to the file ``original`` = (uri, bytes), or a copy of the
    bytes where a link is impossible (not local, another filesystem); nothing if ``path``
    is there with those bytes' size (a link to a source edited in place since is relinked)."""
    uri, data = original
    if "://" not in uri:
        try:
            os.link(uri, path)
            return
        except FileExistsError:
            if _holds(path, uri, data):
                return
            with contextlib.suppress(OSError):  # relink atomically: a new name, renamed over the stale one
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                os.link(uri, tmp)
                os.replace(tmp, path)
                return
        except OSError:  # another filesystem, no link permission: copy the bytes instead
            pass
    write_copy(data, path)


def _holds(path: str, uri: str, data: bytes) -> bool:
    """Whether the thumbnail at ``path`` has the bytes ``data`` of ``uri``: it is ``uri``'s
    file (the usual rerun), or a file of the same bytes."""
    found = os.stat(path)
    if found.st_size != len(data):
        return False
    with contextlib.suppress(OSError):
        if os.path.samestat(found, os.stat(uri)):
            return True
    with open(path, "rb") as f:
        return f.read(len(data) + 1) == data


def write_copy(data: bytes, path: str) -> None:
    """Write ``data`` (a reusable JPEG's bytes) as ``path``, the store's own file, unless it is
    there. Created in place (``O_EXCL``: one new file), removed again if writing fails; a
    file left short by a killed process has the wrong size and is rewritten the next time,
    atomically (a temporary file renamed over it). Two writers of one thumbnail write the
    same bytes: the first one's file stays."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        if os.stat(path).st_size == len(data):
            return
        write_atomically(path, lambda tmp: _write_all(tmp, data))
        return
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _write_all(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_thumbnail(img: Image.Image | np.ndarray, path: str, original: tuple[str, bytes] | None = None,
                    size: int = THUMBNAIL_SIZE, make_dirs: bool = True) -> None:
    """Write ``img`` (a PIL image or [H, W, 1 or 3] uint8 pixels) shrunk to fit ``size`` x
    ``size`` (never enlarged) as JPEG, unless present.
    ``original`` (uri, bytes) is the image file ``img`` was decoded from: when
    ``reusable_jpeg`` allows, the thumbnail is a hard link to it (``link_or_copy``).
    ``make_dirs=False``: the caller made the folder."""
    if make_dirs:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if original is not None and reusable_jpeg(img, original[1], size):
        link_or_copy(original, path)
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
        raises what writing it raised. A reusable JPEG is linked at once, and a present
        thumbnail skipped (cheaper than a thread hand-off)."""
        directory = os.path.dirname(path)
        if directory not in self._dirs:  # one mkdir per folder, not per thumbnail
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(directory)
        if original is not None and reusable_jpeg(img, original[1]):
            try:  # a hard link: cheaper than a thread hand-off
                link_or_copy(original, path)
            except OSError as e:
                future: Future = Future()
                future.set_exception(e)
                return future
            return _DONE
        if os.path.exists(path):  # present: a stat, cheaper than a thread hand-off
            return _DONE
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


def prune_thumbnails(thumbnails_dir: str | os.PathLike, referenced: set[str]) -> int:
    """Delete the thumbnails ``<dir>/<xx>/<name>`` whose ``<xx>/<name>`` (a content address, the
    same wherever the store is) is not in ``referenced`` and whose inode changed more than
    PRUNE_GRACE_S ago, and the folders that leaves empty; returns how many were deleted.
    Deleting a hard-linked thumbnail leaves its source alone. A file that cannot be read or
    deleted stays."""
    removed = 0
    now = time.time()
    folders = _thumbnail_folders(thumbnails_dir)
    for folder, entry in _thumbnail_entries(thumbnails_dir, folders):
        try:
            if (f"{folder.name}/{entry.name}" in referenced
                    or now - entry.stat(follow_symlinks=False).st_ctime < PRUNE_GRACE_S):
                continue
            os.unlink(entry.path)
            removed += 1
        except OSError:
            continue
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder.path)  # only when empty
    return removed
