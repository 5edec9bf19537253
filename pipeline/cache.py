"""The embedding cache: what a (source bytes, model version) pair already embedded to.

Every run appends what it embeds to ``DIR/embeddings/cache/<model version>/`` in
Parquet files, one per inference batch, each written to a temporary name and renamed
when complete. A later ``--incremental`` run looks each file's content hash up
here and reuses the rows instead of decoding and embedding again; because groups land
as they finish, a rerun after a crash redoes only the unfinished work.

A file index (``files-*.parquet``: uri, size, mtime, content hash) lets an incremental
run skip even reading a file whose path, size and modification time are unchanged.

A row describes one item made from a source file: an image (one row) or a video frame
(one row per sampled frame, ``timestamp_s`` set).
"""

from __future__ import annotations

import glob
import logging
import os
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

CACHE_FIELDS = ["source_hash", "content_hash", "kind", "timestamp_s", "width", "height"]


def cache_schema(embed_dim: int) -> pa.Schema:
    return pa.schema([
        ("source_hash", pa.string()),
        ("content_hash", pa.string()),
        ("kind", pa.string()),
        ("timestamp_s", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("embedding", pa.list_(pa.float32(), embed_dim)),
    ])


def cache_dir(embeddings_dir: str | Path, model_version: str) -> Path:
    return Path(embeddings_dir) / "cache" / model_version


FILE_INDEX_SCHEMA = pa.schema([
    ("uri", pa.string()), ("size", pa.int64()), ("mtime_s", pa.float64()), ("source_hash", pa.string()),
])


def load_file_index(directory: str | Path) -> dict[str, tuple[int, float, str]]:
    """uri -> (size, mtime_s, source hash) as last seen; newer index files win."""
    index: dict[str, tuple[int, float, str]] = {}
    paths = sorted(glob.glob(os.path.join(str(directory), "files-*.parquet")), key=os.path.getmtime)
    for path in paths:
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            log.warning("ignoring unreadable file index %s: %s", path, e)
            continue
        for row in rows:
            index[row["uri"]] = (row["size"], row["mtime_s"], row["source_hash"])
    return index


class WriteFileIndexFn(beam.DoFn):
    """(key, [file row, ...]) -> path of a new ``files-*.parquet`` (uri, size, mtime, hash)."""

    def __init__(self, directory: str):
        self._directory = directory

    def process(self, keyed: tuple[Any, Any]):
        from lookalike.pipeline.writers import write_atomically

        _, rows = keyed
        table = pa.Table.from_pylist(list(rows), schema=FILE_INDEX_SCHEMA)
        path = os.path.join(self._directory, f"files-{uuid.uuid4().hex}.parquet")
        write_atomically(path, lambda tmp: pq.write_table(table, tmp))
        yield path


def load_cache(directory: str | Path) -> dict[str, list[dict[str, Any]]]:
    """source hash -> cached rows (one per item made from that source). Unreadable files are skipped."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(str(directory), "part-*.parquet"))):
        try:
            table = pq.read_table(path)
        except Exception as e:  # a torn file from a crash is just not reused
            log.warning("ignoring unreadable cache file %s: %s", path, e)
            continue
        for row in table.to_pylist():
            rows[row["source_hash"]].append(row)
    for source_rows in rows.values():
        source_rows.sort(key=lambda r: (r["timestamp_s"] is not None, r["timestamp_s"] or 0.0))
    return dict(rows)


def write_cache_rows(directory: str, rows: list[dict[str, Any]], embed_dim: int) -> str | None:
    """Write cache rows (meta + embedding) as one new Parquet file, atomically; return its path."""
    from lookalike.pipeline.writers import write_atomically

    if not rows:
        return None
    table = pa.Table.from_pylist([{k: r[k] for k in (*CACHE_FIELDS, "embedding")} for r in rows],
                                 schema=cache_schema(embed_dim))
    path = os.path.join(directory, f"part-{uuid.uuid4().hex}.parquet")
    write_atomically(path, lambda tmp: pq.write_table(table, tmp))
    return path
