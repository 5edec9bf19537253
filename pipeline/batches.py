"""Grouping files into inference batches, and routing tagged elements.

Files are grouped by a bucket derived from their content hash (so byte-identical
files meet in the same bucket and are decoded and embedded once), then a bucket is
decoded into one stacked batch. Making batches with a GroupByKey, rather than Beam's
``BatchElements`` (which emits its last batch from ``finish_bundle``), and routing
outputs as ``(tag, value)`` pairs rather than tagged outputs, keeps the graph correct
on every runner, including Beam's Dask runner, which drops ``finish_bundle`` output
and merges tagged outputs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import Future
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec
from lookalike.model.progress import Progress
from lookalike.pipeline.cache import write_cache_table
from lookalike.pipeline.failpoints import failpoint
from lookalike.pipeline.items import expand_items, items_of_batch, rows_table, split_by_shard
from lookalike.pipeline.sources import DEAD, dead_letter, decode_source
from lookalike.pipeline.thumbnails import ThumbnailWriter
from lookalike.pipeline.video import FrameSampling, VideoDecodeError

log = logging.getLogger(__name__)

BATCH = "batch"


def bucket_of(source_hash: str, num_buckets: int) -> int:
    """Stable bucket of a hex content hash."""
    return int(source_hash[:12], 16) % max(1, num_buckets)


def split_tagged(pcoll: beam.PCollection, tags: tuple[str, ...], label: str) -> dict[str, beam.PCollection]:
    """``(tag, value)`` elements -> one PCollection of values per tag."""
    return {
        tag: pcoll | f"{label}_{tag}" >> beam.FlatMap(lambda element, t=tag: [element[1]] if element[0] == t else [])
        for tag in tags
    }


class DecodeBatchFn(beam.DoFn):
    """(bucket, [(source hash, uri, bytes or None), ...]) -> ("batch", (metas, [B, H, W, C])) and
    ("dead", letter). Bytes travel with the element only for small files and non-file sources.
    Thumbnails are written by background threads while the bucket decodes; the batch is
    emitted once they are on disk (a source whose thumbnail cannot be written is dead-lettered)."""

    def __init__(self, spec: PreprocessSpec, thumbnails_dir: str, sampling: FrameSampling):
        self._spec = spec
        self._thumbs = thumbnails_dir
        self._sampling = sampling
        self._decoded = Metrics.counter("lookalike", "items_decoded")
        self._failed = Metrics.counter("lookalike", "files_failed")
        self._duplicates = Metrics.counter("lookalike", "duplicate_files")
        self._batches = Metrics.counter("lookalike", "batches")

    def setup(self) -> None:
        self._writer = ThumbnailWriter()

    def teardown(self) -> None:
        self._writer.close()

    def _dead(self, uris: list[str], stage: str, error: Exception):
        self._failed.inc(len(uris))
        for uri in uris:
            log.warning("dead letter %s (%s): %s", uri, stage, error)
            yield DEAD, dead_letter(uri, stage, str(error))

    def process(self, keyed: tuple[int, Any]):
        _, entries = keyed
        uris_by_hash: dict[str, list[str]] = defaultdict(list)
        data_by_hash: dict[str, bytes] = {}
        for source_hash, uri, data in entries:
            uris_by_hash[source_hash].append(uri)
            if data is not None:
                data_by_hash[source_hash] = data
        decoded: list[tuple[list[str], list[Future], list[tuple[dict[str, Any], np.ndarray]]]] = []
        for source_hash in sorted(uris_by_hash):
            uris = sorted(set(uris_by_hash[source_hash]))
            self._duplicates.inc(len(uris) - 1)
            futures: list[Future] = []
            try:
                items = list(decode_source(source_hash, uris, self._spec, self._thumbs, self._sampling,
                                           data_by_hash.get(source_hash),
                                           lambda img, path, original: futures.append(self._writer.submit(img, path, original))))
            except (ImageDecodeError, VideoDecodeError, OSError) as e:
                yield from self._dead(uris, "decode", e)
                continue
            decoded.append((uris, futures, items))
        metas: list[dict[str, Any]] = []
        pixels: list[np.ndarray] = []
        for uris, futures, items in decoded:
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                yield from self._dead(uris, "thumbnail", errors[0])
                continue
            for meta, item_pixels in items:
                metas.append(meta)
                pixels.append(item_pixels)
        if metas:
            self._decoded.inc(len(metas))
            self._batches.inc()
            yield BATCH, (metas, np.stack(pixels))


class BatchRowsFn(beam.DoFn):
    """(metas, PredictionResult with [B, D] inference) -> (shard, items table) per shard the
    batch's items fall in. Each batch's rows are first written to the embedding cache (one
    file per batch, atomically), so a run killed midway keeps every finished batch for the
    next ``--incremental`` run. Logs the embed stage's progress (items, rate, ETA)."""

    def __init__(self, total_files: int, cache_dir: str, embed_dim: int, num_shards: int, **expand: Any):
        self._total = total_files
        self._cache_dir = cache_dir
        self._embed_dim = embed_dim
        self._num_shards = num_shards
        self._expand = expand

    def setup(self) -> None:
        self._progress = Progress("embed", total=self._total or None, unit="items", logger=log)
        self._count = 0
        self._batches = 0

    def process(self, keyed: tuple[list[dict[str, Any]], Any]):
        metas, result = keyed
        rows = rows_table(metas, np.asarray(result.inference, np.float32), self._embed_dim)
        write_cache_table(self._cache_dir, rows)
        self._batches += 1
        failpoint(f"embed_batch_{self._batches}")
        self._count += len(metas)
        self._progress.update(self._count)
        items = expand_items(rows, *items_of_batch(metas), reused=False, **self._expand)
        yield from split_by_shard(items, self._num_shards)
