import numpy as np
import pyarrow as pa
import pytest

from lookalike.index.autotune import drop_self, ladder, smallest_meeting
from lookalike.index.builder import IndexOptions, build_index
from lookalike.index.exact import exact_topk, recall_at_k
from lookalike.index.searcher import ItemIndex


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids(n: int) -> pa.Table:
    return pa.table({"id": [f"item-{i}" for i in range(n)]})


def test_exact_topk_matches_argsort_across_blocks():
    x, q = clustered(1000, 8), clustered(7, 8, seed=1)
    rows, scores = exact_topk(q, x, 5, block_rows=64)
    expected = np.argsort(-(q @ x.T), axis=1)[:, :5]
    assert (rows == expected).all()
    assert np.allclose(scores, np.take_along_axis(q @ x.T, expected, axis=1))
    assert exact_topk(q, x[:3], 5)[0].shape == (7, 3)
    scann_rows, scann_scores = exact_topk(q, x, 5, method="scann")  # ScaNN's fused brute force: the same answer
    assert (scann_rows == expected).all() and np.allclose(scann_scores, scores, atol=1e-5)
    with pytest.raises(ValueError, match="unknown exact_topk method 'fast'"):
        exact_topk(q, x, 5, method="fast")


def test_recall_and_helpers():
    truth = np.array([[1, 2], [3, 4]])
    assert recall_at_k(np.array([[2, 1], [3, -1]]), truth) == 0.75
    assert ladder(10, 100) == [10, 15, 22, 34, 51, 76, 100]
    assert ladder(1, 4) == [1, 2, 3, 4]
    assert drop_self(np.array([[5, 1, 2], [1, 2, 3]]), np.array([5, 9]), 2).tolist() == [[1, 2], [1, 2]]


def test_recall_counts_ties_with_the_kth_neighbour():
    """Identical embeddings under other ids (byte-identical files) are exact answers too."""
    from lookalike.index.exact import recall_per_query

    corpus = np.array([[1, 0], [1, 0], [0.8, 0.6], [0, 1]], np.float32)  # rows 0 and 1 are identical
    q = np.array([[1, 0]], np.float32)
    assert recall_per_query(np.array([[1, 2]]), np.array([[0, 2]]), q, corpus).tolist() == [1.0]  # 1 ties with 0
    assert recall_per_query(np.array([[0, 1]]), np.array([[0, 1]]), q, corpus).tolist() == [1.0]
    assert recall_per_query(np.array([[0, 3]]), np.array([[0, 1]]), q, corpus).tolist() == [0.5]  # 3 is worse
    assert recall_per_query(np.array([[0, 0]]), np.array([[0, 1]]), q, corpus).tolist() == [0.5]  # a row counts once
    assert recall_per_query(np.array([[2, -1]]), np.array([[0, 1]]), q, corpus).tolist() == [0.0]


def test_brute_force_on_duplicated_embeddings_reports_full_recall(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x = np.concatenate([x, x[:200]])  # 200 items whose embedding another item has too
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    manifest = build_index(x, pa.table({"id": [f"c{i % 4}/{i}" for i in range(len(x))]}), model_version="m",
                           out_dir=tmp_path / "i")
    assert manifest["build"]["mode"] == "brute_force" and manifest["tuning"]["recall"] == 1.0
    from lookalike.index.evaluate import evaluate_index

    assert evaluate_index(ItemIndex.load(tmp_path / "i"), k=10)["ann_recall_at_10"] == 1.0


@pytest.mark.parametrize("mode", ["tree_exact", "ah", "tree_ah"])
@pytest.mark.parametrize("target", [0.8, 0.99])
def test_autotune_meets_the_recall_target_and_records_it(tmp_path, mode, target):
    both = clustered(4300, 16)
    x, q = both[:4000], both[4000:]  # held-out queries from the same mixture
    options = IndexOptions(mode=mode, num_leaves=40, target_recall=target, tune_queries=200)
    manifest = build_index(x, ids(len(x)), model_version="m", out_dir=tmp_path / "i", options=options)
    tuning = manifest["tuning"]
    assert tuning["target_met"] and tuning["recall"] >= target
    assert tuning["k"] == 10 and tuning["num_queries"] == 200 and tuning["qps"] > 0
    assert manifest["memory"]["index_bytes_per_vector"] > 0
    index = ItemIndex.load(tmp_path / "i")  # the tuned knobs are what search uses by default
    found = index.search_rows(q, 10)[0]
    assert recall_at_k(found, exact_topk(q, x, 10)[0]) >= target - 0.05  # held-out queries: near the corpus-sample estimate
    if mode != "ah":
        assert 1 <= tuning["leaves_to_search"] <= 40
    stricter = [c for c in tuning["candidates"] if c["recall"] >= target]
    assert tuning["qps"] > 0 and stricter


def test_lower_target_searches_less(tmp_path):
    x = clustered(4000, 16)
    low = build_index(x, ids(4000), model_version="m", out_dir=tmp_path / "a",
                      options=IndexOptions(mode="tree_ah", num_leaves=40, target_recall=0.5, tune_queries=200))["tuning"]
    high = build_index(x, ids(4000), model_version="m", out_dir=tmp_path / "b",
                       options=IndexOptions(mode="tree_ah", num_leaves=40, target_recall=0.99, tune_queries=200))["tuning"]
    assert (low["leaves_to_search"], low["reorder"]) < (high["leaves_to_search"], high["reorder"]) or \
        low["leaves_to_search"] * low["reorder"] < high["leaves_to_search"] * high["reorder"]


def test_user_queries_overrides_and_brute_force(tmp_path):
    x = clustered(2000, 16)
    q = clustered(50, 16, seed=3)
    m = build_index(x, ids(2000), model_version="m", out_dir=tmp_path / "a", queries=q,
                    options=IndexOptions(mode="tree_ah", num_leaves=20, leaves_to_search=5, reorder=60))
    assert m["tuning"]["query_source"] == "user" and m["tuning"]["num_queries"] == 50
    assert (m["tuning"]["leaves_to_search"], m["tuning"]["reorder"]) == (5, 60)  # explicit values are kept
    bf = build_index(x, ids(2000), model_version="m", out_dir=tmp_path / "b")
    assert bf["build"]["mode"] == "brute_force" and bf["tuning"]["recall"] == 1.0


def test_unreachable_target_is_flagged_not_hidden(tmp_path):
    x = clustered(3000, 16)
    m = build_index(x, ids(3000), model_version="m", out_dir=tmp_path / "a",
                    options=IndexOptions(mode="tree_ah", num_leaves=30, leaves_to_search=1, reorder=10, target_recall=1.0))
    assert m["tuning"]["target_met"] is False and m["tuning"]["recall"] < 1.0


@pytest.mark.parametrize("first_ok", [0, 1, 5, 37, 99, None])
def test_smallest_meeting_finds_the_first_value_that_meets_with_few_evaluations(first_ok):
    values = list(range(1, 101))
    calls = []

    def evaluate(v):
        calls.append(v)
        ok = first_ok is not None and v >= values[first_ok]
        return {"leaves_to_search": v, "recall": 0.99 if ok else 0.5, "recall_stderr": 0.0}

    pick, tried = smallest_meeting(values, evaluate, 0.9)
    if first_ok is None:
        assert pick is None and all(c["recall"] < 0.9 for c in tried)
    else:
        assert pick["leaves_to_search"] == values[first_ok]
    assert len(calls) == len(set(calls)) <= 2 * 7 + 1  # galloping + bisection, never a linear scan
    assert [c["leaves_to_search"] for c in tried] == sorted(calls)


def test_tree_exact_tunes_to_the_fewest_leaves_that_meet_the_target(tmp_path):
    x = clustered(3000, 16)
    manifest = build_index(x, ids(3000), model_version="m", out_dir=tmp_path / "i",
                           options=IndexOptions(mode="tree_exact", num_leaves=60, target_recall=0.9, tune_queries=200))
    tuning = manifest["tuning"]
    leaves = tuning["leaves_to_search"]
    assert tuning["target_met"] and manifest["build"]["mode"] == "tree_exact" and "reorder" not in manifest["build"]
    by_leaves = {c["leaves_to_search"]: c for c in tuning["candidates"]}
    assert leaves == 1 or (leaves - 1 in by_leaves and by_leaves[leaves - 1]["recall"] - by_leaves[leaves - 1]["recall_stderr"] < 0.9)
    index = ItemIndex.load(tmp_path / "i")
    q = index.embeddings[:50]
    assert recall_at_k(index.search_rows(q, 10, leaves_to_search=60)[0], exact_topk(q, x, 10)[0]) == 1.0  # all leaves: exact


@pytest.mark.parametrize("mode", ["brute_force", "tree_exact", "ah"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_tiny_corpus_publishes_a_searchable_index(tmp_path, mode, n):
    """One item leaves a held-out query no neighbour: tuning is skipped (and recorded as such), not a crash."""
    x = clustered(n, 8, seed=4)
    manifest = build_index(x, ids(n), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(mode=mode))
    tuning = manifest["tuning"]
    assert tuning["target_met"] and tuning["recall"] == 1.0
    assert ("skipped" in tuning) == (n == 1) and tuning["autotuned"] == (n > 1 and mode != "brute_force")
    index = ItemIndex.load(tmp_path / "i")
    found = index.search(x, 10)
    assert [len(f) for f in found] == [n] * n and all(f[0].row == i for i, f in enumerate(found))
    if n == 1:
        assert index.similar_to("item-0", 5) == []
