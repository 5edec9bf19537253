"""Updates between full rebuilds: upsert and delete items by id, persist, and a health check.

ScaNN searchers built with docids (item ids) accept upserts and deletes of datapoints;
this mixin drives the raw searcher with datapoint indices and keeps the map between
them and ``ItemIndex`` rows itself, in numpy (ScaNN's Python wrapper keeps a dict per
item, which costs seconds per million items at load). New items go to the smallest
shard; an existing id is updated in its shard. Rows are immutable: an upsert appends a
row (the old row of an updated id is marked deleted), a delete marks its row deleted,
so rows handed out by concurrent searches stay valid. Updates take the index's write
lock, searches its read lock: they may run on different threads at once. Updates live
in memory until ``save`` (a complete new folder, compacted) or ``publish`` (a new version
under ``indexes/`` written atomically, then CURRENT moved): index versions are
immutable, so a server holding the old version is never disturbed and every checksum in
every manifest stays valid. ``health()`` says when the updates have drifted the
partitions enough that a rebuild (retraining the tree and codebooks) is due.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lookalike.index.manifest import TREE_MODES, file_checksums, publish_atomically, write_manifest
from lookalike.index.rows import write_items_parquet
from lookalike.index.writes import save_array, save_searcher
from lookalike.model.store import Store

log = logging.getLogger(__name__)

REBUILD_CHANGED_FRACTION = 0.2  # inserted + updated + deleted, relative to the build
REBUILD_IMBALANCE_GROWTH = 0.25  # growth of ScaNN's partition imbalance since the build
REBUILD_SHARD_SKEW = 1.5  # largest shard / mean shard size
# Items a search scans per searched leaf (1 + ScaNN's size-weighted partition imbalance),
# relative to the build: updates crowding into a few leaves make every query near them slower.
REBUILD_SCAN_GROWTH = 1.5


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
        if len(set(ids)) < len(ids):
            seen: set[str] = set()
            twice = next(i for i in ids if i in seen or seen.add(i))
            raise IndexUpdateError(f"item id {twice!r} appears twice in the upsert")
        emb = np.asarray(embeddings)
        if emb.ndim == 2 and emb.shape[1] != self.embed_dim:
            raise IndexUpdateError(f"upsert embeddings have dim {emb.shape[1]}, the index holds {self.embed_dim}")
        emb = validate_embeddings(emb, ids)
        with self._lock.write():
            try:
                self.items.check_new_rows([{**r, "id": i} for r, i in zip(rows, ids)])
            except ValueError as e:
                raise IndexUpdateError(f"upsert into index {self.version}: {e}") from None
            row_of = self._id_map(write_locked=True)
            old_rows = np.array([row_of.get(i, -1) for i in ids], np.int64)
            first = len(self.items)
            new_rows = np.arange(first, first + len(ids), dtype=np.int64)
            shard_of_row, slot_of_row = self._shard_of_row.view(), self._slot_of_row.view()
            targets = np.where(old_rows >= 0, shard_of_row[np.maximum(old_rows, 0)], -1).astype(np.int32)
            sizes = np.array([len(s.rows) for s in self.shards])
            for i in np.flatnonzero(targets < 0):  # new ids fill the smallest shard
                targets[i] = int(np.argmin(sizes))
                sizes[targets[i]] += 1
            slots = np.empty(len(ids), np.int64)
            for number in np.unique(targets).tolist():
                shard, picked = self.shards[number], np.flatnonzero(targets == number)
                old_slots = [int(slot_of_row[r]) if r >= 0 else None for r in old_rows[picked]]
                shard.searcher.upsert(old_slots, emb[picked], len(picked))  # None: appended, in order
                appended = np.cumsum([s is None for s in old_slots]) - 1 + len(shard.rows)
                slots[picked] = [s if s is not None else int(a) for s, a in zip(old_slots, appended)]
                shard_rows = np.concatenate([shard.rows, np.full(int(sum(s is None for s in old_slots)), -1, np.int64)])
                shard_rows[slots[picked]] = new_rows[picked]
                shard.rows = shard_rows
            for item, item_id in zip(rows, ids):
                self.items.append({**item, "id": item_id})
            self._emb.extend(emb)
            self._shard_of_row.extend(targets)
            self._slot_of_row.extend(slots)
            replaced = old_rows[old_rows >= 0]
            self._slot_of_row.set(replaced, -1)
            row_of.update(zip(ids, new_rows.tolist()))
            self._live += len(ids) - len(replaced)
            self._record_update(inserted=len(ids) - len(replaced), updated=len(replaced))
        log.info("upserted %d new and %d existing item(s) into index %s", len(ids) - len(replaced), len(replaced), self.version)
        return {"inserted": len(ids) - len(replaced), "updated": len(replaced)}

    def delete(self, item_ids: Sequence[str] | str) -> int:
        """Remove items by id (KeyError naming the first unknown id; nothing is changed then). Returns the count."""
        self._check_updatable()
        ids = [item_ids] if isinstance(item_ids, str) else list(dict.fromkeys(item_ids))
        with self._lock.write():
            row_of = self._id_map(write_locked=True)
            unknown = [i for i in ids if i not in row_of]
            if unknown:
                raise KeyError(f"cannot delete unknown item id {unknown[0]!r} from index {self.version}")
            rows = np.array([row_of[i] for i in ids], np.int64)
            shard_of_row = self._shard_of_row.view()
            for number in np.unique(shard_of_row[rows]).tolist():
                self._delete_from_shard(self.shards[number], rows[shard_of_row[rows] == number])
            self._slot_of_row.set(rows, -1)
            for i in ids:
                del row_of[i]
            self._live -= len(ids)
            self._record_update(deleted=len(ids))
        log.info("deleted %d item(s) from index %s", len(ids), self.version)
        return len(ids)

    def _delete_from_shard(self, shard: Any, rows: np.ndarray) -> None:
        """ScaNN deletes datapoint by datapoint, each time moving its last datapoint into the hole: mirror that."""
        shard_rows, slot_of_row = shard.rows.copy(), self._slot_of_row
        slots, size = [], len(shard_rows)
        for row in rows.tolist():
            slot = int(slot_of_row.view()[row])
            slots.append(slot)
            size -= 1
            if slot != size:
                moved = int(shard_rows[size])
                shard_rows[slot] = moved
                slot_of_row.set(moved, slot)
        shard.searcher.delete(slots)
        shard.rows = shard_rows[:size]

    def _record_update(self, **counts: int) -> None:
        updates = self.manifest.setdefault("updates", {"base_count": len(self), "inserted": 0, "updated": 0, "deleted": 0})
        for key, value in counts.items():
            updates[key] = updates.get(key, 0) + value
        self.manifest["count"] = len(self)

    def health(self) -> dict[str, Any]:
        """Drift since the last full build and whether a rebuild is due (``needs_rebuild`` with ``reasons``)."""
        updates = self.manifest.get("updates") or {}
        base = max(1, int(updates.get("base_count", len(self))))
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
                with self._lock.write():  # recomputes ScaNN's statistics: not while it searches
                    shard.searcher.initialize_health_stats()
                    now = shard.searcher.get_health_stats()
                at_build = built.get(shard.name, {})
                growth = now["partition_avg_relative_positive_imbalance"] - at_build.get("partition_avg_relative_positive_imbalance", 0.0)
                scan_growth = ((1 + now["partition_weighted_avg_relative_imbalance"])
                               / (1 + at_build.get("partition_weighted_avg_relative_imbalance", 0.0)))
                partitions.append({"shard": shard.name, **now, "imbalance_growth": round(growth, 4),
                                   "scan_growth": round(scan_growth, 3)})
                if growth > REBUILD_IMBALANCE_GROWTH:
                    reasons.append(f"partition imbalance of {shard.name} grew by {growth:.2f} (limit {REBUILD_IMBALANCE_GROWTH})")
                if scan_growth > REBUILD_SCAN_GROWTH:
                    reasons.append(f"a search of {shard.name} scans {scan_growth:.2f}x as many items per searched leaf as "
                                   f"at build (limit {REBUILD_SCAN_GROWTH}x)")
        return {"version": self.version, "count": len(self), "base_count": base, "changed_fraction": round(changed, 4),
                "shard_sizes": sizes, "shard_skew": round(skew, 3), "partitions": partitions,
                "needs_rebuild": bool(reasons), "reasons": reasons}

    def save(self, out_dir: str | Path) -> dict[str, Any]:
        """Write this index, with its updates, as a complete new folder ``out_dir`` (must not exist).

        Deleted rows are left out (the saved index is compact); searches may go on meanwhile.
        """
        self._check_updatable()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True)
        try:
            with self._lock.read():  # a consistent snapshot: no update runs while it is written
                entries = [self._save_shard(out_dir, shard, old) for shard, old in zip(self.shards, self.manifest["shards"])]
                manifest = {**self.manifest, "shards": entries, "count": len(self), "saved_unix_s": time.time()}
            manifest["updates"] = {**manifest.get("updates", {}), "parent_version": self.version}
            write_manifest(out_dir, manifest)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)  # we created it: leave nothing half-written
            raise
        return manifest

    def _save_shard(self, out_dir: Path, shard: Any, old: dict[str, Any]) -> dict[str, Any]:
        folder = out_dir / shard.name
        save_searcher(shard.searcher, folder / "scann")
        with (folder / "scann" / "scann_docids.pkl").open("wb") as f:  # ScaNN's own docid file format
            pickle.dump(self.items.ids_of(shard.rows), f)
        rows = np.sort(shard.rows)
        write_items_parquet(self.items.take(rows), folder / "items.parquet")
        save_array(folder / "embeddings.npy", np.ascontiguousarray(self.embeddings[rows], np.float32))
        return {**old, "count": int(len(rows)), "files": file_checksums(out_dir, shard.name)}

    def publish(self, store: Store, *, make_current: bool = True, store_locked: bool = False) -> str:
        """Save as a new version of ``store`` atomically (then move CURRENT, recorded in the
        store's history so rollback returns to it, under the store lock unless ``store_locked``
        says the caller holds it: ``index.manifest.publish_atomically``); returns the version."""
        version = publish_atomically(store, self.save, make_current=make_current,
                                     reason=f"publish: updated from {self.version}", store_locked=store_locked)
        log.info("published updated index %s (from %s)", version, self.version)
        return version
