"""Sinks that write whole files in ``process`` after a GroupByKey, atomically.

One Parquet file per embedding shard (``embeddings-SSSSS-of-NNNNN.parquet``), one
embedding-cache file per shard of newly embedded rows, one dead-letter JSONL file.
Each is written under a temporary name and renamed when complete, and each DoFn
returns the path it wrote, so the pipeline can end in one transform that depends on
every sink (Beam's Dask runner computes only the last one).
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable shard of an item id."""
    return zlib.crc32(item_id.encode("utf-8")) % max(1, num_shards)


def write_atomically(path: str, write) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def records_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Records (dicts, extra keys ignored, missing ones null) -> a table with ``schema``."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


class WriteParquetShardFn(beam.DoFn):
    """(shard, [record, ...]) -> path of ``<prefix>-SSSSS-of-NNNNN.parquet`` (rows sorted by id)."""

    def __init__(self, prefix: str, num_shards: int, schema: pa.Schema):
        self._prefix = prefix
        self._num_shards = num_shards
        self._schema = schema

    def process(self, keyed: tuple[int, Any]):
        shard, records = keyed
        rows = sorted(records, key=lambda r: r["id"])
        path = f"{self._prefix}-{shard:05d}-of-{self._num_shards:05d}.parquet"
        table = records_table(rows, self._schema)
        write_atomically(path, lambda tmp: pq.write_table(table, tmp))
        yield path


class WriteJsonlFn(beam.DoFn):
    """(key, [dict, ...]) -> path of one JSONL file with a line per dict (sorted)."""

    def __init__(self, path: str):
        self._path = path

    def process(self, keyed: tuple[Any, Any]):
        _, rows = keyed
        lines = sorted(json.dumps(r, sort_keys=True) for r in rows)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))

        write_atomically(self._path, write)
        yield self._path
