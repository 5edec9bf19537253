"""Load a published index version and answer nearest-neighbour queries across its shards.

``ItemIndex.load(dir)`` verifies the manifest (format, shard list, counts, dim, metric,
file checksums) before trusting anything, then serves ``search`` by vector and
``similar_to`` by item id. Each shard is a ScaNN searcher; a query fans out to the
shards in parallel (ScaNN releases the GIL) and the per-shard top-k lists are merged
exactly. Scores are dot products of unit vectors (cosine similarity);
``distance = sqrt(2 - 2 * score)`` is the L2 distance the model was trained on.
Rows (``Neighbor.row``) index ``items`` and ``embeddings`` of this loaded object; they
change when items are deleted, item ids never do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lookalike.index.manifest import REORDER_MODES, TREE_MODES, IndexLoadError, read_manifest, verify_files
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
        return float(np.sqrt(max(0.0, 2.0 - 2.0 * self.score)))


@dataclass
class Shard:
    """One ScaNN searcher and the map from its internal indices to rows of the ``ItemIndex``."""

    name: str
    searcher: Any  # scann_ops_pybind.ScannSearcher
    rows: np.ndarray  # int64 [searcher size]

    @property
    def updatable(self) -> bool:
        return self.searcher.docids is not None


class ItemIndex(UpdatableIndex):
    """A loaded index version: ScaNN shards, item metadata ([N] dicts) and embeddings ([N, D] float32)."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Shard], items: list[dict[str, Any]],
                 embeddings: np.ndarray, shard_of_row: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.version: str = path.name
        self.model_version: str = manifest["model_version"]
        self.embed_dim: int = int(manifest["embed_dim"])
        self.shards = shards
        self.items = items
        self.embeddings = embeddings
        self._shard_of_row = shard_of_row
        self._row_of = {item["id"]: i for i, item in enumerate(items)}
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def mode(self) -> str:
        return self.manifest.get("build", {}).get("mode", "brute_force")

    @classmethod
    def load(cls, path: str | Path, verify_checksums: bool = True, *, model_version: str | None = None) -> "ItemIndex":
        """Load and verify an index folder; ``model_version`` (if given) must match the manifest's."""
        import scann

        path = Path(path)
        manifest = read_manifest(path)
        if model_version is not None and manifest["model_version"] != model_version:
            raise IncompatibleQueryError(
                f"index {path} was built from model {manifest['model_version']!r}, not {model_version!r}")
        verify_files(path, manifest, verify_checksums)
        dim = int(manifest["embed_dim"])
        shards, all_items, all_emb, shard_of = [], [], [], []
        for number, entry in enumerate(manifest["shards"]):
            folder = path / entry["name"]
            items = pq.read_table(folder / "items.parquet").to_pylist()
            try:
                emb = np.load(folder / "embeddings.npy", allow_pickle=False)
            except ValueError as e:
                raise IndexLoadError(f"index file {folder / 'embeddings.npy'} is not a valid array: {e}") from None
            if len(items) != entry["count"] or emb.shape != (entry["count"], dim) or emb.dtype != np.float32:
                raise IndexLoadError(
                    f"{folder}: manifest says {entry['count']} x {dim} float32 but found {len(items)} items and "
                    f"embeddings {emb.shape} {emb.dtype}")
            searcher = scann.scann_ops_pybind.load_searcher(str(folder / "scann"))
            if searcher.size() != entry["count"]:
                raise IndexLoadError(f"{folder / 'scann'}: searcher holds {searcher.size()} items, manifest says {entry['count']}")
            offset = len(all_items)
            local = {item["id"]: offset + i for i, item in enumerate(items)}
            if searcher.docids is None:
                rows = np.arange(offset, offset + len(items), dtype=np.int64)
            else:
                missing = [d for d in searcher.docids if d not in local]
                if missing or len(searcher.docids) != len(items):
                    raise IndexLoadError(f"{folder / 'scann' / 'scann_docids.pkl'} does not match {folder / 'items.parquet'} "
                                         f"(e.g. unknown id {missing[:1]})")
                rows = np.fromiter((local[d] for d in searcher.docids), np.int64, len(items))
            shards.append(Shard(entry["name"], searcher, rows))
            all_items.extend(items)
            all_emb.append(emb)
            shard_of.append(np.full(len(items), number, np.int32))
        ids = [item["id"] for item in all_items]
        if len(set(ids)) != len(ids):
            raise IndexLoadError(f"{path}: an item id appears in more than one shard")
        embeddings = np.concatenate(all_emb) if len(all_emb) > 1 else all_emb[0]
        log.info("loaded index %s: %d items in %d shard(s), dim %d, model %s",
                 path.name, len(ids), len(shards), dim, manifest["model_version"])
        return cls(path, manifest, shards, all_items, embeddings, np.concatenate(shard_of))

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
        manifest; ``parallel`` lets ScaNN split a batch over its threads.
        """
        tuning = self.manifest.get("tuning") or {}
        leaves = leaves_to_search if leaves_to_search is not None else tuning.get("leaves_to_search")
        reorder = reorder if reorder is not None else tuning.get("reorder")
        k = max(1, int(k))
        jobs = [(s, queries, k, leaves, reorder, parallel) for s in self.shards if len(s.rows)]
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
                      parallel: bool) -> tuple[np.ndarray, np.ndarray]:
        count = min(k, len(shard.rows))
        pre = -1 if reorder is None or self.mode not in REORDER_MODES else max(int(reorder), count)
        leaves = -1 if leaves is None or self.mode not in TREE_MODES else int(leaves)
        idx, dist = shard.searcher.searcher.search_batched(q, count, pre, leaves, parallel, 256)
        idx, dist = np.asarray(idx, np.int64), np.asarray(dist, np.float32)
        valid = (idx >= 0) & (idx < len(shard.rows))
        rows = np.where(valid, shard.rows[np.clip(idx, 0, len(shard.rows) - 1)], -1)
        return rows, np.where(valid, dist, -np.inf).astype(np.float32)

    def _raw_search(self, q: np.ndarray, count: int) -> list[list[Neighbor]]:
        rows, scores = self.search_rows(q, min(int(count), len(self.items)))
        return [[Neighbor(int(r), self.items[int(r)]["id"], float(s)) for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(rows, scores)]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        where: Mapping[str, Any] | None = None,
        max_per_group: int | None = None,
        group_by: str = "group",
        model_version: str | None = None,
    ) -> list[list[Neighbor]]:
        """[Q, D] queries -> Q lists of the k nearest items, best first.

        ``model_version`` (recommended) is the model that embedded the queries; a
        mismatch with the index raises ``IncompatibleQueryError``. ``where`` keeps items
        whose metadata column equals the value (or is in the list of values), e.g.
        ``{"kind": "frame"}``; ``max_per_group`` keeps at most M results per value of
        ``group_by`` (an item without that column is its own group). Both are done by
        over-fetching and filtering, widening the fetch until k results are found or
        the corpus is exhausted.
        """
        q = self.check_queries(queries, model_version=model_version)
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        zero = np.flatnonzero(np.linalg.norm(q, axis=1) == 0)
        if len(zero):
            raise QueryError(f"query embedding {zero[0]} is a zero vector and has no direction")
        if not self.items:
            return [[] for _ in q]
        if not where and not max_per_group:
            return self._raw_search(q, k)
        if max_per_group is not None and max_per_group < 1:
            raise QueryError(f"max_per_group must be at least 1, got {max_per_group}")
        accept = {key: set(v) if isinstance(v, (list, tuple, set)) else {v} for key, v in (where or {}).items()}
        out = []
        for query in q:
            fetch = max(4 * k, 32)
            while True:
                found = self._raw_search(query[None, :], fetch)[0]
                kept = self._filter(found, k, accept, max_per_group, group_by)
                if len(kept) >= k or fetch >= len(self.items):
                    break
                fetch *= 4
            out.append(kept)
        return out

    def _filter(
        self, found: list[Neighbor], k: int, accept: dict[str, set], max_per_group: int | None, group_by: str
    ) -> list[Neighbor]:
        kept: list[Neighbor] = []
        per_group: dict[Any, int] = {}
        for n in found:
            item = self.items[n.row]
            if any(item.get(key) not in values for key, values in accept.items()):
                continue
            if max_per_group:
                group = item.get(group_by) or item["id"]
                if per_group.get(group, 0) >= max_per_group:
                    continue
                per_group[group] = per_group.get(group, 0) + 1
            kept.append(n)
            if len(kept) == k:
                break
        return kept

    def row_of(self, item_id: str) -> int | None:
        return self._row_of.get(item_id)

    def similar_to(self, item_id: str, k: int, include_self: bool = False) -> list[Neighbor]:
        """The k nearest items to a stored item; KeyError if the id is unknown."""
        row = self._row_of.get(item_id)
        if row is None:
            raise KeyError(item_id)
        found = self.search(self.embeddings[row], k + (0 if include_self else 1))[0]
        if not include_self:
            found = [n for n in found if n.row != row][:k]
        return found

    def memory_bytes_per_vector(self) -> dict[str, float]:
        """Bytes per item of the ScaNN files (what search needs) and of the whole folder."""
        sizes = {name: (self.path / name).stat().st_size for s in self.manifest["shards"] for name in s["files"]}
        n = max(1, len(self.items))
        scann_bytes = sum(v for name, v in sizes.items() if "scann/" in name)
        return {"index_bytes_per_vector": round(scann_bytes / n, 1), "total_bytes_per_vector": round(sum(sizes.values()) / n, 1)}
