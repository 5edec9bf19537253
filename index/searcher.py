"""Load a published index version and answer nearest-neighbour queries across its shards.

``ItemIndex.load(dir)`` verifies the manifest (format, shard list, counts, dim, metric,
file checksums) before trusting anything, then serves ``search`` by vector and
``similar_to`` by item id. Each shard is a ScaNN searcher; a query fans out to the
shards in parallel (ScaNN releases the GIL) and the per-shard top-k lists are merged
exactly. Scores are dot products of unit vectors (cosine similarity);
``distance = sqrt(2 - 2 * score)`` is the L2 distance the model was trained on.
Rows (``Neighbor.row``) index ``items`` and ``embeddings`` of this loaded object and stay
valid while other threads update it (rows are immutable: see ``lookalike.index.rows``).
Loading reads no item into a Python dict: metadata stays an Arrow table, embeddings are
memory-mapped, ScaNN datapoints are matched to rows in Arrow, and the id -> row map is
built on first use.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lookalike.index.filtered import filtered_search
from lookalike.index.manifest import REORDER_MODES, TREE_MODES, IndexLoadError, read_manifest, verify_files
from lookalike.index.rows import Growable, ItemTable, ReadWriteLock
from lookalike.index.shards import Shard, deep_leaves, load_shard_files, parallel_batch_size
from lookalike.index.updates import UpdatableIndex

log = logging.getLogger(__name__)

__all__ = ["IncompatibleQueryError", "IndexLoadError", "ItemIndex", "Neighbor", "QueryError"]


class QueryError(ValueError):
    """A query embedding is malformed (shape, dtype, NaN/inf, zero length)."""


class IncompatibleQueryError(QueryError):
    """A query embedding comes from another model version, or has another dimension, than the index."""


@dataclass(frozen=True)
class Neighbor:
    row: int
    id: str
    score: float  # cosine similarity, higher is closer

    @property
    def distance(self) -> float:
        return math.sqrt(max(0.0, 2.0 - 2.0 * self.score))


class ItemIndex(UpdatableIndex):
    """A loaded index version: ScaNN shards, item metadata and embeddings, searchable while it is updated.

    ``items[row]`` (a dict) and ``embeddings[row]`` ([rows, D] float32) are indexed by row;
    rows are immutable and stay valid for the life of this object (see ``lookalike.index.rows``):
    an update adds a row, a delete marks its row deleted (``is_deleted``) until ``save``.
    Searches and updates may run on different threads at once (a reader-writer lock).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Shard], items: pa.Table,
                 embeddings: np.ndarray, shard_of_row: np.ndarray, slot_of_row: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.version: str = path.name
        self.model_version: str = manifest["model_version"]
        self.embed_dim: int = int(manifest["embed_dim"])
        self.shards = shards
        self.items = ItemTable(items)
        self._emb = Growable(embeddings)
        self._shard_of_row = Growable(shard_of_row)  # int32 [rows]
        self._slot_of_row = Growable(slot_of_row)  # int64 [rows]: datapoint index in its shard, -1 once deleted
        self._live = len(items)
        self._row_of: dict[str, int] | None = None  # id -> live row, built on first use
        self._row_of_lock = threading.Lock()
        self._lock = ReadWriteLock()
        self._pool: ThreadPoolExecutor | None = None
        self._search_threads = os.cpu_count() or 1  # ScaNN's default pool: a thread per CPU but one

    @property
    def search_threads(self) -> int:
        """Threads a ``search_rows(..., parallel=True)`` call uses per shard (see ``set_search_threads``)."""
        return self._search_threads

    def set_search_threads(self, num_threads: int) -> None:
        """Threads one ``search_rows(..., parallel=True)`` call uses per shard, the calling thread included.

        ScaNN's parallel batched search runs mini-batches on the calling thread *and* on
        every thread of the searcher's pool, so each pool gets ``num_threads - 1``
        threads. (ScaNN's own ``set_num_threads(n)`` means n + 1 workers: on 2 cores,
        4 mini-batches over 3 workers took 2.5 mini-batch times instead of 2.) The default,
        one thread per CPU, is what ScaNN's own default pool of CPUs - 1 threads gives.
        """
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        if num_threads != self._search_threads:  # a new pool costs thread starts
            for shard in self.shards:
                shard.searcher.set_num_threads(max(1, num_threads - 1))
            self._search_threads = int(num_threads)

    def __len__(self) -> int:
        """The number of (live) items."""
        return self._live

    @property
    def embeddings(self) -> np.ndarray:
        """[rows, D] float32 unit embeddings (rows of deleted items included until ``save``)."""
        return self._emb.view()

    @property
    def num_deleted(self) -> int:
        return len(self.items) - self._live

    def is_deleted(self, row: int) -> bool:
        return bool(self._slot_of_row.view()[row] < 0)

    def live_rows(self) -> np.ndarray:
        """[len(self)] int64 rows of the items that are not deleted, ascending."""
        return np.flatnonzero(self.live_mask())

    def live_mask(self) -> np.ndarray:
        """[rows] bool: which rows are items that are not deleted."""
        return self._slot_of_row.view() >= 0

    @property
    def mode(self) -> str:
        return self.manifest.get("build", {}).get("mode", "brute_force")

    @classmethod
    def load(cls, path: str | Path, verify_checksums: bool = True, *, model_version: str | None = None) -> "ItemIndex":
        """Load and verify an index folder; ``model_version`` (if given) must match the manifest's.

        Checksums are verified (in parallel over files) before any file is parsed;
        embeddings are memory-mapped, metadata stays an Arrow table, and ids are matched
        to ScaNN's docids in Arrow, so loading costs little beyond reading the files.
        """
        path = Path(path)
        manifest = read_manifest(path)
        if model_version is not None and manifest["model_version"] != model_version:
            raise IncompatibleQueryError(
                f"index {path} was built from model {manifest['model_version']!r}, not {model_version!r}")
        verify_files(path, manifest, verify_checksums)
        dim = int(manifest["embed_dim"])
        shards, tables, all_emb, shard_of, slot_of = [], [], [], [], []
        offset = 0
        for number, entry in enumerate(manifest["shards"]):
            folder = path / entry["name"]
            table, emb, searcher, docids, local = load_shard_files(folder, entry["count"], dim)
            slots = np.empty(table.num_rows, np.int64)
            slots[local] = np.arange(table.num_rows)
            shards.append(Shard(entry["name"], searcher, local + offset, docids is not None))
            tables.append(table)
            all_emb.append(emb)
            shard_of.append(np.full(table.num_rows, number, np.int32))
            slot_of.append(slots)
            offset += table.num_rows
        items = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        if len(tables) > 1 and pc.count_distinct(items.column("id")).as_py() != items.num_rows:
            raise IndexLoadError(f"{path}: an item id appears in more than one shard")
        embeddings = np.concatenate(all_emb) if len(all_emb) > 1 else all_emb[0]
        log.info("loaded index %s: %d items in %d shard(s), dim %d, model %s",
                 path.name, items.num_rows, len(shards), dim, manifest["model_version"])
        return cls(path, manifest, shards, items, embeddings, np.concatenate(shard_of), np.concatenate(slot_of))

    def check_queries(self, queries: np.ndarray, *, model_version: str | None = None) -> np.ndarray:
        """[Q, D] or [D] float queries -> [Q, D] float32; QueryError naming the reason otherwise."""
        if model_version is not None and model_version != self.model_version:
            raise IncompatibleQueryError(
                f"query embeddings come from model {model_version!r} but index {self.version} holds embeddings "
                f"of model {self.model_version!r}; embed the query with that model or rebuild the index")
        raw = np.asarray(queries)
        if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)) or raw.dtype == bool:
            raise QueryError(f"expected float32 query embeddings, got dtype {raw.dtype}")
        q = raw.astype(np.float32, copy=False)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.embed_dim:
            raise IncompatibleQueryError(
                f"expected [N, {self.embed_dim}] float32 query embeddings, got shape {np.shape(queries)}")
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        if len(bad):
            raise QueryError(f"query embedding {bad[0]} has NaN or infinite values")
        return np.ascontiguousarray(q)

    def search_rows(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
                    reorder: int | None = None, parallel: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """[Q, D] checked queries -> (rows [Q, k] int64, scores [Q, k] float32), best first, padded with -1/-inf.

        ``leaves_to_search`` and ``reorder`` default to the autotuned values in the
        manifest; ``parallel`` splits a batch into mini-batches over ``set_search_threads``
        threads (a multiple of them, so no thread idles while another finishes). The
        tuned leaves hold enough items for the tuned k (10), not for a deep k: for a larger k
        they are widened to hold ``LEAF_SLACK`` x k items (``deep_leaves``), and a query still short
        of min(k, shard size) results is searched again over every leaf, so a full list
        comes back. Explicit ``leaves_to_search`` is searched as given (short lists padded).
        """
        tuning = self.manifest.get("tuning") or {}
        leaves = leaves_to_search if leaves_to_search is not None else tuning.get("leaves_to_search")
        reorder = reorder if reorder is not None else tuning.get("reorder")
        k = max(1, int(k))
        all_leaves = self.manifest.get("build", {}).get("num_leaves") if leaves_to_search is None and leaves else None
        with self._lock.read():  # no update runs while ScaNN searches and its answers are mapped to rows
            jobs = [(s, queries, k, leaves, reorder, parallel, all_leaves) for s in self.shards if len(s.rows)]
            if len(jobs) == 1:
                parts = [self._shard_search(*jobs[0])]
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(min(len(self.shards), os.cpu_count() or 1), thread_name_prefix="shard")
                parts = list(self._pool.map(lambda j: self._shard_search(*j), jobs))
        rows = np.concatenate([p[0] for p in parts], axis=1) if parts else np.empty((len(queries), 0), np.int64)
        scores = np.concatenate([p[1] for p in parts], axis=1) if parts else np.empty((len(queries), 0), np.float32)
        if len(parts) > 1:
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            rows, scores = np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return rows, scores

    def _shard_search(self, shard: Shard, q: np.ndarray, k: int, leaves: int | None, reorder: int | None,
                      parallel: bool, all_leaves: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One shard's top min(k, size) of [Q, D] queries; ``all_leaves`` (its tree's leaf count, when the
        leaves are the tuned default) allows widening the leaves for a deep k and searching short results again."""
        count = min(k, len(shard.rows))
        pre = -1 if reorder is None or self.mode not in REORDER_MODES else max(int(reorder), count)
        leaves = -1 if leaves is None or self.mode not in TREE_MODES else int(leaves)
        if all_leaves and leaves > 0 and count > (self.manifest.get("tuning") or {}).get("k", 10) + 1:
            leaves = deep_leaves(leaves, count, len(shard.rows), all_leaves)  # tuned for k (+ 1: self) results
        parallel = parallel and self._search_threads > 1 and len(q) > 1
        idx, dist = shard.searcher.search_batched(q, count, pre, leaves, parallel,
                                                  parallel_batch_size(len(q), self._search_threads))
        idx, dist = np.asarray(idx), np.asarray(dist, np.float32)
        # ScaNN pads a result with fewer than ``count`` neighbours (small searched leaves) with datapoint 0 and NaN
        nan = np.isnan(dist)
        if idx.size and 0 <= idx.min() and idx.max() < len(shard.rows) and not nan.any():  # the usual case
            return shard.rows[idx], dist
        valid = (idx >= 0) & (idx < len(shard.rows)) & ~nan
        rows = np.where(valid, shard.rows[np.clip(idx, 0, len(shard.rows) - 1)], -1)
        scores = np.where(valid, dist, -np.inf).astype(np.float32)
        short = np.flatnonzero(valid.sum(axis=1) < count) if all_leaves and 0 < leaves < all_leaves else []
        if len(short):  # the searched leaves held too few items for these queries: search every leaf
            rows[short], scores[short] = self._shard_search(shard, q[short], k, all_leaves, reorder, parallel)
        return rows, scores

    def _raw_search(self, q: np.ndarray, count: int) -> list[list[Neighbor]]:
        rows, scores = self.search_rows(q, min(int(count), len(self)))
        ids = iter(self.items.ids_of(rows[rows >= 0]))  # row-major, like the loops below
        return [[Neighbor(int(r), next(ids), float(s)) for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(rows.tolist(), scores.tolist())]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        where: Mapping[str, Any] | None = None,
        max_per_group: int | None = None,
        group_by: str = "group",
        model_version: str | None = None,
        exclude_row: int | None = None,
    ) -> list[list[Neighbor]]:
        """[Q, D] queries -> Q lists of the k nearest items, best first.

        ``model_version`` (recommended) is the model that embedded the queries; a
        mismatch with the index raises ``IncompatibleQueryError``. ``where`` keeps items
        whose metadata column equals the value (or is in the list of values), e.g.
        ``{"kind": "frame"}``, for every key; a list column (``tags``) keeps items whose
        list contains the value (or one of the values), e.g. ``{"tags": ["cat", "dog"]}``;
        a missing column or a null is the value None; ``max_per_group`` keeps at most M results per value of
        ``group_by`` (an item without that column is its own group). A selective filter
        scores its matching items exactly; otherwise results are over-fetched and filtered,
        widening the fetch and the searched tree leaves until k results are found or the
        corpus is exhausted (``lookalike.index.filtered``). ``exclude_row`` is left out of
        the results (a similar-item query's own item) and takes no slot of its group.
        """
        q = self.check_queries(queries, model_version=model_version)
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        zero = np.flatnonzero(np.linalg.norm(q, axis=1) == 0)
        if len(zero):
            raise QueryError(f"query embedding {zero[0]} is a zero vector and has no direction")
        if not len(self):
            return [[] for _ in q]
        if max_per_group is not None and max_per_group < 1:
            raise QueryError(f"max_per_group must be at least 1, got {max_per_group}")
        if not where and not max_per_group:
            if exclude_row is None:
                return self._raw_search(q, k)
            return [[n for n in found if n.row != exclude_row][:k] for found in self._raw_search(q, k + 1)]
        return filtered_search(self, q, k, where, max_per_group, group_by, exclude_row)

    def row_of(self, item_id: str) -> int | None:
        """The row of a (live) item, or None; the id map is built on first use (~0.4 s per 1M items)."""
        return self._id_map().get(item_id)

    def same_content(self, item_id: str, other_id: str) -> bool:
        """Whether two (live) items are one, or byte-identical copies (a backup ``IMG_1 (1).jpg``,
        embedded once: the same content hash), so either is the right answer to the other's
        embedding. False for an unknown id, or where the index records no content hashes."""
        if item_id == other_id:
            return self.row_of(item_id) is not None
        rows = self.row_of(item_id), self.row_of(other_id)
        if None in rows:
            return False
        hashes = [self.items[row].get("content_hash") for row in rows]
        return hashes[0] is not None and hashes[0] == hashes[1]

    def _id_map(self, write_locked: bool = False) -> dict[str, int]:
        """id -> live row; built under the read lock, or directly by a writer that holds the write lock."""
        if self._row_of is None:
            if write_locked:
                self._row_of = self._build_id_map()
            else:
                with self._row_of_lock, self._lock.read():
                    if self._row_of is None:
                        self._row_of = self._build_id_map()
        return self._row_of

    def _build_id_map(self) -> dict[str, int]:
        ids = self.items.ids()
        if not self.num_deleted:
            return dict(zip(ids, range(len(ids))))
        return {ids[r]: int(r) for r in self.live_rows()}

    def similar_to(self, item_id: str, k: int, include_self: bool = False) -> list[Neighbor]:
        """The k nearest items to a stored item; KeyError if the id is unknown."""
        row = self.row_of(item_id)
        if row is None:
            raise KeyError(item_id)
        found = self.search(self.embeddings[row], k + (0 if include_self else 1))[0]
        if not include_self:
            found = [n for n in found if n.id != item_id][:k]
        return found

    def memory_bytes_per_vector(self) -> dict[str, float]:
        """Bytes per item of the ScaNN files (what search needs) and of the whole folder."""
        sizes = {name: (self.path / name).stat().st_size for s in self.manifest["shards"] for name in s["files"]}
        n = max(1, len(self))
        scann_bytes = sum(v for name, v in sizes.items() if "scann/" in name)
        return {"index_bytes_per_vector": round(scann_bytes / n, 1), "total_bytes_per_vector": round(sum(sizes.values()) / n, 1)}
