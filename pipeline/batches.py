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
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from lookalike.model.cpu_threads import available_cpus
from lookalike.model.parallel import ordered_map
from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec, decode_plain_jpeg, decode_side_px, pixels_to_array
from lookalike.model.progress import Progress
from lookalike.pipeline.cache import write_cache_table, write_failed_table
from lookalike.pipeline.elements import ItemBatch, Routed
from lookalike.pipeline.failpoints import failpoint
from lookalike.pipeline.items import expand_items, items_of_batch, rows_table, split_by_shard
from lookalike.pipeline.sources import DEAD, dead_letter, decode_source, worth_a_thread
from lookalike.pipeline.state_sampling import shorten_state_sampling
from lookalike.pipeline.thumbnails import ThumbnailWriter, thumbnail_path
from lookalike.pipeline.video import FrameSampling, VideoDecodeError, is_video_path
from lookalike.pipeline.worker_main import worker_label

log = logging.getLogger(__name__)

BATCH = "batch"
# Sources decoded ahead of the one the batch waits for, when decoding on the pool (``model.parallel.ordered_map``).
DECODE_WINDOW = 8
shorten_state_sampling()  # here too: every worker process imports this module to run our DoFns


def bucket_of(source_hash: str, num_buckets: int) -> int:
    """Stable bucket of a hex content hash."""
    return int(source_hash[:12], 16) % max(1, num_buckets)


def split_tagged(pcoll: beam.PCollection, tags: tuple[str, ...], label: str,
                 types: dict[str, type] | None = None) -> dict[str, beam.PCollection]:
    """``(tag, value)`` elements -> one PCollection of values per tag; ``types`` declares the
    element type of some of them (so Beam uses that type's coder: ``lookalike.pipeline.elements``)."""
    out = {}
    for tag in tags:
        split = beam.FlatMap(lambda element, t=tag: [element[1]] if element[0] == t else [])
        if types and tag in types:
            split = split.with_output_types(types[tag])
        out[tag] = pcoll | f"{label}_{tag}" >> split
    return out


def stack_model_input(arrays: list[np.ndarray]) -> np.ndarray:
    """Items' model input (float32, or uint8 pixels of the model's shape: see
    ``sources.decode_source``) -> one float32 [B, H, W, C] batch, uint8 ones converted together
    exactly as ``model.preprocess.pixels_to_array`` converts one."""
    if all(a.dtype == np.uint8 for a in arrays):
        batch = np.stack(arrays).astype(np.float32)
        batch /= 255.0
        return batch
    return np.stack([a if a.dtype != np.uint8 else np.asarray(a, dtype=np.float32) / 255.0 for a in arrays])


def _at_least_two(flags: Iterable[bool]) -> bool:
    """Whether at least two of ``flags`` are true, reading no further."""
    found = 0
    for flag in flags:
        found += bool(flag)
        if found == 2:
            return True
    return False


def in_global_window(value: Any) -> WindowedValue:
    """An output of ``finish_bundle`` (Beam wants it windowed; the pipeline is in the global window)."""
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


class DecodeBatchFn(beam.DoFn):
    """(bucket, [(source hash, uri, bytes or None), ...]) -> ("batch", (metas, [B, H, W, C])) and
    ("dead", letter). Bytes travel with the element only for small files and non-file sources.
    Decoded sources are carried over from bucket to bucket, and a batch is emitted as soon as
    the next source would not fit in ``batch_size`` items (the rest in ``finish_bundle``), so
    inference batches are full and have one shape; a source's items (a video's frames) stay
    in one batch, so each lands in the embedding cache whole.
    Photos and videos are decoded several at once on a thread pool, in order
    (``lookalike.model.parallel``); small files inline.
    Thumbnails are written by background threads while the bucket decodes; the batch is
    emitted once they are on disk (a source whose thumbnail cannot be written is dead-lettered).
    Sources whose bytes cannot be decoded are recorded in ``failures_dir`` (the embedding
    cache: ``cache.write_failed_table``) when the bundle ends, so later runs skip them."""

    def __init__(self, spec: PreprocessSpec, thumbnails_dir: str, sampling: FrameSampling, batch_size: int = 256,
                 failures_dir: str | None = None, decode_threads: int | None = None):
        """``decode_threads``: sources decoded at once (``lookalike.model.parallel``); None:
        one per CPU this process may use."""
        self._failures_dir = failures_dir
        self._decode_threads = decode_threads
        self._spec = spec
        self._thumbs = thumbnails_dir
        self._sampling = sampling
        self._batch_size = max(1, batch_size)
        self._decoded = Metrics.counter("lookalike", "items_decoded")
        self._failed = Metrics.counter("lookalike", "files_failed")
        self._duplicates = Metrics.counter("lookalike", "duplicate_files")
        self._batches = Metrics.counter("lookalike", "batches")
        self._deferred: list[tuple[Any, int]] | None = None  # counter updates made on a background thread

    def setup(self) -> None:
        self._writer = ThumbnailWriter()
        self._side = decode_side_px(self._spec)
        threads = self._decode_threads or available_cpus()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def _inc(self, counter: Any, n: int = 1) -> None:
        if self._deferred is not None:  # work on a background thread: Beam counts on the bundle's thread
            self._deferred.append((counter, n))
        else:
            counter.inc(n)

    def teardown(self) -> None:
        try:
            self._writer.close()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def start_bundle(self) -> None:
        self._pending: list[tuple[list[str], list[Future], list[tuple[dict[str, Any], np.ndarray]]]] = []
        self._pending_items = 0
        self._undecodable: list[dict[str, str]] = []  # (source_hash, stage, reason) to record

    def _dead(self, uris: list[str], stage: str, error: Exception):
        self._inc(self._failed, len(uris))
        for uri in uris:
            log.debug("dead letter %s (%s): %s", uri, stage, error)  # listed by the run summary
            yield Routed(DEAD, dead_letter(uri, stage, str(error)))

    def _emit(self):
        """The pending sources as one batch (after their thumbnails), plus their dead letters."""
        pending, self._pending, self._pending_items = self._pending, [], 0
        metas: list[dict[str, Any]] = []
        pixels: list[np.ndarray] = []
        for uris, futures, items in pending:
            errors = [e for e in map(Future.exception, futures) if e is not None]  # one call per future
            if errors:
                yield from self._dead(uris, "thumbnail", errors[0])
                continue
            if len(uris) > 1:  # counted among embedded files only, as the items show it on every runner
                self._inc(self._duplicates, len(uris) - 1)
            for meta, item_pixels in items:
                metas.append(meta)
                pixels.append(item_pixels)
        if metas:
            self._inc(self._decoded, len(metas))
            self._inc(self._batches)
            yield Routed(BATCH, ItemBatch(metas, stack_model_input(pixels)))

    def process(self, keyed: tuple[int, Any]):
        _, entries = keyed
        by_hash: dict[str, list] = {}  # source hash -> [uris, bytes or None]
        for source_hash, uri, data in entries:
            found = by_hash.get(source_hash)
            if found is None:
                by_hash[source_hash] = [[uri], data]
            else:
                found[0].append(uri)
                if data is not None:
                    found[1] = data
        sources = [(h, uris if len(uris) == 1 else sorted(set(uris)), data) for h, (uris, data) in sorted(by_hash.items())]
        # Big sources (photos, videos) are decoded on the pool, several at once; small ones inline.
        on_pool = self._pool is not None and _at_least_two(worth_a_thread(data, uris[0]) for _, uris, data in sources)
        decoded_sources = ordered_map(self._decode if on_pool else self._decode_small, sources,
                                      self._pool if on_pool else None, DECODE_WINDOW)
        for (source_hash, uris, _), decoded in zip(sources, decoded_sources):
            if isinstance(decoded, Exception):
                if not isinstance(decoded, (OSError, MemoryError)):  # the bytes themselves are bad: the same next time
                    self._undecodable.append({"source_hash": source_hash, "stage": "decode", "reason": str(decoded)})
                yield from self._dead(uris, "decode", decoded)
                continue
            items, futures = decoded
            if self._pending and self._pending_items + len(items) > self._batch_size:
                yield from self._emit()
            self._pending.append((uris, futures, items))
            self._pending_items += len(items)
            if self._pending_items >= self._batch_size:
                yield from self._emit()

    def _decode_small(self, source: tuple[str, list[str], bytes | None]):
        """``_decode``, inline, with a lean path for the usual small file, a plain JPEG
        (``decode_source``'s fast path: the same pixels, meta and thumbnail, without a
        generator or callback per file)."""
        source_hash, uris, data = source
        spec = self._spec
        pixels = None
        if data is not None and not is_video_path(uris[0]):
            pixels = decode_plain_jpeg(data, spec.channels, spec.max_pixels, self._side)  # None unless a plain JPEG
        if pixels is None:
            return self._decode(source)
        height, width = pixels.shape[:2]
        try:
            future = self._writer.submit(pixels, thumbnail_path(self._thumbs, source_hash), (uris[0], data))
        except OSError as e:
            return e
        meta = {"source_hash": source_hash, "content_hash": source_hash, "kind": "image", "timestamp_s": None,
                "width": width, "height": height, "uris": uris}
        # Pixels of exactly the model's shape stay uint8: the batch is converted at once (stack_model_input).
        return [(meta, pixels if pixels.shape == spec.shape else pixels_to_array(pixels, spec))], [future]

    def _decode(self, source: tuple[str, list[str], bytes | None]):
        """One source's (items, thumbnail futures), or the ImageDecodeError, VideoDecodeError,
        OSError or MemoryError that makes it a dead letter (the last two not recorded as
        undecodable: not the bytes' fault, so tried again next run). Runs on the decode pool or inline."""
        source_hash, uris, data = source
        futures: list[Future] = []

        def thumbnail(img: Any, path: str, original: tuple[str, bytes] | None) -> None:
            futures.append(self._writer.submit(img, path, original))

        try:
            items = list(decode_source(source_hash, uris, self._spec, self._thumbs, self._sampling, data, thumbnail))
        except (ImageDecodeError, VideoDecodeError, OSError) as e:
            return e
        except MemoryError as e:  # one picture too big for the memory left: the rest of the run goes on
            return MemoryError(f"out of memory decoding it ({type(e).__name__}{': ' if str(e) else ''}{e}); "
                               "tried again next run")
        return items, futures

    def finish_bundle(self):
        if self._failures_dir and self._undecodable:
            write_failed_table(self._failures_dir, self._undecodable)
            self._undecodable = []
        for output in self._emit():
            yield in_global_window(output)


MAX_PENDING_WRITES = 4  # batches' cache writes in flight at most: the rest waits for them


class BatchRowsFn(beam.DoFn):
    """(metas, PredictionResult with [B, D] inference) -> (shard, items table) per shard the
    batch's items fall in, one batch behind (the last in ``finish_bundle``), so that an
    inference dispatched asynchronously is waited for only when the next batch is in. Each
    batch's rows are written to the embedding cache (one file per batch, atomically) on a
    thread of their own, so that the thread feeding the encoder goes on meanwhile (0.4 s of
    its 3.3 s in a benchmark run); the bundle ends only once every write has, so a run killed
    midway keeps every finished batch for the next ``--incremental`` run. Logs the
    embed stage's progress in files, like the read stage (a video's frames count as its one
    file), with rate and ETA, or this worker's share without a total (``total_files`` 0), or
    without a total in one process (None: an --incremental run, whose files known to the cache
    by their bytes are read but never embedded, so no total of files to embed is known)."""

    def __init__(self, total_files: int | None, cache_dir: str, embed_dim: int, num_shards: int, **expand: Any):
        self._total = total_files
        self._cache_dir = cache_dir
        self._embed_dim = embed_dim
        self._num_shards = num_shards
        self._expand = expand

    def setup(self) -> None:
        self._progress = Progress("embed" if self._total != 0 else f"embed ({worker_label()})", total=self._total or None,
                                  unit="files", logger=log)  # no total: this worker's share of a multi-worker run
        self._count = 0
        self._batches = 0  # in the cache
        self._cache_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-write")
        self._writes: deque[Future] = deque()

    def teardown(self) -> None:
        self._cache_writer.shutdown(wait=True)

    def start_bundle(self) -> None:
        self._held = None

    def process(self, keyed: tuple[list[dict[str, Any]], Any]):
        # One batch behind: the inference of ``keyed`` is still being computed (dispatched
        # asynchronously), so the previous batch is written while the next one decodes.
        held, self._held = self._held, keyed
        if held is not None:
            yield from self._rows(held)

    def finish_bundle(self):
        held, self._held = self._held, None
        if held is not None:
            for output in self._rows(held):
                yield in_global_window(output)
        self._settle_writes(wait=True)

    def _settle_writes(self, wait: bool) -> None:
        """Account for the cache writes done (all of them with ``wait``, or all but
        MAX_PENDING_WRITES), oldest first: the first failed one raises; each batch's
        failpoint fires once its rows are in the cache."""
        while self._writes and (wait or self._writes[0].done() or len(self._writes) > MAX_PENDING_WRITES):
            self._writes.popleft().result()
            self._batches += 1
            failpoint(f"embed_batch_{self._batches}")

    def _rows(self, keyed: tuple[list[dict[str, Any]], Any]):
        metas, result = keyed
        rows = rows_table(metas, np.asarray(result.inference, np.float32), self._embed_dim)
        self._writes.append(self._cache_writer.submit(write_cache_table, self._cache_dir, rows))
        self._settle_writes(wait=False)
        files_of_source = {m["source_hash"]: len(m["uris"]) for m in metas}  # a video's frames are one file
        self._count += sum(files_of_source.values())
        self._progress.update(self._count)
        items = expand_items(rows, *items_of_batch(metas), reused=False, **self._expand)
        yield from split_by_shard(items, self._num_shards)
