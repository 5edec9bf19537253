"""Updates between full rebuilds: upsert and delete items by id, persist, and a health check.

ScaNN searchers built with docids (item ids) accept ``upsert`` and ``delete``; this
mixin keeps ``ItemIndex.items``/``embeddings`` and the shard row maps in step with
them. New items go to the smallest shard; an existing id is updated in its shard.
Updates live in memory until ``save`` (a complete new folder) or ``publish`` (a new
version under ``indexes/`` written atomically, then CURRENT moved): index versions
are immutable, so a server holding the old version is never disturbed and every
checksum in every manifest stays valid. ``health()`` says when the updates have
drifted the partitions enough that a rebuild (retraining the tree and codebooks) is
due. Updates must not run concurrently with searches on the same object.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lookalike.index.manifest import TREE_MODES, file_checksums, publish_atomically, write_manifest
from lookalike.model.store import Store

log = logging.getLogger(__name__)

REBUILD_CHANGED_FRACTION = 0.2  # inserted + updated + deleted, relative to the build
REBUILD_IMBALANCE_GROWTH = 0.25  # growth of ScaNN's partition imbalance since the build
REBUILD_SHARD_SKEW = 1.5  # largest shard / mean shard size


class IndexUpdateError(ValueError):
    """An update cannot be applied; the message names the item or the reason."""


class UpdatableIndex:
    """Mixin for ``ItemIndex``: upsert, delete, save, publish, health."""

    def _check_updatable(self) -> None:
        if not all(s.updatable for s in self.shards):
            raise IndexUpdateError(f"index {self.version} was built without item docids (format 1); rebuild it to enable updates")

    def upsert(self, items: Sequence[Mapping[str, Any]] | pa.Table, embeddings: np.ndarray) -> dict[str, int]:
        """Insert new items or replace existing ones (by ``id``): [M] metadata rows and [M, D] embeddings."""
        from lookalike.index.builder import validate_embeddings

        self._check_updatable()
        rows = items.to_pylist() if isinstance(items, pa.Table) else [dict(i) for i in items]
        ids = [str(r.get("id") or "") for r in rows]
        if "" in ids:
            raise IndexUpdateError(f"item {ids.index('')} of the upsert has no id")
        emb = np.asarray(embeddings)
        if emb.ndim == 2 and emb.shape[1] != self.embed_dim:
            raise IndexUpdateError(f"upsert embeddings have dim {emb.shape[1]}, the index holds {self.embed_dim}")
        emb = validate_embeddings(emb, ids)
        existing = [i for i, item_id in enumerate(ids) if item_id in self._row_of]
        new = [i for i, item_id in enumerate(ids) if item_id not in self._row_of]
        if existing and not self.embeddings.flags.writeable:
            self.embeddings = self.embeddings.copy()
        for i in existing:
            row = self._row_of[ids[i]]
            shard = self.shards[self._shard_of_row[row]]
            shard.searcher.upsert([ids[i]], emb[i:i + 1])
            self.items[row] = {**self.items[row], **rows[i], "id": ids[i]}
            self.embeddings[row] = emb[i]
        if new:
            sizes = np.array([len(s.rows) for s in self.shards])
            targets = []
            for _ in new:
                target = int(np.argmin(sizes))
                sizes[target] += 1
                targets.append(target)
            for number in sorted(set(targets)):
                picked = [i for i, t in zip(new, targets) if t == number]
                self.shards[number].searcher.upsert([ids[i] for i in picked], emb[picked], batch_size=len(picked))
            self.items.extend({**rows[i], "id": ids[i]} for i in new)
            self.embeddings = np.concatenate([self.embeddings, emb[new]])
            self._shard_of_row = np.concatenate([self._shard_of_row, np.array(targets, np.int32)])
        self._record_update(inserted=len(new), updated=len(existing))
        log.info("upserted %d new and %d existing item(s) into index %s", len(new), len(existing), self.version)
        return {"inserted": len(new), "updated": len(existing)}

    def delete(self, item_ids: Sequence[str] | str) -> int:
        """Remove items by id (KeyError naming the first unknown id; nothing is changed then). Returns the count."""
        self._check_updatable()
        ids = [item_ids] if isinstance(item_ids, str) else list(dict.fromkeys(item_ids))
        unknown = [i for i in ids if i not in self._row_of]
        if unknown:
            raise KeyError(f"cannot delete unknown item id {unknown[0]!r} from index {self.version}")
        rows = np.array([self._row_of[i] for i in ids], np.int64)
        for number in sorted(set(self._shard_of_row[rows].tolist())):
            self.shards[number].searcher.delete([i for i, r in zip(ids, rows) if self._shard_of_row[r] == number])
        keep = np.ones(len(self.items), bool)
        keep[rows] = False
        self.items = [item for item, k in zip(self.items, keep) if k]
        self.embeddings = self.embeddings[keep]
        self._shard_of_row = self._shard_of_row[keep]
        self._record_update(deleted=len(ids))
        log.info("deleted %d item(s) from index %s", len(ids), self.version)
        return len(ids)

    def _record_update(self, **counts: int) -> None:
        self._row_of = {item["id"]: i for i, item in enumerate(self.items)}
        for shard in self.shards:
            shard.rows = np.fromiter((self._row_of[d] for d in shard.searcher.docids), np.int64, len(shard.searcher.docids))
        updates = self.manifest.setdefault("updates", {"base_count": len(self.items), "inserted": 0, "updated": 0, "deleted": 0})
        for key, value in counts.items():
            updates[key] = updates.get(key, 0) + value
        self.manifest["count"] = len(self.items)

    def health(self) -> dict[str, Any]:
        """Drift since the last full build and whether a rebuild is due (``needs_rebuild`` with ``reasons``)."""
        updates = self.manifest.get("updates") or {}
        base = max(1, int(updates.get("base_count", len(self.items))))
        changed = (updates.get("inserted", 0) + updates.get("updated", 0) + updates.get("deleted", 0)) / base
        sizes = [len(s.rows) for s in self.shards]
        skew = max(sizes) / max(1e-9, float(np.mean(sizes)))
        reasons = []
        if changed > REBUILD_CHANGED_FRACTION:
            reasons.append(f"{changed:.0%} of the items changed since the build (limit {REBUILD_CHANGED_FRACTION:.0%})")
        if skew > REBUILD_SHARD_SKEW:
            reasons.append(f"largest shard is {skew:.2f}x the mean shard size (limit {REBUILD_SHARD_SKEW})")
        partitions = []
        if self.mode in TREE_MODES:
            built = {e["name"]: e.get("health_at_build") or {} for e in self.manifest["shards"]}
            for shard in self.shards:
                shard.searcher.initialize_health_stats()
                now = shard.searcher.get_health_stats()
                before = built.get(shard.name, {}).get("partition_avg_relative_positive_imbalance", 0.0)
                growth = now["partition_avg_relative_positive_imbalance"] - before
                partitions.append({"shard": shard.name, **now, "imbalance_growth": round(growth, 4)})
                if growth > REBUILD_IMBALANCE_GROWTH:
                    reasons.append(f"partition imbalance of {shard.name} grew by {growth:.2f} (limit {REBUILD_IMBALANCE_GROWTH})")
        return {"version": self.version, "count": len(self.items), "base_count": base, "changed_fraction": round(changed, 4),
                "shard_sizes": sizes, "shard_skew": round(skew, 3), "partitions": partitions,
                "needs_rebuild": bool(reasons), "reasons": reasons}

    def save(self, out_dir: str | Path) -> dict[str, Any]:
        """Write this index, with its updates, as a complete new folder ``out_dir`` (must not exist)."""
        self._check_updatable()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True)
        try:
            schema = pq.read_schema(self.path / self.manifest["shards"][0]["name"] / "items.parquet")
            entries = []
            for shard, old in zip(self.shards, self.manifest["shards"]):
                folder = out_dir / shard.name
                (folder / "scann").mkdir(parents=True)
                shard.searcher.serialize(str(folder / "scann"), relative_path=True)
                rows = np.sort(shard.rows)
                table = pa.Table.from_pylist([self.items[r] for r in rows], schema=schema) if len(rows) else schema.empty_table()
                pq.write_table(table, folder / "items.parquet")
                np.save(folder / "embeddings.npy", np.ascontiguousarray(self.embeddings[rows], np.float32))
                entries.append({**old, "count": int(len(rows)), "files": file_checksums(out_dir, shard.name)})
            manifest = {**self.manifest, "shards": entries, "count": len(self.items), "saved_unix_s": time.time()}
            manifest["updates"] = {**manifest.get("updates", {}), "parent_version": self.version}
            write_manifest(out_dir, manifest)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)  # we created it: leave nothing half-written
            raise
        return manifest

    def publish(self, store: Store, *, make_current: bool = True) -> str:
        """Save as a new version of ``store`` atomically (then move CURRENT); returns the version."""
        version = publish_atomically(store, self.save, make_current=make_current)
        log.info("published updated index %s (from %s)", version, self.version)
        return version
