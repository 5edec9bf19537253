"""The index built inside the embed pipeline: one ScaNN shard per embedding shard.

Each worker that writes an embedding shard also builds that shard's ScaNN index
(``lookalike.index.builder.build_shard``) into the new version's temporary folder
``indexes/.tmp-<version>/`` and leaves its manifest entry beside it. When the pipeline
has finished, ``run_embed`` collects the entries, assembles the manifest over every shard
(counts, checksums, model version, dim, metric) and autotunes, all inside
``lookalike.index.manifest.publish_atomically``, which renames the folder into
``indexes/<version>`` and only then moves ``CURRENT``: readers never see half an index.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa

from lookalike.index.builder import IndexOptions, resolve_options


log = logging.getLogger(__name__)

ENTRY_SUFFIX = ".entry.json"


def build_index_shard(index_dir: str, params: dict[str, Any], shard: int, items: pa.Table) -> str:
    """Build shard ``shard`` of the index in ``index_dir`` from its items table (sorted by id,
    with embeddings); returns the path of its manifest entry."""
    from lookalike.index.builder import build_shard
    from lookalike.pipeline.items import embeddings_of
    from lookalike.pipeline.writers import write_atomically

    entry = build_shard(embeddings_of(items), items.drop(["embedding"]), index_dir=Path(index_dir), shard=shard,
                        params=params)
    path = str(Path(index_dir) / f"{entry['name']}{ENTRY_SUFFIX}")
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(entry), encoding="utf-8"))
    return path


def index_build_params(options: IndexOptions, num_shards: int, item_count: int, *, warn: bool = True) -> dict[str, Any]:
    """The build parameters of an index of ``item_count`` items in at most ``num_shards``
    shards: chosen from the items, not the files (a video is one file and many frames), so
    every shard, built apart, and the manifest get the same ones."""
    return resolve_options(item_count, replace(options, num_shards=max(1, min(num_shards, item_count))), warn=warn)


class BuildIndexShardFn(beam.DoFn):
    """(shard, items table sorted by id), the run's item count (a side input) -> path of the
    shard's manifest entry, after building it with ``index_build_params`` for that count."""

    def __init__(self, index_dir: str, options: IndexOptions, num_shards: int):
        self._index_dir = index_dir
        self._options = options
        self._num_shards = num_shards

    def process(self, keyed: tuple[int, pa.Table], item_count: int):
        shard, items = keyed
        params = index_build_params(self._options, self._num_shards, item_count, warn=False)  # run_embed warns once
        yield build_index_shard(self._index_dir, params, shard, items)


def collect_shard_entries(index_dir: Path) -> list[dict[str, Any]]:
    """The manifest entries the workers left in ``index_dir`` (removed from it), by shard name."""
    entry_files = sorted(Path(index_dir).glob(f"*{ENTRY_SUFFIX}"))
    if not entry_files:
        raise RuntimeError(f"no index shard was built in {index_dir}")
    shards = [json.loads(p.read_text(encoding="utf-8")) for p in entry_files]
    for p in entry_files:
        p.unlink()
    return shards
