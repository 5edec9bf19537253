import json
import os

import numpy as np
import pyarrow as pa
import pytest

from lookalike.index.builder import IndexOptions, build_and_publish, build_index, resolve_options
from lookalike.index.searcher import IncompatibleQueryError, IndexLoadError, ItemIndex, QueryError
from lookalike.model.store import Store


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int) -> pa.Table:
    return pa.table({"id": [f"item-{i}" for i in range(n)], "uri": [f"/x/{i}.png" for i in range(n)]})


@pytest.mark.parametrize("mode", ["brute_force", "tree_exact", "ah", "tree_ah"])
def test_every_item_is_its_own_nearest_neighbour(tmp_path, mode):
    emb = unit_vectors(500, 16)
    build_index(emb, items(500), model_version="m-test", out_dir=tmp_path / "i", options=IndexOptions(mode=mode, num_leaves=10, leaves_to_search=10))
    index = ItemIndex.load(tmp_path / "i")
    found = index.search(emb[:50], k=3)
    assert [r[0].id for r in found] == [f"item-{i}" for i in range(50)]
    assert found[0][0].score == pytest.approx(1.0, abs=1e-3)
    assert index.manifest["build"]["mode"] == mode


def test_tree_ah_on_fewer_items_than_ah_centres_builds_brute_force_and_says_why(tmp_path):
    """ScaNN trains 16 AH centres per block on a tree_ah shard: under 16 items it cannot build."""
    emb = unit_vectors(15, 8)
    manifest = build_index(emb, items(15), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(mode="tree_ah"))
    assert manifest["build"]["mode"] == "brute_force" and "at least 16 items per shard" in manifest["build"]["fallback"]
    assert manifest["build"]["requested"]["mode"] == "tree_ah"
    assert [r[0].id for r in ItemIndex.load(tmp_path / "i").search(emb, 1)] == [f"item-{i}" for i in range(15)]
    assert resolve_options(32, IndexOptions(mode="tree_ah", num_shards=2))["mode"] == "tree_ah"
    assert "fallback" not in resolve_options(32, IndexOptions(mode="tree_ah", num_shards=2))


@pytest.mark.parametrize("mode", ["tree_exact", "tree_ah"])
def test_a_short_result_is_padded_not_filled_with_item_zero(tmp_path, mode):
    # one searched leaf of ~12 items cannot give 40 neighbours: ScaNN pads with datapoint 0 and NaN scores
    emb = unit_vectors(300, 8)
    build_index(emb, items(300), model_version="m", out_dir=tmp_path / "i",
                options=IndexOptions(mode=mode, num_leaves=25, leaves_to_search=1, reorder=40, autotune=False))
    index = ItemIndex.load(tmp_path / "i")
    rows, scores = index.search_rows(emb[1:30], 40, leaves_to_search=1)  # as given: not widened
    assert (rows == -1).any()  # some results are short
    for rr, ss in zip(rows, scores):
        found = rr[rr >= 0]
        assert len(set(found.tolist())) == len(found) and np.isfinite(ss[rr >= 0]).all()
        assert (ss[rr < 0] == -np.inf).all()
    for q, found in zip(emb[1:30], index.search(emb[1:30], 40)):  # every neighbour is real: its score is its dot product
        assert [n.score for n in found] == pytest.approx([float(q @ emb[n.row]) for n in found], abs=1e-3)
    assert (index.search_rows(emb[1:30], 40)[0] >= 0).all()  # the tuned leaves are widened: full lists


@pytest.mark.parametrize("mode", ["tree_exact", "tree_ah"])
def test_a_deep_k_gets_k_results_and_k_10_is_unchanged(tmp_path, mode):
    """Leaves tuned for k=10 hold a few hundred items: a deep k searches more leaves, not fewer results."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(30, 16))
    emb = centres[rng.integers(0, 30, 4000)] + 0.4 * rng.normal(size=(4000, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    build_index(emb, items(4000), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(mode=mode))
    index = ItemIndex.load(tmp_path / "i")
    tuned = index.manifest["tuning"]
    q = emb[:40]
    short, _ = index.search_rows(q, 2000, leaves_to_search=tuned["leaves_to_search"])
    assert (short < 0).any()  # what the tuned leaves alone hold: fewer than 2000 items
    for k in (1000, 2000, 3999, 4000, 5000):
        rows, scores = index.search_rows(q, k)
        assert (rows[:, :min(k, 4000)] >= 0).all() and np.isfinite(scores[:, :min(k, 4000)]).all(), k
        assert all(len(set(r.tolist())) == min(k, 4000) for r in rows[:, :min(k, 4000)])
    rows, _ = index.search_rows(q, 2000)
    from lookalike.index.exact import exact_topk, recall_per_query

    assert recall_per_query(rows, exact_topk(q, emb, 2000)[0], q, emb).mean() >= 0.95
    assert [len(f) for f in index.search(q, 2000)] == [2000] * 40
    for k in (10, 11):  # the tuned path: the same leaves, the same answers
        assert (index.search_rows(q, k)[0] == index.search_rows(q, k, leaves_to_search=tuned["leaves_to_search"])[0]).all()


def process_threads() -> int:
    import os
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("mode", ["brute_force", "tree_exact"])
def test_parallel_search_uses_the_calling_thread_plus_n_minus_1_pool_threads(tmp_path, mode):
    emb = unit_vectors(3000, 16)
    build_index(emb, items(3000), model_version="m", out_dir=tmp_path / "i",
                options=IndexOptions(mode=mode, num_leaves=30, leaves_to_search=6, autotune=False))
    index = ItemIndex.load(tmp_path / "i")
    serial_rows, serial_scores = index.search_rows(emb[:700], 10)
    assert index.search_threads == (os.cpu_count() or 1)  # ScaNN's default pool plus the caller: parallel is on
    grown = []
    for _ in range(3):  # another test's thread ending at the same moment would hide one: measure again
        index.set_search_threads(1)
        before = process_threads()
        index.set_search_threads(3)  # ScaNN runs the caller too: a pool of 2, not 3
        grown.append(process_threads() - before)
        if grown[-1] == 1:
            break
    assert grown[-1] == 1, grown
    rows, scores = index.search_rows(emb[:700], 10, parallel=True)
    np.testing.assert_array_equal(rows, serial_rows)
    np.testing.assert_allclose(scores, serial_scores, atol=1e-5)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        index.set_search_threads(0)


def test_similar_to_excludes_the_item_and_unknown_id_raises(tmp_path):
    emb = unit_vectors(50, 8)
    build_index(emb, items(50), model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    sims = index.similar_to("item-3", k=5)
    assert len(sims) == 5 and "item-3" not in [n.id for n in sims]
    exact = np.argsort(-(emb @ emb[3]))[1:6]
    assert [n.row for n in sims] == exact.tolist()
    with pytest.raises(KeyError):
        index.similar_to("nope", 3)


def test_auto_mode_chooses_by_size_and_overrides_win():
    assert resolve_options(1000, IndexOptions())["mode"] == "brute_force"
    medium = resolve_options(50_000, IndexOptions())
    assert medium["mode"] == "tree_exact" and medium["num_leaves"] == 447 and "reorder" not in medium
    big = resolve_options(1_000_000, IndexOptions())
    assert big["mode"] == "tree_ah" and big["num_leaves"] == 1000 and big["ah_dims_per_block"] == 2
    sharded = resolve_options(1_000_000, IndexOptions(num_shards=8))
    assert sharded["mode"] == "tree_exact" and sharded["num_leaves"] == 707
    assert resolve_options(30_000, IndexOptions(mode="ah", ah_dims_per_block=1))["ah_dims_per_block"] == 1
    forced = resolve_options(1000, IndexOptions(mode="tree_ah", num_leaves=7, leaves_to_search=3, reorder=50))
    assert (forced["mode"], forced["num_leaves"], forced["leaves_to_search"], forced["reorder"]) == ("tree_ah", 7, 3, 50)
    assert forced["requested"]["num_leaves"] == 7
    with pytest.raises(ValueError, match="unknown index mode 'fast'"):
        resolve_options(10, IndexOptions(mode="fast"))
    with pytest.raises(ValueError, match="target_recall must be in"):
        resolve_options(10, IndexOptions(target_recall=1.5))
    with pytest.raises(ValueError, match="ah_dims_per_block must be 1, 2 or 4, got 3"):
        resolve_options(10, IndexOptions(ah_dims_per_block=3))


@pytest.mark.parametrize(
    "emb, ids, message",
    [
        (np.full((3, 4), np.nan, np.float32), ["a", "b", "c"], "NaN"),
        (np.zeros((3, 4), np.int64), ["a", "b", "c"], "dtype"),
        (np.zeros((3,), np.float32), ["a", "b", "c"], r"\[N, D\]"),
        (unit_vectors(3, 4), ["a", "b", "a"], "duplicate item id 'a'"),
        (np.array([[1, 0], [0, 0], [0, 1]], np.float32), ["a", "b", "c"], "item 'b' is a zero vector"),
        (np.array([[1, 0], [np.inf, 0]], np.float32), ["a", "b"], "item 'b' has NaN or infinite"),
        (unit_vectors(3, 4), ["a", "", "c"], "row 1 has an empty id"),
    ],
)
def test_bad_builds_are_refused_and_leave_nothing(tmp_path, emb, ids, message):
    with pytest.raises(ValueError, match=message):
        build_and_publish(Store.at(tmp_path), emb, pa.table({"id": ids}), model_version="m")
    assert Store.at(tmp_path).current_index() is None
    assert not list((tmp_path / "indexes").iterdir())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "shard-00000" / "embeddings.npy").write_bytes(b"tampered"), "shard-00000/embeddings.npy.*checksum"),
        (lambda d: (d / "shard-00000" / "items.parquet").unlink(), "shard-00000/items.parquet.*missing"),
        (lambda d: (d / "shard-00000" / "scann" / "dataset.npy").write_bytes(b""), "scann/dataset.npy.*checksum"),
        (lambda d: (d / "manifest.json").write_text("{ truncated"), "manifest.json is not valid JSON"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    ],
)
def test_tampered_or_truncated_index_is_refused(tmp_path, damage, message):
    build_index(unit_vectors(20, 4), items(20), model_version="m", out_dir=tmp_path / "i")
    damage(tmp_path / "i")
    with pytest.raises(IndexLoadError, match=message):
        ItemIndex.load(tmp_path / "i")


def test_query_dimension_and_nan_are_refused(tmp_path):
    build_index(unit_vectors(20, 4), items(20), model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    with pytest.raises(ValueError, match=r"expected \[N, 4\]"):
        index.search(np.zeros((1, 5), np.float32), 3)
    with pytest.raises(QueryError, match="NaN"):
        index.search(np.array([[np.nan, 0, 0, 0]], np.float32), 3)
    with pytest.raises(QueryError, match="zero vector"):
        index.search(np.zeros((1, 4), np.float32), 3)
    with pytest.raises(QueryError, match="dtype <U1"):
        index.search(np.array([["a", "b", "c", "d"]]), 3)


def test_queries_from_another_model_version_are_refused(tmp_path):
    emb = unit_vectors(20, 4)
    build_index(emb, items(20), model_version="m-1", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    assert index.search(emb[:1], 1, model_version="m-1")[0][0].id == "item-0"
    with pytest.raises(IncompatibleQueryError, match="model 'm-2' but index i holds embeddings of model 'm-1'"):
        index.search(emb[:1], 1, model_version="m-2")
    with pytest.raises(IncompatibleQueryError, match=r"expected \[N, 4\]"):
        index.search(np.ones((1, 3), np.float32), 1)
    with pytest.raises(IncompatibleQueryError, match="built from model 'm-1', not 'm-2'"):
        ItemIndex.load(tmp_path / "i", model_version="m-2")


def test_publish_moves_current_atomically(tmp_path):
    store = Store.at(tmp_path)
    v1 = build_and_publish(store, unit_vectors(10, 4), items(10), model_version="m")
    v2 = build_and_publish(store, unit_vectors(10, 4, seed=1), items(10), model_version="m")
    assert store.current_index() == v2 != v1
    assert json.loads((store.index_dir(v1) / "manifest.json").read_text())["count"] == 10


def test_publishing_waits_for_no_one_while_another_run_holds_the_store(tmp_path):
    """A library publish during a reindex (or a publishing embed) must not move CURRENT under it:
    it fails at once naming the holder, having built nothing; a caller holding the lock says so."""
    from lookalike.model.store_lock import LockHeldError, StoreLock

    store = Store.at(tmp_path)
    v1 = build_and_publish(store, unit_vectors(10, 4), items(10), model_version="m")
    with StoreLock(store.root, purpose="reindex"):
        with pytest.raises(LockHeldError, match=r"reindex, pid \d+"):
            build_and_publish(store, unit_vectors(10, 4, seed=1), items(10), model_version="m")
        assert store.current_index() == v1 and [p.name for p in store.indexes_dir.iterdir()] == [v1]
        unserved = build_and_publish(store, unit_vectors(10, 4, seed=1), items(10), model_version="m", make_current=False)
        assert store.current_index() == v1
        held = build_and_publish(store, unit_vectors(10, 4, seed=2), items(10), model_version="m", store_locked=True)
    assert store.current_index() == held not in (v1, unserved)
    assert build_and_publish(store, unit_vectors(10, 4, seed=3), items(10), model_version="m") == store.current_index()


def test_filters_and_crowding_widen_until_k_found(tmp_path):
    emb = unit_vectors(400, 8)
    kinds = ["frame" if i % 40 == 0 else "image" for i in range(400)]  # 10 rare frames
    groups = [f"video-{i % 3}" for i in range(400)]
    table = items(400).append_column("kind", pa.array(kinds)).append_column("group", pa.array(groups))
    build_index(emb, table, model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    frames = index.search(emb[1], k=10, where={"kind": "frame"})[0]
    assert len(frames) == 10 and all(index.items[n.row]["kind"] == "frame" for n in frames)
    scores = [n.score for n in frames]
    assert scores == sorted(scores, reverse=True)
    crowded = index.search(emb[1], k=10, max_per_group=2)[0]
    assert len(crowded) == 6  # 3 groups x 2: the corpus is exhausted before 10
    assert max(sum(index.items[n.row]["group"] == g for n in crowded) for g in set(groups)) == 2
    assert index.search(emb[1], k=5, where={"kind": ["image", "frame"]})[0] == index.search(emb[1], k=5)[0]
    assert index.search(emb[1], k=5, where={"kind": "none"})[0] == []


@pytest.mark.parametrize("mode", ["brute_force", "tree_exact", "tree_ah"])
def test_filters_find_k_on_every_mode_even_outside_the_searched_leaves(tmp_path, mode):
    n = 3000
    emb = unit_vectors(n, 16, seed=3)
    rng = np.random.default_rng(3)
    kinds = np.where(rng.random(n) < 0.01, "frame", "image")  # ~30 rare frames all over the space
    groups = np.where(rng.random(n) < 0.2, "g-wide", np.array([f"g-{i % 50}" for i in range(n)]))  # ~20 %: widening
    table = items(n).append_column("kind", pa.array(kinds.tolist())).append_column("group", pa.array(groups.tolist()))
    build_index(emb, table, model_version="m", out_dir=tmp_path / "i",
                options=IndexOptions(mode=mode, num_leaves=60, leaves_to_search=1, reorder=20, autotune=False))
    index = ItemIndex.load(tmp_path / "i")
    index.delete([f"item-{np.flatnonzero(kinds == 'frame')[0]}"])  # a deleted item is never a result
    query = unit_vectors(1, 16, seed=4)[0]

    def exact(mask: np.ndarray, k: int) -> list[str]:
        live = mask & np.array([not index.is_deleted(r) for r in range(n)])
        rows = np.flatnonzero(live)
        return [f"item-{r}" for r in rows[np.argsort(-(emb[rows] @ query), kind="stable")][:k]]

    frames = index.search(query, k=10, where={"kind": "frame"})[0]
    assert [f.id for f in frames] == exact(kinds == "frame", 10)  # selective: scored exactly
    index.delete([frames[0].id])  # the filter's cached rows follow updates
    frames = index.search(query, k=10, where={"kind": "frame"})[0]
    assert [f.id for f in frames] == exact(kinds == "frame", 10)
    wide = index.search(query, k=25, where={"group": "g-wide"})[0]
    assert len(wide) == 25 and all(index.items[f.row]["group"] == "g-wide" for f in wide)
    assert [f.score for f in wide] == pytest.approx(sorted((float(emb[f.row] @ query) for f in wide), reverse=True), abs=1e-3)
    chosen = [f"item-{i}" for i in range(0, n, 60)]
    assert [f.id for f in index.search(query, k=50, where={"id": chosen})[0]] == exact(np.isin(np.arange(n), range(0, n, 60)), 50)
    crowded = index.search(query, k=60, max_per_group=1)[0]  # 51 groups, the corpus is exhausted before 60
    assert len(crowded) == 51 and len({index.items[f.row]["group"] for f in crowded}) == 51
    frames_per_group = index.search(query, k=10, where={"kind": "frame"}, max_per_group=1)[0]
    assert len({index.items[f.row]["group"] for f in frames_per_group}) == len(frames_per_group) == 10


@pytest.mark.parametrize("where", [None, {"kind": "image"}])
def test_an_excluded_row_takes_no_result_and_no_group_slot(tmp_path, where):
    emb = unit_vectors(2000, 16, seed=5)
    groups = [f"g-{i % 7}" for i in range(2000)]
    table = items(2000).append_column("kind", pa.array(["image"] * 2000)).append_column("group", pa.array(groups))
    build_index(emb, table, model_version="m", out_dir=tmp_path / "i",
                options=IndexOptions(mode="tree_exact", num_leaves=50, leaves_to_search=1, autotune=False))
    index = ItemIndex.load(tmp_path / "i")
    found = index.search(emb[3], k=10, where=where, max_per_group=1, exclude_row=3)[0]
    assert len(found) == 7 and 3 not in [n.row for n in found]  # g-3 still gets its slot, by another item
    assert sorted(index.items[n.row]["group"] for n in found) == sorted(set(groups))
    plain = index.search(emb[3], k=5, exclude_row=3)[0]
    assert len(plain) == 5 and 3 not in [n.row for n in plain]


def test_a_build_failing_late_leaves_nothing(tmp_path):
    """Bad tuning queries are only noticed after the shards are written: the folder must go."""
    with pytest.raises(ValueError, match=r"expected \[N, 4\]"):
        build_index(unit_vectors(30, 4), items(30), model_version="m", out_dir=tmp_path / "i", queries=np.ones((2, 3), np.float32))
    assert not (tmp_path / "i").exists()
    store = Store.at(tmp_path / "s")
    with pytest.raises(ValueError, match="num_shards must be between 1 and the item count 3"):
        build_and_publish(store, unit_vectors(3, 4), items(3), model_version="m", options=IndexOptions(num_shards=4))
    assert store.current_index() is None and not [p for p in store.indexes_dir.iterdir()]


def test_rows_appended_after_a_filter_mask_was_made_are_left_out_not_an_error(tmp_path):
    from lookalike.index.filtered import keep

    emb = unit_vectors(50, 8)
    build_index(emb, items(50), model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    mask = np.ones(50, bool)  # made before an update appended rows 50 and 51
    index.upsert([{"id": "new-a"}, {"id": "new-b"}], unit_vectors(2, 8, seed=1))
    kept = keep(index, np.array([51, 3, 50, 7]), np.array([0.9, 0.8, 0.7, 0.6], np.float32), 3, mask, None, "group")
    assert [n.row for n in kept] == [3, 7]


@pytest.mark.parametrize("mode", ["brute_force", "tree_exact"])
def test_a_list_column_filters_by_membership_on_built_and_upserted_rows(tmp_path, mode):
    n = 3000
    emb = unit_vectors(n, 16, seed=6)
    rng = np.random.default_rng(6)
    vocab = ["cat", "dog", "red", "rare"]
    tags = [[t for t in vocab[:3] if rng.random() < 0.3] + (["rare"] if rng.random() < 0.005 else []) for _ in range(n)]
    tags[7] = None
    table = items(n).append_column("tags", pa.array(tags, pa.list_(pa.string())))
    build_index(emb, table, model_version="m", out_dir=tmp_path / "i",
                options=IndexOptions(mode=mode, num_leaves=60, leaves_to_search=1, autotune=False))
    index = ItemIndex.load(tmp_path / "i")
    query = unit_vectors(1, 16, seed=7)[0]

    def exact(keep, k: int) -> list[str]:
        rows = np.flatnonzero([keep(t) for t in tags])
        return [f"item-{r}" for r in rows[np.argsort(-(emb[rows] @ query), kind="stable")][:k]]

    rare = index.search(query, k=10, where={"tags": "rare"})[0]  # selective: scored exactly
    assert [f.id for f in rare] == exact(lambda t: t is not None and "rare" in t, 10) and rare
    dogs = index.search(query, k=20, where={"tags": "dog"})[0]  # broad: over-fetch and widen
    assert len(dogs) == 20 and all("dog" in index.items[f.row]["tags"] for f in dogs)
    either = index.search(query, k=20, where={"tags": ["rare", "red"]})[0]
    assert all({"rare", "red"} & set(index.items[f.row]["tags"]) for f in either) and len(either) == 20
    assert [f.id for f in index.search(query, k=5, where={"tags": None})[0]] == ["item-7"]
    assert index.search(query, k=5, where={"tags": "absent"})[0] == []
    assert index.search(query, k=5, where={"no_such_column": "x"})[0] == []
    index.upsert([{"id": "new-1", "tags": ["rare", "new"]}, {"id": "new-2", "tags": ["dog"]}, {"id": "new-3", "tags": None}],
                 np.stack([query, query, query]))
    assert index.search(query, k=3, where={"tags": "rare"})[0][0].id == "new-1"
    assert [f.id for f in index.search(query, k=3, where={"tags": "new"})[0]] == ["new-1"]
    from lookalike.index.filtered import live_matches

    assert index.row_of("new-2") in live_matches(index, {"tags": {"dog"}})[1]  # broad: the upserted row passes
    dogs = index.search(query, k=20, where={"tags": "dog"})[0]
    assert len(dogs) == 20 and all("dog" in index.items[f.row]["tags"] for f in dogs)
    if mode == "brute_force":  # a tree searching one leaf need not reach an upserted row's leaf in the first round
        assert dogs[0].id == "new-2"
    assert {f.id for f in index.search(query, k=5, where={"tags": None})[0]} == {"item-7", "new-3"}


def test_tree_leaves_hold_their_items_on_low_rank_embeddings(tmp_path):
    """ScaNN's default min_partition_size (50) is more than the mean leaf here (22): k-means kept
    re-seeding leaves and ended with ~20 % of the items outside their nearest leaf and empty leaves."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3)) @ rng.normal(size=(3, 16)) + 0.05 * rng.normal(size=(2000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    build_index(x, items(2000), model_version="m", out_dir=tmp_path / "i",
                options=IndexOptions(mode="tree_exact", autotune=False))
    index = ItemIndex.load(tmp_path / "i")
    rows, _ = index.search_rows(x, 200, leaves_to_search=1)  # each item's nearest leaf only
    assert (rows[:, 0] == np.arange(2000)).all()  # every item is in its nearest leaf
    assert (rows >= 0).sum(axis=1).min() >= 5  # and no nearest leaf is empty or nearly so


def test_the_manifest_records_a_corpus_inside_the_store_relative_to_it(tmp_path):
    from lookalike.index.manifest import corpus_source, recorded_corpus

    root = tmp_path / "store"
    assert corpus_source(str(root / "corpus"), root) == {"corpus": "corpus"}
    assert corpus_source(str(tmp_path / "photos"), root) == {"corpus": str(tmp_path / "photos")}
    assert corpus_source("gs://bucket/photos", root) == {"corpus": "gs://bucket/photos"}
    moved = tmp_path / "moved"
    assert recorded_corpus({"source": {"corpus": "corpus"}}, moved) == str(moved / "corpus")
    assert recorded_corpus({"source": {"corpus": str(tmp_path / "photos")}}, moved) == str(tmp_path / "photos")
    assert recorded_corpus({"source": {"list_file": "/x.txt"}}, moved) is None and recorded_corpus({}, moved) is None
