"""Corpus sources: files on any Beam filesystem -> items with pixels, or dead letters.

Two steps, so that unchanged and duplicate files cost a read and a hash only:

* ``ReadSourceFn``: read a matched file, hash its bytes (sha256). With an embedding
  cache (``--incremental``), a known hash goes on as ``cached`` (uri, hash), to be
  answered from the cache (``lookalike.pipeline.reuse``), and a hash whose bytes failed to
  decode in an earlier run becomes its dead letter again (not decoded);
  otherwise ``(hash, uri)`` goes on (``new``). Unreadable files and files that are
  neither images nor videos become dead letters (uri, stage, reason).
* ``decode_source``: decode an image, or sample a video's frames, into model input,
  and write a small JPEG thumbnail per item (see ``batches.DecodeBatchFn``).

Outputs are ``(tag, value)`` pairs (see ``batches.split_tagged``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import unquote

import numpy as np

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from lookalike.model.data import IMAGE_SUFFIXES
from lookalike.model.parallel import PARALLEL_MIN_BYTES
from lookalike.model.preprocess import (
    PreprocessSpec,
    decode_plain_jpeg,
    decode_side_px,
    image_to_pixels,
    open_image,
    original_size,
    pixels_to_array,
)
from lookalike.model.progress import Progress
from lookalike.pipeline.cache import cached_hashes, load_failed, load_file_index
from lookalike.pipeline.thumbnails import ThumbnailSink, thumbnail_path, write_thumbnail
from lookalike.pipeline.video import FrameSampling, is_video_path, reusable_source_hashes, sample_frames, video_source_hash
from lookalike.pipeline.worker_main import worker_label

log = logging.getLogger(__name__)

DEAD = "dead"
CACHED = "cached"
NOT_MEDIA_REASON = "not an image or video file (unsupported suffix)"
# A folder named in a list file (a corpus folder's walk never yields one).
LISTED_FOLDER_REASON = "a folder, not a file: a list file names files (embed a folder with --corpus FOLDER)"


HASH_CHUNK_BYTES = 256 * 1024  # ``hash_file`` reads a large file this much at a time

GLOB_CHARS = "*?["  # a corpus naming no existing folder and holding one of these is a pattern


def is_local_folder(corpus: str) -> bool:
    """An existing local folder: always taken literally, whatever characters its name holds."""
    return "://" not in corpus and os.path.isdir(corpus)


def escape_glob(path: str) -> str:
    """``path`` as a Beam match pattern matching only itself (``[`` -> ``[[]``, ``*`` -> ``[*]``,
    ``?`` -> ``[?]``): Beam's patterns have no other way to quote a wildcard."""
    return re.sub(r"[*?\[]", lambda m: f"[{m.group(0)}]", path)


def literal_folder(pattern: str) -> str | None:
    """The folder of a pattern ``corpus_pattern`` made from a folder (``<escaped folder>/**``),
    unescaped, or None for any other pattern."""
    if not pattern.endswith("/**") or not _ESCAPED.fullmatch(pattern[:-3]):
        return None
    return re.sub(r"\[([*?\[])\]", r"\1", pattern[:-3])


_ESCAPED = re.compile(r"(?:[^*?\[]|\[[*?\[]\])*")  # literal characters and escaped wildcards only


def corpus_pattern(corpus: str) -> str:
    """A folder becomes a recursive glob (an existing local folder is escaped, so ``photos [2024]``
    or ``what?`` match themselves); a pattern is kept as given."""
    if is_local_folder(corpus):
        return escape_glob(corpus.rstrip("/")) + "/**"
    if any(ch in corpus for ch in GLOB_CHARS):
        return corpus
    return corpus.rstrip("/") + "/**"


def absolute_pattern(pattern: str) -> str:
    """A relative local glob made absolute against the current folder, as a relative folder is
    (item uris must not depend on where the run started: they are later read against the store
    root): its literal folder before the first wildcard is normalised (``./``, ``../``), the
    rest kept. A remote pattern (any ``scheme://``) and an absolute one are kept as given."""
    if "://" in pattern:
        return pattern
    pattern = os.path.expanduser(pattern)
    if os.path.isabs(pattern):
        return pattern
    cut = min((pattern.find(ch) for ch in GLOB_CHARS if ch in pattern), default=len(pattern))
    head, _, rest = pattern[:cut].rpartition("/")  # head: the literal folder; rest: the wildcard part's start
    return os.path.join(os.path.abspath(head or "."), rest + pattern[cut:])


def corpus_root(corpus: str) -> str:
    """The folder ids are made relative to: an existing local folder or a plain path as given,
    else the part of a pattern before any wildcard."""
    if is_local_folder(corpus):
        return corpus.rstrip("/")
    cut = min((corpus.find(ch) for ch in GLOB_CHARS if ch in corpus), default=None)
    return corpus.rstrip("/") if cut is None else corpus[:cut].rsplit("/", 1)[0]


def item_id_for(uri: str, root: str) -> str:
    """Path of ``uri`` relative to ``root`` with '/' separators."""
    root = root.rstrip("/") + "/"
    return uri[len(root):] if uri.startswith(root) else uri.rsplit("/", 1)[-1]


def is_image_path(path: str) -> bool:
    dot = path.rfind(".")
    return dot >= 0 and path[dot:].lower() in IMAGE_SUFFIXES


def dead_letter(uri: str, stage: str, reason: str) -> dict[str, str]:
    return {"uri": uri, "stage": stage, "reason": reason}


BAD_NAME_REASON = "file name is not valid UTF-8 (item ids are UTF-8 text): rename it to UTF-8, e.g. with convmv"


def utf8_name(uri: str) -> bool:
    """Whether ``uri`` is UTF-8 text. A local name of other bytes (Latin-1 from an old archive
    or share) reaches Python with lone surrogates in it (``os.fsdecode``), which Arrow,
    Parquet and JSON cannot hold: such a file is dead-lettered (``bad_name_letter``)."""
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def bad_name_letter(uri: str) -> dict[str, str]:
    """The dead letter of a file whose name is not UTF-8: its name shown with the bad bytes
    escaped (``bad\\xffname.jpg``)."""
    return dead_letter(os.fsencode(uri).decode("utf-8", "backslashreplace"), "list", BAD_NAME_REASON)


def known_failure_letter(uri: str, stage: str, reason: str) -> dict[str, str]:
    """The dead letter of a file whose bytes failed at ``stage`` in an earlier run (recorded in the cache)."""
    return dead_letter(uri, stage, f"{reason} (the same bytes failed in an earlier run)")


_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


class NotRegularFileError(OSError):
    """A listed path that is not a regular file (a named pipe, socket, device or folder, or a
    link to one): never opened, as opening a named pipe blocks until a writer comes."""


def file_kind(mode: int) -> str:
    """What a ``stat`` mode names, for messages: "named pipe", "socket", ... (``stat.S_IFMT``)."""
    return next((name for test, name in _KINDS if test(mode)), f"file type {stat.S_IFMT(mode):o}")


def unreadable_reason(path: str, error: OSError | Exception) -> str:
    """The dead-letter reason of a local path that cannot be stat'ed or read: the error, and for
    a symbolic link whose target is missing, that it is one and where it points (the message
    alone names the link, which ``ls`` shows as there)."""
    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, FileNotFoundError) and "://" not in path and os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            return reason
        return f"dangling symbolic link: its target {target!r} does not exist ({reason})"
    return reason


def not_regular_reason(mode: int) -> str:
    """The dead-letter reason of a path whose ``stat`` mode is not a regular file's."""
    return f"not a regular file ({file_kind(mode)})"


def check_regular_file(uri: str) -> os.stat_result:
    """``uri``'s stat (links followed) if it is a regular file, else OSError naming it:
    missing, or ``NotRegularFileError`` (a named pipe, socket, device, folder)."""
    found = os.stat(uri)  # a missing path or dangling link: its OSError names it
    if not stat.S_ISREG(found.st_mode):
        kind = file_kind(found.st_mode)
        if kind == "folder":  # as opening it would say
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), uri)
        raise NotRegularFileError(errno.EINVAL, not_regular_reason(found.st_mode), uri)
    return found


def read_bytes(uri: str) -> bytes:
    """The bytes of ``uri``. A local file is read with plain system calls, one read of its
    size (from the stat that checks it is a regular file) plus a byte: no Beam filesystem
    dispatch and no buffered file object (7.5 instead of 11.5 us for a small file). A read
    that gives fewer bytes than the file holds (Linux gives at most 2 GiB - 4 KiB per read,
    network filesystems may give less) or more (it grew since the stat) is continued to
    the end of the file, so a file is never cut short. OSError (naming the path) if
    unreadable; a path that is not a regular file (a named pipe would block the read
    forever) is never opened: ``NotRegularFileError`` (``check_regular_file``), and should
    one be swapped in between that check and the open, the non-blocking open cannot hang on
    it either."""
    if "://" in uri:
        with FileSystems.open(uri, compression_type="uncompressed") as f:
            return f.read()
    size = check_regular_file(uri).st_size
    fd = os.open(uri, os.O_RDONLY | os.O_NONBLOCK)  # no effect on a regular file's reads
    try:
        data = os.read(fd, size + 1)
        if len(data) == size:  # all of it: one byte more was asked for
            return data
        parts = [data]  # a short read, or the file changed since the stat: read to the end
        while parts[-1]:
            parts.append(os.read(fd, 1 << 20))
        return b"".join(parts)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, uri) from None
    finally:
        os.close(fd)


def open_source(uri: str) -> BinaryIO:
    """``uri`` opened for reading, seekable: a local regular file (checked as ``read_bytes``
    checks it, and opened non-blocking, so a named pipe swapped in cannot hang it), else
    through Beam's filesystems. For reading a large file piece by piece (``hash_file``, a
    video's frames) rather than whole."""
    if "://" in uri:
        return FileSystems.open(uri, compression_type="uncompressed")
    check_regular_file(uri)
    return os.fdopen(os.open(uri, os.O_RDONLY | os.O_NONBLOCK), "rb")


def hash_file(uri: str, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """The sha256 (hex) of ``uri``'s bytes, read ``chunk_bytes`` at a time: memory stays
    small whatever the file's size (an hour of video is gigabytes). OSError naming ``uri``
    if unreadable, as ``read_bytes``."""
    digest = hashlib.sha256()
    try:
        with open_source(uri) as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, uri) from None
    return digest.hexdigest()


NEW = "new"
FILE = "file"
# Files up to this size travel with the element to the decode stage; larger ones are read again
# there (images) or read piece by piece (videos), and are hashed piece by piece (``hash_file``).
CARRY_BYTES_MAX = 256 * 1024


class ReadSourceFn(beam.DoFn):
    """FileMetadata -> ("new", (source hash, uri, bytes if small else None)) | ("cached", (uri, source hash))
    | ("dead", letter),
    plus ("file", {uri, size, mtime_s, source_hash, inode}) for the file index."""

    def __init__(self, cache_dir: str | None, total_files: int, sampling: FrameSampling = FrameSampling(),
                 redo_sources: frozenset[str] = frozenset(), leave_out: str | None = None):
        """``total_files``: the run's files to read, or 0 when several workers share them (see
        ``graph.EmbedRun.progress_total``). ``redo_sources``: cached source hashes decoded and
        embedded again all the same (their thumbnails are missing: ``EmbedRun.redo_sources``).
        ``leave_out``: a folder whose matched files are skipped (the store, inside the corpus)."""
        self._leave_out = leave_out + os.sep if leave_out else None
        self._cache_dir = cache_dir
        self._redo = redo_sources
        self._total = total_files
        self._sampling = sampling  # part of a video's source hash
        self._read = Metrics.counter("lookalike", "files_read")
        self._reused = Metrics.counter("lookalike", "files_unchanged")
        self._failed = Metrics.counter("lookalike", "files_failed")
        self._deferred = None  # a list of counter updates while a background thread reads (listing.ReadChunkFn)

    def _inc(self, counter: Any, n: int = 1) -> None:
        if self._deferred is not None:  # Beam counts on the bundle's thread
            self._deferred.append((counter, n))
        else:
            counter.inc(n)

    def setup(self) -> None:
        usable = bool(self._cache_dir and os.path.isdir(self._cache_dir))
        self._cache = reusable_source_hashes(cached_hashes(self._cache_dir), self._sampling) - self._redo if usable else set()
        self._files = load_file_index(self._cache_dir) if usable else {}
        self._undecodable = load_failed(self._cache_dir) if usable else {}
        self._progress = Progress("read" if self._total else f"read ({worker_label()})", total=self._total or None,
                                  unit="files", logger=log)  # no total: this worker's share of a multi-worker run
        self._count = 0

    def advance(self, files: int) -> None:
        """Count ``files`` more as read (progress)."""
        self._count += files
        self._progress.update(self._count)

    def process(self, metadata: Any):
        """A matched file: with a known mtime, a local file's inode is looked up too (Beam's
        match gives none), so that one the file index knows unchanged is not read again, and
        the file index records it for the next run."""
        path, mtime = metadata.path, float(getattr(metadata, "last_updated_in_seconds", 0) or 0)
        if self._leave_out is not None and os.path.normpath(path).startswith(self._leave_out):
            return
        self.advance(1)
        inode = getattr(metadata, "inode", None)
        if inode is None and mtime and "://" not in path:  # recorded in the file index too
            try:
                inode = os.stat(path).st_ino
            except OSError:  # gone or unreadable: read_one says why
                pass
        yield from self.read_one(path, int(metadata.size_in_bytes or 0), mtime, inode=inode)

    def read_one(self, uri: str, size: int, mtime: float, carry: bool = True, inode: int | None = None):
        """One file's outputs (see the class); ``carry=False``: never pass its bytes on.
        ``inode``: as listed (``reuse.ListedFile``), None if unknown."""
        if not utf8_name(uri):
            self._inc(self._failed)
            yield DEAD, bad_name_letter(uri)
            return
        if not (is_image_path(uri) or is_video_path(uri)):
            self._inc(self._failed)
            yield DEAD, dead_letter(uri, "filter", LISTED_FOLDER_REASON if "://" not in uri and os.path.isdir(uri)
                                    else NOT_MEDIA_REASON)
            return
        known = self._files.get(uri)
        data = None
        if (known and mtime and known[:2] == (size, mtime) and known[3] == inode
                and (known[2] in self._cache or known[2] in self._undecodable)):
            source_hash = known[2]  # unchanged path, size, mtime and inode: not even read
        else:
            try:  # bytes that will not travel on are hashed piece by piece, never held whole
                if size > CARRY_BYTES_MAX:
                    source_hash = hash_file(uri)
                else:
                    data = read_bytes(uri)
                    source_hash = hashlib.sha256(data).hexdigest()
            except Exception as e:  # unreadable path, permissions, vanished file
                self._inc(self._failed)
                # a named pipe: the same reason as the corpus walk gives it (reuse.UnreadableFile)
                reason = e.strerror if isinstance(e, NotRegularFileError) else unreadable_reason(uri, e)
                yield DEAD, dead_letter(uri, "read", reason)
                return
            self._inc(self._read)
            if is_video_path(uri):
                source_hash = video_source_hash(source_hash, self._sampling)
        if mtime:  # a known modification time (an empty file has size 0)
            yield FILE, {"uri": uri, "size": size, "mtime_s": mtime, "source_hash": source_hash, "inode": inode}
        if source_hash in self._undecodable or source_hash in self._cache:
            yield from self.known_outputs(uri, source_hash)
        else:
            yield NEW, (source_hash, uri, data if carry and data is not None and len(data) <= CARRY_BYTES_MAX else None)

    def known_outputs(self, uri: str, source_hash: str) -> list[tuple[str, Any]]:
        """The output of a file whose bytes are known: ("cached", (uri, source hash)) if they
        have an embedding, else their dead letter again (they failed to decode in an earlier
        run). An embedding wins over a failure record of the same bytes (one left by a failure
        later decoded without --incremental), as in ``reuse.plan_reuse``: every path of those
        bytes is then an item."""
        if source_hash in self._cache:
            self._inc(self._reused)
            return [(CACHED, (uri, source_hash))]
        self._inc(self._failed)
        return [(DEAD, known_failure_letter(uri, *self._undecodable[source_hash]))]


def decode_source(
    source_hash: str, uris: list[str], spec: PreprocessSpec, thumbnails_dir: str, sampling: FrameSampling,
    data: bytes | None = None, thumbnail: ThumbnailSink = write_thumbnail,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Decode one source's bytes (``data``, else read from ``uris[0]``: a video's piece by piece,
    ``video_frames``) into (item meta,
    [H, W, C] model input) per image or sampled frame, handing each item's picture (a PIL image,
    or uint8 pixels for a plain JPEG) to ``thumbnail(picture, path, (uri, bytes) of the image
    file or None for a frame)``. Model input is uint8 pixels of the model's shape
    (``batches.stack_model_input`` converts a batch of them as ``model.preprocess.image_to_array``
    and ``pixels_to_array`` convert one), or float32 in [0, 1] for a plain JPEG of another
    size (``pixels_to_array``). Raises ImageDecodeError, VideoDecodeError or
    OSError with the reason."""
    if is_video_path(uris[0]):
        frames = video_frames(source_hash, uris[0], data, sampling, spec.max_pixels)
        original, pixels = None, None
    else:
        data = read_bytes(uris[0]) if data is None else data
        side = decode_side_px(spec)  # a large image is decoded shrunk, as the server decodes queries
        pixels = decode_plain_jpeg(data, spec.channels, spec.max_pixels, side)  # the fast path, same pixels
        if pixels is not None:  # no PIL image unless a thumbnail has to be re-encoded
            height, width = pixels.shape[:2]
            thumbnail(pixels, thumbnail_path(thumbnails_dir, source_hash), (uris[0], data))
            meta = {"source_hash": source_hash, "content_hash": source_hash, "kind": "image", "timestamp_s": None,
                    "width": width, "height": height, "uris": uris}
            # Pixels of exactly the model's shape stay uint8: the batch is converted at once (DecodeBatchFn).
            yield meta, (pixels if pixels.shape == spec.shape else pixels_to_array(pixels, spec))
            return
        frames = iter([(source_hash, "image", None, open_image(data, spec.max_pixels, side))])
        original = (uris[0], data)
    try:
        for content_hash, kind, t, img in frames:
            # first: a picture the model cannot take (float values out of range) queues no thumbnail;
            # uint8 until its batch is converted (stack_model_input), as a long video's frames wait for each other
            array = image_to_pixels(img, spec)
            thumbnail(img, thumbnail_path(thumbnails_dir, content_hash), original)
            width, height = original_size(img)  # the file's size, not the shrunk picture's
            meta = {"source_hash": source_hash, "content_hash": content_hash, "kind": kind, "timestamp_s": t,
                    "width": width, "height": height, "uris": uris}
            yield meta, array
    finally:  # a video's file is closed now, not when a failure's traceback is collected
        close = getattr(frames, "close", None)
        if close is not None:
            close()


def video_frames(source_hash: str, uri: str, data: bytes | None, sampling: FrameSampling,
                 max_pixels: int) -> Iterator[tuple[str, str, float, Any]]:
    """(frame id, "frame", timestamp_s, upright RGB frame) per sampled frame of the video at
    ``uri``: decoded from ``data`` if carried, else read from the file piece by piece as it
    decodes (``open_source``), never whole (an hour of video is gigabytes)."""
    with contextlib.nullcontext(data) if data is not None else open_source(uri) as source:
        for t, frame in sample_frames(source, sampling, uri, max_pixels):
            yield f"{source_hash}#t={t:.3f}", "frame", t, frame


def worth_a_thread(data: bytes | None, uri: str) -> bool:
    """Whether decoding the source at ``uri`` costs more than a thread hand-off
    (``lookalike.model.parallel``): a file whose bytes were not carried (``data`` None: large,
    read again where decoded), one of at least PARALLEL_MIN_BYTES, or a video."""
    return data is None or len(data) >= PARALLEL_MIN_BYTES or is_video_path(uri)


_COMMENT = re.compile(r"(?:^|\s)#")  # a '#' at the start of a line or after whitespace starts a comment


def read_list_file(path: str) -> list[str]:
    """Paths listed one per line (blank lines ignored, a path listed twice kept once); ``#``
    starts a comment at the start of a line or after whitespace (``a.jpg  # five``), while a
    ``#`` inside a name (``clip#2.jpg``) is part of it; a path holding `` #`` is written as a
    ``file://`` URL (``%20%23``). A UTF-8 byte order mark is skipped. Relative paths are taken
    relative to the list file's folder, ``file://`` URLs are local paths, and local paths are
    normalised (``a/../b`` is ``b``)."""
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = f.read()
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:  # a binary file, or names in Latin-1: which line, and why
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"list file {path} is not UTF-8 text: line {line} has a byte it cannot decode "
                         f"({data[e.start:e.start + 1]!r}, {e.reason}); write one UTF-8 path per line") from None
    paths: dict[str, None] = {}
    for number, line in enumerate(lines, 1):
        entry = _COMMENT.split(line, 1)[0].strip()
        if not entry:
            continue
        if entry[:7].lower() == "file://":
            entry = local_path_of_file_url(entry, f"list file {path} line {number}")
        if "://" not in entry:
            entry = os.path.normpath(entry if entry.startswith("/") else f"{base}/{entry}")
        paths.setdefault(entry, None)
    return list(paths)


def local_path_of_file_url(url: str, where: str) -> str:
    """The local path of a ``file:`` URL (RFC 8089): ``file:///a%20b.jpg`` and
    ``file://localhost/a%20b.jpg`` are ``/a b.jpg``, the scheme in any case. ValueError naming
    ``where`` for a URL of another host (not a file here)."""
    rest = url[len("file://"):]
    if rest[:10].lower() == "localhost/":
        rest = rest[len("localhost"):]
    if not rest.startswith("/"):
        host = rest.split("/", 1)[0]
        raise ValueError(f"{where}: {url!r} names a file on host {host!r}, not on this machine "
                         f"(write file:///path or file://localhost/path)")
    return unquote(rest)


def common_folder(paths: list[str]) -> str:
    """The deepest folder holding every path (of any filesystem: compared by '/' parts); item
    ids are paths relative to it, so files listed from different folders never share an id."""
    parts = [p.split("/")[:-1] for p in paths]
    if not parts:
        return ""
    common = parts[0]
    for other in parts[1:]:
        n = 0
        while n < min(len(common), len(other)) and common[n] == other[n]:
            n += 1
        common = common[:n]
    return "/".join(common) or "/"
