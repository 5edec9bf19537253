"""Sinks that write whole files in ``process`` after a GroupByKey, atomically.

One Parquet file per embedding shard (``embeddings-SSSSS-of-NNNNN.parquet``, from the
shard's Arrow table), one dead-letter JSONL file.
Each is written under a temporary name and renamed when complete, and each DoFn
returns the path it wrote, so the pipeline can end in one transform that depends on
every sink (Beam's Dask runner computes only the last one).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa

from lookalike.index.rows import write_items_parquet
from lookalike.index.writes import failures_named


def write_atomically(path: str, write) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with failures_named(Path(path)):  # Arrow's write errors name no file
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_items_shard(prefix: str, shard: int, num_shards: int, items: pa.Table) -> str:
    """Write one shard's items table as ``<prefix>-SSSSS-of-NNNNN.parquet``, atomically; returns the path."""
    path = f"{prefix}-{shard:05d}-of-{num_shards:05d}.parquet"
    write_atomically(path, lambda tmp: write_items_parquet(items, tmp))
    return path


class WriteParquetShardFn(beam.DoFn):
    """(shard, items table sorted by id) -> path of ``<prefix>-SSSSS-of-NNNNN.parquet``."""

    def __init__(self, prefix: str, num_shards: int):
        self._prefix = prefix
        self._num_shards = num_shards

    def process(self, keyed: tuple[int, pa.Table]):
        shard, items = keyed
        yield write_items_shard(self._prefix, shard, self._num_shards, items)


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """One JSONL file with a line per dict (sorted), written atomically."""
    lines = sorted(json.dumps(r, sort_keys=True) for r in rows)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    write_atomically(str(path), write)


class WriteJsonlFn(beam.DoFn):
    """(key, [dict, ...]) -> path of one JSONL file with a line per dict (sorted)."""

    def __init__(self, path: str):
        self._path = path

    def process(self, keyed: tuple[Any, Any]):
        _, rows = keyed
        write_jsonl(self._path, list(rows))
        yield self._path
