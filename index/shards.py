"""A shard of a published index on disk: its files loaded and checked, and how a search over it
is sized (mini-batches for parallel search, leaves widened for a deep k).

``lookalike.index.searcher.ItemIndex`` holds one ``Shard`` per shard folder and fans each query
out to them; this module is what one shard folder holds and how it is read.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lookalike.index.manifest import IndexLoadError
from lookalike.index.simd import enable_scann_simd


@dataclass
class Shard:
    """One ScaNN searcher (the raw pybind object) and the map from its datapoint indices to index rows.

    ``rows`` is replaced, never modified, by updates (under the index's write lock).
    """

    name: str
    searcher: Any  # scann_pybind.ScannNumpy
    rows: np.ndarray  # int64 [searcher size]: row of each ScaNN datapoint
    updatable: bool  # built with docids (format 2): upsert/delete allowed


def load_scann(folder: Path) -> Any:
    """The raw ScaNN searcher serialized in ``folder`` (without the Python wrapper's docid dict)."""
    from lookalike.index.scann_module import scann_ops_pybind

    enable_scann_simd()
    assets = (folder / "scann_assets.pbtxt").read_text(encoding="utf-8")
    return scann_ops_pybind().scann_pybind.ScannNumpy(str(folder), assets)


def read_docids(folder: Path) -> pa.Array | None:
    """The ids ScaNN's datapoints were built with (``scann_docids.pkl``, a list written by ScaNN), or None."""
    path = folder / "scann_docids.pkl"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        docids = pickle.load(f)  # noqa: S301 - written by us, and its SHA-256 was verified against the manifest
    if not isinstance(docids, list):
        raise IndexLoadError(f"{path} does not hold a list of ids")
    return pa.array(docids, pa.string())


def parallel_batch_size(num_queries: int, num_threads: int, max_batch: int = 1024) -> int:
    """Mini-batch size for ScaNN's parallel batched search: as few mini-batches as give every
    thread an equal share of at most ``max_batch`` queries (one per thread for up to
    ``num_threads * max_batch`` queries), none under 32 queries.

    Large mini-batches, because a tree searches a batch leaf by leaf, scoring all the
    batch's queries that chose a leaf at once: on CIFAR-10 (50k x 64, 7 of 447 leaves, one
    thread) 1,000 queries ran at 122k QPS in one batch, 117k in batches of 500, 107k of 250
    and 95k of 125.
    """
    threads = max(1, num_threads)
    per_thread = -(-num_queries // threads)
    batches = threads * -(-per_thread // max_batch)
    return int(max(1, min(num_queries, max(32, -(-num_queries // batches)))))


LEAF_SLACK = 4  # widened leaves hold ~4x the candidates asked for: leaves differ in size, and depth needs spares


def deep_leaves(leaves: int, candidates: int, size: int, num_leaves: int) -> int:
    """The tuned ``leaves`` of a shard of ``size`` items in ``num_leaves`` leaves, or, when they
    cannot hold ``LEAF_SLACK`` x ``candidates`` items of the mean leaf size, enough leaves that
    can (at most ``num_leaves``). A 20k-item shard of 283 leaves tuned to 7 for k=10 keeps 7 up
    to k=123; k=1000 searches 57 leaves (7 held ~500 items: ScaNN returned ~500 results)."""
    num_leaves = min(num_leaves, size)
    need = -(-LEAF_SLACK * candidates * num_leaves // size)
    return leaves if need <= leaves else min(need, num_leaves)


def load_shard_files(folder: Path, count: int, dim: int) -> tuple[pa.Table, np.ndarray, Any, pa.Array | None, np.ndarray]:
    """Read one shard folder and check it against the manifest's ``count`` x ``dim``:
    (items table, [count, dim] float32 embeddings memory-mapped, ScaNN searcher, its docids
    or None, [count] int64 row in the table of each ScaNN datapoint)."""
    table = pq.read_table(folder / "items.parquet")
    try:
        emb = np.load(folder / "embeddings.npy", allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        raise IndexLoadError(f"index file {folder / 'embeddings.npy'} is not a valid array: {e}") from None
    if table.num_rows != count or emb.shape != (count, dim) or emb.dtype != np.float32:
        raise IndexLoadError(
            f"{folder}: manifest says {count} x {dim} float32 but found {table.num_rows} items and "
            f"embeddings {emb.shape} {emb.dtype}")
    searcher = load_scann(folder / "scann")
    if searcher.size() != count:
        raise IndexLoadError(f"{folder / 'scann'}: searcher holds {searcher.size()} items, manifest says {count}")
    docids = read_docids(folder / "scann")
    if docids is None or docids.equals(table.column("id").combine_chunks()):  # as built: datapoint i is row i
        local = np.arange(table.num_rows, dtype=np.int64)
    else:
        found = pc.index_in(docids, value_set=table.column("id"))
        if len(docids) != table.num_rows or found.null_count:
            raise IndexLoadError(f"{folder / 'scann' / 'scann_docids.pkl'} does not match {folder / 'items.parquet'}")
        local = found.to_numpy(zero_copy_only=False).astype(np.int64)
    return table, emb, searcher, docids, local
