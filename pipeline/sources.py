"""Corpus sources: files on any Beam filesystem -> items with pixels, or dead letters.

Two steps, so that unchanged and duplicate files cost a read and a hash only:

* ``ReadSourceFn``: read a matched file, hash its bytes (sha256). With an embedding
  cache (``--incremental``), a known hash is answered from the cache (``cached``
  output); otherwise ``(hash, uri)`` goes on. Unreadable files and files that are
  neither images nor videos go to the ``dead`` output with (uri, stage, reason).
* ``DecodeSourceFn``: after grouping by hash (byte-identical files are decoded and
  embedded once and listed under every path), decode an image, or sample a video's
  frames, into model input, and write a small JPEG thumbnail per item.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from lookalike.model.data import IMAGE_SUFFIXES
from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec, image_to_array, open_image
from lookalike.model.progress import Progress
from lookalike.pipeline.cache import load_cache
from lookalike.pipeline.thumbnails import thumbnail_path, write_thumbnail
from lookalike.pipeline.video import FrameSampling, VideoDecodeError, frame_id, is_video_path, sample_frames

log = logging.getLogger(__name__)

DEAD = "dead"
CACHED = "cached"


def corpus_pattern(corpus: str) -> str:
    """A folder becomes a recursive glob; a pattern is kept as given."""
    if any(ch in corpus for ch in "*?["):
        return corpus
    return corpus.rstrip("/") + "/**"


def corpus_root(corpus: str) -> str:
    """The folder ids are made relative to (the part of a pattern before any wildcard)."""
    cut = min((corpus.find(ch) for ch in "*?[" if ch in corpus), default=None)
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


def read_bytes(uri: str) -> bytes:
    with FileSystems.open(uri, compression_type="uncompressed") as f:
        return f.read()


class ReadSourceFn(beam.DoFn):
    """FileMetadata -> (source hash, uri) | cached (uri, row) | dead letter."""

    def __init__(self, cache_dir: str | None, total_files: int):
        self._cache_dir = cache_dir
        self._total = total_files
        self._read = Metrics.counter("lookalike", "files_read")
        self._reused = Metrics.counter("lookalike", "files_unchanged")
        self._failed = Metrics.counter("lookalike", "files_failed")

    def setup(self) -> None:
        self._cache = load_cache(self._cache_dir) if self._cache_dir and os.path.isdir(self._cache_dir) else {}
        self._progress = Progress("read", total=self._total or None, unit="files", logger=log)
        self._count = 0

    def process(self, metadata: Any):
        uri = metadata.path
        self._count += 1
        self._progress.update(self._count)
        if not (is_image_path(uri) or is_video_path(uri)):
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(uri, "filter", "not an image or video file (unsupported suffix)"))
            return
        try:
            data = read_bytes(uri)
        except Exception as e:  # unreadable path, permissions, vanished file
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(uri, "read", f"{type(e).__name__}: {e}"))
            return
        self._read.inc()
        source_hash = hashlib.sha256(data).hexdigest()
        cached = self._cache.get(source_hash)
        if cached:
            self._reused.inc()
            for row in cached:
                yield beam.pvalue.TaggedOutput(CACHED, (uri, row))
        else:
            yield source_hash, uri


class DecodeSourceFn(beam.DoFn):
    """(source hash, [uri, ...]) -> (item meta, [H, W, C] float32) per image or sampled frame."""

    def __init__(self, spec: PreprocessSpec, thumbnails_dir: str, sampling: FrameSampling):
        self._spec = spec
        self._thumbs = thumbnails_dir
        self._sampling = sampling
        self._decoded = Metrics.counter("lookalike", "items_decoded")
        self._failed = Metrics.counter("lookalike", "files_failed")
        self._duplicates = Metrics.counter("lookalike", "duplicate_files")

    def _item(self, source_hash: str, content_hash: str, kind: str, t: float | None, img, uris: list[str]):
        write_thumbnail(img, thumbnail_path(self._thumbs, content_hash))
        pixels = image_to_array(img, self._spec)
        self._decoded.inc()
        meta = {"source_hash": source_hash, "content_hash": content_hash, "kind": kind, "timestamp_s": t,
                "width": img.size[0], "height": img.size[1], "uris": uris}
        return meta, pixels

    def process(self, keyed: tuple[str, Any]):
        source_hash, uris = keyed
        uris = sorted(set(uris))
        self._duplicates.inc(len(uris) - 1)
        first = uris[0]
        try:
            data = read_bytes(first)
            if is_video_path(first):
                for t, frame in sample_frames(data, self._sampling):
                    yield self._item(source_hash, f"{source_hash}#t={t:.3f}", "frame", t, frame, uris)
            else:
                yield self._item(source_hash, source_hash, "image", None, open_image(data, self._spec.max_pixels), uris)
        except (ImageDecodeError, VideoDecodeError, OSError) as e:
            self._failed.inc(len(uris))
            for uri in uris:
                log.warning("dead letter %s (decode): %s", uri, e)
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(uri, "decode", str(e)))


def expand_to_items(uri_or_uris: str | list[str], row: dict[str, Any], root: str, thumbnails_dir: str, model_version: str):
    """One cache row (image or frame) -> one output record per path holding those bytes."""
    uris = [uri_or_uris] if isinstance(uri_or_uris, str) else uri_or_uris
    for uri in uris:
        base_id = item_id_for(uri, root)
        frame = row["kind"] == "frame"
        yield {
            "id": frame_id(base_id, row["timestamp_s"]) if frame else base_id,
            "uri": uri,
            "kind": row["kind"],
            "timestamp_s": row["timestamp_s"],
            "width": row["width"],
            "height": row["height"],
            "content_hash": row["content_hash"],
            "group": base_id if frame else None,
            "thumbnail": thumbnail_path(thumbnails_dir, row["content_hash"]),
            "model_version": model_version,
            "embedding": row["embedding"],
        }
