"""Load a published index version and answer nearest-neighbour queries.

``ItemIndex.load(dir)`` verifies the manifest (format, file checksums, counts,
dimension) before trusting anything, then serves ``search`` by vector and
``similar_to`` by item id. Scores are dot products of unit vectors (cosine
similarity); ``distance = sqrt(2 - 2 * score)`` is the L2 distance the model was
trained on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lookalike.index.builder import FORMAT, MANIFEST, sha256_file

log = logging.getLogger(__name__)


class IndexLoadError(RuntimeError):
    """An index folder is missing, incomplete or tampered with; the message names the file."""


@dataclass(frozen=True)
class Neighbor:
    row: int
    id: str
    score: float  # cosine similarity, higher is closer

    @property
    def distance(self) -> float:
        return float(np.sqrt(max(0.0, 2.0 - 2.0 * self.score)))


class ItemIndex:
    """A loaded index version: ScaNN searcher, item metadata and embeddings."""

    def __init__(self, path: Path, manifest: dict[str, Any], searcher, items: list[dict[str, Any]], embeddings: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.version: str = path.name
        self.model_version: str = manifest["model_version"]
        self.embed_dim: int = int(manifest["embed_dim"])
        self._searcher = searcher
        self.items = items
        self.embeddings = embeddings
        self._row_of = {item["id"]: i for i, item in enumerate(items)}

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def load(cls, path: str | Path, verify_checksums: bool = True) -> "ItemIndex":
        import scann

        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise IndexLoadError(f"{path} is not a complete index: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise IndexLoadError(f"{manifest_path} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise IndexLoadError(f"{manifest_path}: unsupported format {manifest.get('format')!r}")
        for name, digest in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise IndexLoadError(f"index file {file} listed in the manifest is missing")
            if verify_checksums and sha256_file(file) != digest:
                raise IndexLoadError(f"index file {file} does not match its manifest checksum (corrupt or tampered)")
        items = pq.read_table(path / "items.parquet").to_pylist()
        embeddings = np.load(path / "embeddings.npy")
        count, dim = manifest["count"], manifest["embed_dim"]
        if len(items) != count or embeddings.shape != (count, dim):
            raise IndexLoadError(
                f"{path}: manifest says {count} x {dim} but found {len(items)} items and embeddings {embeddings.shape}"
            )
        searcher = scann.scann_ops_pybind.load_searcher(str(path / "scann"))
        log.info("loaded index %s: %d items, dim %d, model %s", path.name, count, dim, manifest["model_version"])
        return cls(path, manifest, searcher, items, embeddings)

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.embed_dim:
            raise ValueError(f"expected [N, {self.embed_dim}] float32 query embeddings, got shape {np.shape(queries)}")
        if not np.isfinite(q).all():
            raise ValueError("query embedding has NaN or infinite values")
        return q

    def _raw_search(self, q: np.ndarray, count: int) -> list[list[Neighbor]]:
        count = max(1, min(int(count), len(self.items)))
        rows, scores = self._searcher.search_batched(q, final_num_neighbors=count)
        return [
            [Neighbor(int(r), self.items[int(r)]["id"], float(s)) for r, s in zip(rr, ss) if 0 <= int(r) < len(self.items)]
            for rr, ss in zip(np.asarray(rows), np.asarray(scores))
        ]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        where: Mapping[str, Any] | None = None,
        max_per_group: int | None = None,
        group_by: str = "group",
    ) -> list[list[Neighbor]]:
        """[Q, D] queries -> Q lists of the k nearest items, best first.

        ``where`` keeps items whose metadata column equals the value (or is in the
        list of values), e.g. ``{"kind": "frame"}``; ``max_per_group`` keeps at most M
        results per value of ``group_by`` (an item without that column is its own
        group). Both are done by over-fetching and filtering, widening the fetch
        until k results are found or the corpus is exhausted.
        """
        q = self.check_queries(queries)
        if not where and not max_per_group:
            return self._raw_search(q, k)
        if max_per_group is not None and max_per_group < 1:
            raise ValueError(f"max_per_group must be at least 1, got {max_per_group}")
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
