import numpy as np
import pyarrow as pa
import pytest

from lookalike.index.builder import IndexOptions, build_and_publish, build_index
from lookalike.index.exact import exact_topk
from lookalike.index.searcher import ItemIndex
from lookalike.index.updates import IndexUpdateError
from lookalike.model.store import Store


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": [f"item-{i}" for i in range(start, start + n)], "kind": ["image"] * n})


@pytest.mark.parametrize("options", [IndexOptions(), IndexOptions(mode="tree_ah", num_leaves=8), IndexOptions(num_shards=2)],
                         ids=["brute_force", "tree_ah", "two_shards"])
def test_upsert_and_delete_match_a_rebuild_and_survive_publish(tmp_path, options):
    x, new = unit_vectors(300, 8), unit_vectors(20, 8, seed=1)
    store = Store.at(tmp_path)
    v1 = build_and_publish(store, x, table(300), model_version="m", options=options)
    index = ItemIndex.load(store.index_dir(v1))
    assert index.upsert([{"id": f"item-{i}", "kind": "frame"} for i in range(300, 320)], new) == {"inserted": 20, "updated": 0}
    moved = unit_vectors(1, 8, seed=2)
    assert index.upsert(pa.table({"id": ["item-5"], "kind": ["frame"]}), moved) == {"inserted": 0, "updated": 1}
    assert index.delete(["item-0", "item-7", "item-310"]) == 3
    assert len(index) == 317 and index.row_of("item-0") is None and index.row_of("item-310") is None

    def check(ix: ItemIndex) -> None:
        # the same corpus, rebuilt exactly, as the reference
        live = ix.live_rows()  # in memory, rows of deleted and replaced items stay (marked) until save
        assert len(live) == len(ix) == 317 and ix.num_deleted == len(ix.items) - 317
        ids = ix.items.ids()
        assert sorted(ids[r] for r in live) == sorted([f"item-{i}" for i in range(1, 320) if i not in (7, 310)])
        assert ix.items[ix.row_of("item-5")]["kind"] == "frame" and ix.items[ix.row_of("item-301")]["kind"] == "frame"
        assert np.allclose(ix.embeddings[ix.row_of("item-5")], moved[0])
        q = unit_vectors(10, 8, seed=3)
        rows = ix.search_rows(q, 5, leaves_to_search=8, reorder=300)[0]
        truth = live[exact_topk(q, ix.embeddings[live], 5)[0]]
        assert [[ids[r] for r in rr] for rr in rows] == [[ids[r] for r in rr] for rr in truth]  # rows index items/embeddings
        assert ix.search(moved, 1)[0][0].id == "item-5"
        assert ix.similar_to("item-305", 1, include_self=True)[0].id == "item-305"

    check(index)
    v2 = index.publish(store)
    assert store.current_index() == v2 != v1
    reloaded = ItemIndex.load(store.index_dir(v2))
    check(reloaded)
    assert reloaded.manifest["updates"] == {"base_count": 300, "inserted": 20, "updated": 1, "deleted": 3, "parent_version": v1}
    assert len(ItemIndex.load(store.index_dir(v1))) == 300  # the old version is untouched


def test_bad_updates_are_refused_without_changes(tmp_path):
    build_index(unit_vectors(50, 4), table(50), model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    with pytest.raises(KeyError, match="cannot delete unknown item id 'nope'"):
        index.delete(["item-1", "nope"])
    assert len(index) == 50 and index.row_of("item-1") is not None
    with pytest.raises(ValueError, match="item 'x' has NaN"):
        index.upsert([{"id": "x"}], np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="item 'x' is a zero vector"):
        index.upsert([{"id": "x"}], np.zeros((1, 4), np.float32))
    with pytest.raises(IndexUpdateError, match="dim 5, the index holds 4"):
        index.upsert([{"id": "x"}], np.ones((1, 5), np.float32))
    with pytest.raises(IndexUpdateError, match="item id 'x' appears twice in the upsert"):
        index.upsert([{"id": "x"}, {"id": "y"}, {"id": "x"}], unit_vectors(3, 4))
    with pytest.raises(IndexUpdateError, match=r"item 'y': kind=3 is not a string \(the type of the index's 'kind' column\)"):
        index.upsert([{"id": "x", "kind": "image"}, {"id": "y", "kind": 3}], unit_vectors(2, 4))
    with pytest.raises(IndexUpdateError, match="new field 'width' has values of different types"):
        index.upsert([{"id": "x", "width": 3}, {"id": "y", "width": "wide"}], unit_vectors(2, 4))
    with pytest.raises(IndexUpdateError, match="item 0 of the upsert has no id"):
        index.upsert([{"uri": "/a.png"}], unit_vectors(1, 4))
    assert len(index) == 50 and index.health()["changed_fraction"] == 0.0
    with pytest.raises(FileExistsError):
        index.save(tmp_path / "i")


def test_new_fields_of_an_upsert_are_kept_by_publish_and_filterable(tmp_path):
    store = Store.at(tmp_path)
    v1 = build_and_publish(store, unit_vectors(50, 4), table(50), model_version="m")
    index = ItemIndex.load(store.index_dir(v1))
    index.upsert([{"id": "new-1", "kind": "image", "source": "upload", "tags": ["cat", "red"]},
                  {"id": "new-2", "kind": "image", "source": None}], unit_vectors(2, 4, seed=1))
    with pytest.raises(IndexUpdateError, match=r"item 'new-3': source=7 is not a string"):
        index.upsert([{"id": "new-3", "source": 7}], unit_vectors(1, 4, seed=2))
    before = [n.id for n in index.search(unit_vectors(1, 4, seed=1), 5, where={"source": "upload"})[0]]
    reloaded = ItemIndex.load(store.index_dir(index.publish(store)))
    assert before == [n.id for n in reloaded.search(unit_vectors(1, 4, seed=1), 5, where={"source": "upload"})[0]] == ["new-1"]
    assert reloaded.items[reloaded.row_of("new-1")]["tags"] == ["cat", "red"]
    assert reloaded.items[reloaded.row_of("item-3")]["source"] is None


def test_health_reports_drift_and_imbalance(tmp_path):
    x = unit_vectors(2000, 8)
    build_index(x, table(2000), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(mode="tree_ah", num_leaves=20))
    index = ItemIndex.load(tmp_path / "i")
    fresh = index.health()
    assert not fresh["needs_rebuild"] and fresh["changed_fraction"] == 0.0
    assert fresh["partitions"][0]["sum_partition_sizes"] == 2000
    # everything new lands in one corner of the space: a few partitions swell
    corner = x[0] + 0.05 * unit_vectors(800, 8, seed=5)
    index.upsert([{"id": f"new-{i}"} for i in range(800)], corner)
    drifted = index.health()
    assert drifted["needs_rebuild"] and drifted["changed_fraction"] == pytest.approx(0.4)
    assert any("changed since the build" in r for r in drifted["reasons"])
    assert any("partition imbalance" in r for r in drifted["reasons"])
    assert drifted["partitions"][0]["imbalance_growth"] > 1.0


def test_health_notices_when_updates_crowd_a_few_leaves(tmp_path):
    """Spread-out leaves keep their relative imbalance, but a search near the crowded ones scans far more items."""
    x = unit_vectors(10_000, 16)
    build_index(x, table(10_000), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(mode="tree_exact"))
    index = ItemIndex.load(tmp_path / "i")
    assert index.health()["partitions"][0]["scan_growth"] == pytest.approx(1.0)
    crowd = x[0] + 0.02 * unit_vectors(1900, 16, seed=5)
    index.upsert([{"id": f"new-{i}"} for i in range(1900)], crowd / np.linalg.norm(crowd, axis=1, keepdims=True))
    health = index.health()
    assert health["changed_fraction"] < 0.2 and health["partitions"][0]["scan_growth"] > 1.5
    assert any("scans" in r and "as many items per searched leaf" in r for r in health["reasons"]), health["reasons"]


def test_shard_skew_is_reported(tmp_path):
    build_index(unit_vectors(200, 4), table(200), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(num_shards=2))
    index = ItemIndex.load(tmp_path / "i")
    index.delete([f"item-{i}" for i in range(60)])  # all from shard 0
    health = index.health()
    assert health["shard_sizes"] == [40, 100] and health["shard_skew"] == pytest.approx(100 / 70, abs=1e-3)
    index.upsert([{"id": f"n-{i}"} for i in range(30)], unit_vectors(30, 4, seed=9))  # new items fill the small shard
    assert index.health()["shard_sizes"] == [70, 100]


@pytest.mark.parametrize("options", [IndexOptions(num_shards=2), IndexOptions(mode="tree_exact", num_leaves=6, leaves_to_search=6)],
                         ids=["brute_force_two_shards", "tree_exact"])
def test_searches_stay_consistent_while_another_thread_upserts_and_deletes(tmp_path, options):
    """Every result of every concurrent search names a row whose id, embedding and score agree."""
    import threading

    dim, stable = 8, 100  # items 0-99 are never touched: each must always find itself first
    x = unit_vectors(300, dim)
    build_index(x, table(300), model_version="m", out_dir=tmp_path / "i", options=options)
    index = ItemIndex.load(tmp_path / "i")
    known: dict[str, list[np.ndarray]] = {f"item-{i}": [x[i]] for i in range(300)}  # every embedding an id ever had
    done, errors, searches, alive = threading.Event(), [], [0], set(known)

    def writer():
        try:
            for step in range(120):
                fresh = unit_vectors(5, dim, seed=1000 + step)
                new_ids = [f"new-{step}-{j}" for j in range(5)]
                moved_ids = [f"item-{stable + (7 * step + j) % 200}" for j in range(3)]
                moved = unit_vectors(3, dim, seed=2000 + step)
                for i, e in [*zip(new_ids, fresh), *zip(moved_ids, moved)]:
                    known.setdefault(i, []).append(e)
                index.upsert([{"id": i, "kind": f"v{step}"} for i in new_ids + moved_ids], np.concatenate([fresh, moved]))
                alive.update(new_ids + moved_ids)
                gone = [new_ids[0]] + [i for i in [f"item-{stable + (11 * step) % 200}"] if i in alive]
                index.delete(gone)
                alive.difference_update(gone)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"writer: {e!r}")
        finally:
            done.set()

    def reader(seed):
        try:
            read(np.random.default_rng(seed))
        except Exception as e:  # a crashed reader is a failure too
            errors.append(f"reader: {e!r}")

    def read(rng):
        while not done.is_set() or searches[0] < 20:
            probe = rng.integers(0, stable, 4)
            q = x[probe] + 0.3 * rng.normal(size=(4, dim)).astype(np.float32)
            for query, found in zip(q, index.search(q, 5)):
                if len({n.id for n in found}) != len(found):
                    errors.append(f"an id twice in one result: {[n.id for n in found]}")
                for n in found:
                    emb = index.embeddings[n.row]
                    if index.items[n.row]["id"] != n.id:
                        errors.append(f"row {n.row} is {index.items[n.row]['id']!r}, result says {n.id!r}")
                    if not any(np.allclose(emb, e, atol=1e-5) for e in known[n.id]):
                        errors.append(f"row {n.row} holds an embedding {n.id!r} never had")
                    if abs(float(emb @ query) - n.score) > 1e-4:
                        errors.append(f"score {n.score} of {n.id!r} is not its embedding's")
            for i in probe.tolist():
                if index.search(x[i], 1)[0][0].id != f"item-{i}":
                    errors.append(f"untouched item-{i} did not find itself")
            searches[0] += 1

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    assert searches[0] >= 20
    live = index.live_rows()
    assert sorted(index.items[r]["id"] for r in live) == sorted(alive) and len(index) == len(alive)
    q = unit_vectors(20, dim, seed=7)
    ids = index.items.ids()
    truth = live[exact_topk(q, index.embeddings[live], 5)[0]]
    assert [[ids[r] for r in rr] for rr in index.search_rows(q, 5)[0]] == [[ids[r] for r in rr] for rr in truth]


def test_publish_records_each_version_in_the_history(tmp_path):
    """ItemIndex.publish moves CURRENT like a promotion: rollback must find what it served."""
    from lookalike.pipeline.versions import promotion_stack

    store = Store.at(tmp_path)
    a = build_and_publish(store, unit_vectors(40, 8), table(40), model_version="m")
    index = ItemIndex.load(store.index_dir(a))
    index.delete(["item-0"])
    b = index.publish(store)
    index = ItemIndex.load(store.index_dir(b))
    index.upsert(table(1, start=40), unit_vectors(1, 8, seed=3))
    c = index.publish(store)
    assert store.current_index() == c
    assert [e["version"] for e in store.history()] == [a, b, c]
    assert promotion_stack(store) == [a, b, c]


def test_publishing_an_update_fails_while_another_run_holds_the_store(tmp_path):
    from lookalike.model.store_lock import LockHeldError, StoreLock

    store = Store.at(tmp_path)
    a = build_and_publish(store, unit_vectors(40, 8), table(40), model_version="m")
    index = ItemIndex.load(store.index_dir(a))
    index.delete(["item-0"])
    with StoreLock(store.root, purpose="embed"):
        with pytest.raises(LockHeldError, match="embed"):
            index.publish(store)
        assert store.current_index() == a and [p.name for p in store.indexes_dir.iterdir()] == [a]
    b = index.publish(store)
    assert store.current_index() == b != a
