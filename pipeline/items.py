"""Item tables: what the embed pipeline writes, built column by column with pyarrow.

After decoding, the unit of work is a batch: an inference batch becomes one Arrow table
of items (one row per image or video frame and per path holding those bytes, embeddings
in a ``FixedSizeList<float32>[D]`` column), split by shard; shards are concatenated,
sorted by id and written as Parquet or built into ScaNN shards without a Python object
per item. Items reused from the embedding cache are built the same way.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lookalike.index.rows import ITEM_FIELDS
from lookalike.pipeline.sources import item_id_for
from lookalike.pipeline.thumbnails import thumbnail_paths
from lookalike.pipeline.video import frame_id


def embedding_schema(embed_dim: int) -> pa.Schema:
    """The items table: ITEM_FIELDS plus ``embedding`` (FixedSizeList<float32>[embed_dim])."""
    return pa.schema(ITEM_FIELDS + [("embedding", pa.list_(pa.float32(), embed_dim))])


def embedding_column(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] float32 -> a FixedSizeList<float32>[D] array of N rows (no copy of the values)."""
    emb = np.ascontiguousarray(embeddings, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def embeddings_of(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of ``table`` as [N, D] float32."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(table), dim)


def rows_table(metas: Sequence[dict], embeddings: np.ndarray, embed_dim: int) -> pa.Table:
    """Item metas (a value for each column of ``cache_schema`` but the embedding) and their
    [N, D] embeddings -> a table in the cache's schema."""
    from lookalike.pipeline.cache import cache_schema

    schema = cache_schema(embed_dim)
    columns = [pa.array([m[name] for m in metas], schema.field(name).type) for name in schema.names if name != "embedding"]
    return pa.Table.from_arrays([*columns, embedding_column(embeddings)], schema=schema)


def expand_items(rows: pa.Table, take: Sequence[int], uris: Sequence[str], *, root: str, thumbnails_dir: str,
                 model_version: str, reused: bool, store_root: str | None = None) -> pa.Table:
    """Rows of sources (cache schema) -> the items table (embedding_schema): item k is row
    ``take[k]`` found at path ``uris[k]`` (a source held by several paths gives an item per path).
    A uri inside ``store_root`` is recorded relative to it (as thumbnails are, under
    ``thumbnails_dir`` when that is relative), so a moved or copied store still finds its files."""
    picked = rows.take(pa.array(take, pa.int64()))
    uri_array = pa.array(list(uris), pa.string())
    prefix = root.rstrip("/") + "/"
    if len(uri_array) and pc.all(pc.starts_with(uri_array, prefix)).as_py():  # the usual case: ids in Arrow
        bases = pc.utf8_slice_codeunits(uri_array, len(prefix))
    else:
        bases = pa.array([item_id_for(uri, root) for uri in uris], pa.string())
    frames = pc.fill_null(pc.equal(picked.column("kind"), "frame"), False)
    if pc.any(frames).as_py():
        ids_list, groups_list = bases.to_pylist(), []
        for i, (is_frame, t) in enumerate(zip(frames.to_pylist(), picked.column("timestamp_s").to_pylist())):
            groups_list.append(ids_list[i] if is_frame else None)
            if is_frame:
                ids_list[i] = frame_id(ids_list[i], t)
        ids, groups = pa.array(ids_list, pa.string()), pa.array(groups_list, pa.string())
    else:
        ids, groups = bases, pa.nulls(len(bases), pa.string())
    recorded_uris = uri_array
    if store_root and len(uri_array):
        inside = store_root.rstrip("/") + "/"
        recorded_uris = pc.if_else(pc.starts_with(uri_array, inside), pc.utf8_slice_codeunits(uri_array, len(inside)),
                                   uri_array)
    hashes = picked.column("content_hash").combine_chunks()
    unique = pc.unique(hashes)
    thumbs = pa.array(thumbnail_paths(thumbnails_dir, unique.to_pylist()), pa.string())
    n = len(ids)
    schema = embedding_schema(picked.schema.field("embedding").type.list_size)
    return pa.table({
        "id": ids,
        "uri": recorded_uris,
        "kind": picked.column("kind"),
        "timestamp_s": picked.column("timestamp_s"),
        "width": picked.column("width"),
        "height": picked.column("height"),
        "content_hash": picked.column("content_hash"),
        "group": groups,
        "thumbnail": thumbs.take(pc.index_in(hashes, value_set=unique)),
        "model_version": pa.array([model_version] * n, pa.string()),
        "reused": pa.array([reused] * n, pa.bool_()),
        "embedding": picked.column("embedding"),
    }, schema=schema)


def items_of_batch(metas: Sequence[dict]) -> tuple[list[int], list[str]]:
    """``expand_items``' (take, uris) for a decoded batch whose metas carry their ``uris``."""
    take = [i for i, m in enumerate(metas) for _ in m["uris"]]
    return take, [uri for m in metas for uri in m["uris"]]


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable shard of an item id."""
    return zlib.crc32(item_id.encode("utf-8")) % max(1, num_shards)


def split_by_shard(items: pa.Table, num_shards: int) -> Iterator[tuple[int, pa.Table]]:
    """(shard, the rows of ``items`` whose id falls in it) for every shard that has rows."""
    if num_shards <= 1:  # every id falls in shard 0: no hashing, no copy
        if len(items):
            yield 0, items
        return
    shards = np.fromiter((shard_of(i, num_shards) for i in items.column("id").to_pylist()), np.int64, len(items))
    for shard in np.unique(shards):
        yield int(shard), items.take(pa.array(np.flatnonzero(shards == shard)))


def concat_sorted(tables: Sequence[pa.Table], schema: pa.Schema) -> pa.Table:
    """Tables of one shard -> one table sorted by id (an empty one in ``schema`` if none)."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).combine_chunks().sort_by("id")
