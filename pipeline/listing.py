"""The listed corpus: written before the run (sorted by size, cut into chunks) and read chunk by chunk.

A corpus folder or glob is listed before the run (``pipeline.reuse.list_files``) and
written to a listing file (Arrow IPC) kept out of the pipeline graph; the graph carries
only [start, stop) chunks of its rows. ``ReadChunkFn`` reads, hashes and decodes a chunk in
one step, fused with inference. Files are read in groups (``ListingReader.read_range``):
the usual file, a local image the file index does not know, takes a lean path, as a
corpus of small JPEGs is read at thousands of files a second and Python's cost per file
shows.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from lookalike.model.data import IMAGE_SUFFIXES
from lookalike.model.parallel import PARALLEL_MIN_BYTES, ordered_map
from lookalike.model.preprocess import PreprocessSpec
from lookalike.pipeline.batches import BATCH, DECODE_WINDOW, DecodeBatchFn
from lookalike.pipeline.cache import file_index_table
from lookalike.pipeline.elements import Routed
from lookalike.pipeline.reuse import inode_of
from lookalike.pipeline.sources import CACHED, CARRY_BYTES_MAX, FILE, NEW, ReadSourceFn, read_bytes
from lookalike.pipeline.video import FrameSampling


# Files per read chunk (a chunk ends where the file size changes, so it may hold more).
CHUNK_FILES = 1024
# Batches decoded ahead of inference (ReadChunkFn's background thread).
DECODE_AHEAD = 2
# Bytes of a chunk's files kept in memory between hashing and decoding; files past it are read again.
CHUNK_CARRY_BYTES = 64 * 1024 * 1024
# What ReadChunkFn's background thread hands to the bundle's thread.
_INC, _OUT, _ERR, _END = "inc", "out", "err", "end"


def write_listing(path: str, files: list[Any], chunk_files: int | None = None) -> list[tuple[int, int]]:
    """Write ``files`` (FileMetadata) to ``path`` (Arrow IPC: path, size, mtime, inode), sorted by size
    then path, and return chunks as [start, stop) row ranges. Chunks end only where the size
    changes, so byte-identical files (same size) always share a chunk, where they are decoded
    and embedded once. The listing stays out of the pipeline graph (Beam would pickle and
    bz2-compress every entry into it). ``chunk_files``: default CHUNK_FILES."""
    chunk_files = chunk_files or CHUNK_FILES
    table = pa.table({
        "path": pa.array([m.path for m in files], pa.string()),
        "size": pa.array([int(m.size_in_bytes or 0) for m in files], pa.int64()),
        "mtime_s": pa.array([float(getattr(m, "last_updated_in_seconds", 0) or 0) for m in files], pa.float64()),
        "inode": pa.array([inode_of(m) for m in files], pa.uint64()),
    }).sort_by([("size", "ascending"), ("path", "ascending")])
    write_arrow_file(path, table)
    sizes = table.column("size").to_numpy()
    chunks, start = [], 0
    for i in np.flatnonzero(sizes[1:] != sizes[:-1]) + 1:  # rows where the size changes
        if i - start >= chunk_files:
            chunks.append((start, int(i)))
            start = int(i)
    if len(table):
        chunks.append((start, len(table)))
    return chunks


def write_arrow_file(path: str, table: pa.Table) -> None:
    """``table`` as an Arrow IPC file at ``path`` (a listing or the unchanged files)."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_arrow_file(path: str) -> pa.Table:
    """``write_arrow_file``'s table, memory-mapped."""
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


def write_unchanged(path: str, unchanged: list[tuple[str, str]]) -> None:
    """Write --incremental's unchanged files, (uri, source hash) pairs, to ``path`` (Arrow IPC),
    out of the pipeline graph: as one ``beam.Create`` element, 1M pairs took 13.5 s of type
    inference and 119 MB in the graph."""
    write_arrow_file(path, pa.table({"uri": pa.array([u for u, _ in unchanged], pa.string()),
                                     "source_hash": pa.array([h for _, h in unchanged], pa.string())}))


def read_unchanged(path: str) -> list[tuple[str, str]]:
    """``write_unchanged``'s pairs."""
    table = read_arrow_file(path)
    return list(zip(table.column("uri").to_pylist(), table.column("source_hash").to_pylist()))


class Listing(NamedTuple):
    """A listing file's columns, row by row (``write_listing``'s order)."""

    paths: list[str]
    sizes: list[int]
    mtimes: list[float]
    inodes: list[int | None]  # None: unknown (not a local file)


def read_listing(path: str) -> Listing:
    table = read_arrow_file(path)
    return Listing(*(table.column(name).to_pylist() for name in ("path", "size", "mtime_s", "inode")))


@dataclass
class RangeRead:
    """What ``ListingReader.read_range`` read: "new" entries (source hash, uri, bytes or None), file index
    rows (uri, size, mtime_s, source_hash, inode), "cached" (uri, source hash) pairs and other
    outputs (dead letters) as (tag, value)."""

    entries: list[tuple[str, str, bytes | None]] = field(default_factory=list)
    file_rows: list[tuple[str, int, float, str, int | None]] = field(default_factory=list)
    cached: list[tuple[str, str]] = field(default_factory=list)
    others: list[tuple[str, Any]] = field(default_factory=list)
    carried: int = 0  # bytes of the entries' files carried on

    def add(self, tag: str, value: Any) -> None:
        """One of ``ReadSourceFn.read_one``'s outputs."""
        if tag == NEW:
            self.entries.append(value)
            self.carried += len(value[2]) if value[2] is not None else 0
        elif tag == FILE:
            self.file_rows.append((value["uri"], value["size"], value["mtime_s"], value["source_hash"], value["inode"]))
        elif tag == CACHED:
            self.cached.append(value)
        else:
            self.others.append((tag, value))


class ListingReader(ReadSourceFn):
    """``ReadSourceFn`` reading the files of a listing range by range (``ReadChunkFn``)."""

    def read_range(self, listing: Listing, start: int, stop: int, carry_bytes: int,
                   pool: ThreadPoolExecutor | None = None) -> RangeRead:
        """``read_one``'s outputs for files [start, stop) of ``listing``, gathered by kind;
        bytes are carried on until ``carry_bytes`` of them are (then read again where decoded).
        The usual file, a local image unknown to the file index, takes a lean path: the same
        outputs without a generator or a dict per file (~10 us less CPU per small file), read
        and hashed on ``pool`` when given, several at once, in order (``model.parallel``: for
        big files). Any other file, or one whose read fails, goes through ``read_one``."""
        out = RangeRead()
        paths, sizes, mtimes, inodes = listing
        known, reusable, undecodable = self._files, self._cache, self._undecodable
        sha256 = hashlib.sha256

        def read_lean(i: int) -> tuple[bytes, str] | None:
            """File i's bytes and their sha256 on the lean path, or None: read_one reads it."""
            uri = paths[i]
            dot = uri.rfind(".")
            if dot < 0 or uri[dot:].lower() not in IMAGE_SUFFIXES or "://" in uri or (known and uri in known):
                return None
            try:
                data = read_bytes(uri)
            except Exception:  # read_one reads it again and says why
                return None
            return data, sha256(data).hexdigest()

        read = 0
        for i, lean in zip(range(start, stop), ordered_map(read_lean, range(start, stop), pool, DECODE_WINDOW)):
            uri, size, mtime = paths[i], sizes[i], mtimes[i]
            if lean is None:
                for tag, value in self.read_one(uri, size, mtime, carry=out.carried < carry_bytes, inode=inodes[i]):
                    out.add(tag, value)
                continue
            data, source_hash = lean
            read += 1
            if mtime:
                out.file_rows.append((uri, size, mtime, source_hash, inodes[i]))
            if source_hash in undecodable or source_hash in reusable:  # as read_one says
                for tag, value in self.known_outputs(uri, source_hash):
                    out.add(tag, value)
            else:
                carry = out.carried < carry_bytes and len(data) <= CARRY_BYTES_MAX
                out.entries.append((source_hash, uri, data if carry else None))
                out.carried += len(data) if carry else 0
        if read:
            self._inc(self._read, read)
        return out


class ReadChunkFn(DecodeBatchFn):
    """[start, stop) rows of a listing file (``write_listing``) -> read, hash and decode in one
    step: ("batch", (metas, [B, H, W, C])) as DecodeBatchFn, ("dead", letter), ("cached", [(uri,
    source hash), ...]) and ("file", ``cache.file_index_table``) per chunk. Reading, decoding
    and inference run in one fused stage (no GroupByKey between them), so they overlap:
    inference is dispatched asynchronously while the next files are read and decoded."""

    def __init__(self, listing: str, cache_dir: str | None, total_files: int, spec: PreprocessSpec,
                 thumbnails_dir: str, sampling: FrameSampling, batch_size: int = 256, failures_dir: str | None = None,
                 decode_threads: int | None = None, redo_sources: frozenset[str] = frozenset()):
        super().__init__(spec, thumbnails_dir, sampling, batch_size, failures_dir, decode_threads)
        self._listing = listing
        self._reader = ListingReader(cache_dir, total_files, sampling, redo_sources)

    def setup(self) -> None:
        super().setup()
        self._reader.setup()
        self._listed = read_listing(self._listing)

    def process(self, bounds: tuple[int, int]):
        """Reads and decodes on a background thread, at most DECODE_AHEAD batches ahead of
        inference: while this thread waits for XLA (the GIL released), the next batch decodes.
        Outputs and counter updates are handed back here in order."""
        results: queue.Queue = queue.Queue()
        room = threading.Semaphore(DECODE_AHEAD)
        stop = threading.Event()
        counts: list[tuple[Any, int]] = []

        def hand_over_counts() -> None:
            if counts:
                results.put((_INC, counts[:]))
                counts.clear()

        def work() -> None:
            try:
                for output in self._chunk_outputs(bounds):
                    if output[0] == BATCH:
                        room.acquire()
                    if stop.is_set():
                        return
                    hand_over_counts()
                    results.put((_OUT, output))
                hand_over_counts()
            except BaseException as e:  # raised again on the bundle's thread
                results.put((_ERR, e))
            finally:
                results.put((_END, None))

        self._deferred = self._reader._deferred = counts
        worker = threading.Thread(target=work, name="read-decode", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = results.get()
                if kind == _INC:
                    totals: dict[int, list] = {}
                    for counter, n in value:
                        totals.setdefault(id(counter), [counter, 0])[1] += n
                    for counter, n in totals.values():
                        counter.inc(n)
                elif kind == _OUT:
                    yield value if isinstance(value, Routed) else Routed(*value)
                    if value[0] == BATCH:
                        room.release()
                elif kind == _ERR:
                    raise value
                else:
                    break
        finally:
            stop.set()
            room.release()
            worker.join()
            self._deferred = self._reader._deferred = None

    def _chunk_outputs(self, bounds: tuple[int, int]):
        """Files are read in listing order (by size) and decoded in groups of at least a
        batch of files that end where the size changes: byte-identical files, which have one
        size, meet in one group and are decoded once, and the first batch of a chunk is ready
        after a batch of files is read, not the whole chunk."""
        start, stop = bounds
        sizes = self._listed.sizes
        cached: list[tuple[str, str]] = []
        file_rows: list[tuple[str, int, float, str, int | None]] = []
        while start < stop:
            end = min(stop, start + self._batch_size)
            while end < stop and sizes[end] == sizes[end - 1]:
                end += 1
            # Big files (sorted by size: all from the first) are read and hashed on the decode pool too.
            pool = self._pool if sizes[start] >= PARALLEL_MIN_BYTES else None
            group = self._reader.read_range(self._listed, start, end, CHUNK_CARRY_BYTES, pool)
            yield from group.others
            cached += group.cached
            file_rows += group.file_rows
            yield from super().process((None, group.entries))
            start = end
        self._reader.advance(bounds[1] - bounds[0])
        if file_rows:
            yield FILE, file_index_table(file_rows)
        if cached:
            yield CACHED, cached
