"""Corpus sources: image files on any Beam filesystem, decoded with a dead letter.

``DecodeImageFn`` turns a matched file into ``(item, pixels)``: the item carries
id (path relative to the corpus root), uri, kind, original width and height and a
content hash of the bytes; pixels are the model input. A file that cannot be read or
decoded goes to the ``dead`` output with (uri, stage, reason) and the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from lookalike.model.data import IMAGE_SUFFIXES
from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec, image_to_array, open_image

log = logging.getLogger(__name__)

DEAD = "dead"


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


class DecodeImageFn(beam.DoFn):
    """FileMetadata -> (item dict, [H, W, C] float32); failures to the ``dead`` output."""

    def __init__(self, spec: PreprocessSpec, root: str):
        self._spec = spec
        self._root = root
        self._decoded = Metrics.counter("lookalike", "images_decoded")
        self._failed = Metrics.counter("lookalike", "images_failed")

    def process(self, metadata: Any):
        uri = metadata.path
        try:
            with FileSystems.open(uri) as f:
                data = f.read()
        except Exception as e:  # unreadable path, permissions, vanished file
            self._failed.inc()
            log.warning("dead letter %s (read): %s", uri, e)
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(uri, "read", f"{type(e).__name__}: {e}"))
            return
        try:
            img = open_image(data, self._spec.max_pixels)
            width, height = img.size
            pixels = image_to_array(img, self._spec)
        except ImageDecodeError as e:
            self._failed.inc()
            log.warning("dead letter %s (decode): %s", uri, e)
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(uri, "decode", str(e)))
            return
        self._decoded.inc()
        item = {
            "id": item_id_for(uri, self._root),
            "uri": uri,
            "kind": "image",
            "timestamp_s": None,
            "width": width,
            "height": height,
            "content_hash": hashlib.sha256(data).hexdigest(),
        }
        yield item, pixels
