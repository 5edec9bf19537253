import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lookalike.index.builder import IndexOptions, assemble_index, build_index, build_shard, resolve_options
from lookalike.index.exact import exact_topk
from lookalike.index.manifest import LEGACY_FORMAT, sha256_file
from lookalike.index.searcher import IndexLoadError, ItemIndex
from lookalike.index.shards import deep_leaves, parallel_batch_size


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": [f"item-{i}" for i in range(start, start + n)]})


def test_sharded_search_merges_exactly(tmp_path):
    x = unit_vectors(900, 8)
    m = build_index(x, items(900), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(num_shards=3))
    assert [s["count"] for s in m["shards"]] == [300, 300, 300]
    assert [s["name"] for s in m["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    index = ItemIndex.load(tmp_path / "i")
    q = unit_vectors(20, 8, seed=1)
    rows, scores = index.search_rows(q, 7)
    truth, truth_scores = exact_topk(q, x, 7)
    assert (rows == truth).all() and np.allclose(scores, truth_scores, atol=1e-5)
    assert [n.id for n in index.search(q[0], 7)[0]] == [f"item-{r}" for r in truth[0]]
    assert index.similar_to("item-450", 3)[0].id == f"item-{np.argsort(-(x @ x[450]))[1]}"


def test_shards_built_separately_then_assembled(tmp_path):
    """The pipeline's path: one build_shard per worker, then one assemble_index."""
    x = unit_vectors(600, 8)
    params = resolve_options(600, IndexOptions(num_shards=2))
    out = tmp_path / "i"
    entries = [build_shard(x[:400], items(400), index_dir=out, shard=0, params=params),
               build_shard(x[400:], items(200, 400), index_dir=out, shard=1, params=params)]
    manifest = assemble_index(out, entries, model_version="m", params=params)
    assert manifest["count"] == 600 and manifest["tuning"]["recall"] == 1.0
    index = ItemIndex.load(out)
    assert len(index) == 600 and index.search(x[555], 1)[0][0].id == "item-555"


def edit_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(count=601), r"shard counts \[300, 300\] do not add up to count 601"),
        (lambda m: m["shards"][1].update(count=299) or m.update(count=599), "shard-00001: manifest says 299 x 8"),
        (lambda m: m.update(embed_dim=9), "shard-00000: manifest says 300 x 9"),
        (lambda m: m.update(metric="squared_l2"), "unsupported metric 'squared_l2'"),
        (lambda m: m.pop("model_version"), "required field 'model_version' is missing"),
        (lambda m: m.update(format="other/9"), "unsupported format 'other/9'"),
        (lambda m: m["shards"][0]["files"].pop("shard-00000/items.parquet"), "does not list shard-00000/items.parquet"),
        (lambda m: m["shards"][1]["files"].pop(next(f for f in m["shards"][1]["files"] if f.endswith(".pkl"))),
         r"does not list shard-00001/scann/\w+\.pkl, which ScaNN would load unchecked"),
        (lambda m: m["shards"].pop(), r"shard counts \[300\]"),
    ],
)
def test_manifest_mismatches_are_refused(tmp_path, change, message):
    build_index(unit_vectors(600, 8), items(600), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(num_shards=2))
    edit_manifest(tmp_path / "i", change)
    with pytest.raises(IndexLoadError, match=message):
        ItemIndex.load(tmp_path / "i")


def test_swapped_shard_files_are_refused(tmp_path):
    build_index(unit_vectors(600, 8), items(600), model_version="m", out_dir=tmp_path / "i", options=IndexOptions(num_shards=2))
    a, b = tmp_path / "i" / "shard-00000" / "items.parquet", tmp_path / "i" / "shard-00001" / "items.parquet"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(IndexLoadError, match="shard-00000/items.parquet does not match"):
        ItemIndex.load(tmp_path / "i")

    def fix_checksums(m):
        for s in m["shards"]:
            s["files"] = {k: sha256_file(tmp_path / "i" / k) for k in s["files"]}
    edit_manifest(tmp_path / "i", fix_checksums)  # consistent checksums, inconsistent content
    with pytest.raises(IndexLoadError, match="scann_docids.pkl does not match .*items.parquet"):
        ItemIndex.load(tmp_path / "i")


def test_format_1_single_shard_index_still_loads(tmp_path):
    """Indexes written before shards existed: files at the top of the folder, no docids."""
    import scann

    x = unit_vectors(50, 4)
    out = tmp_path / "old"
    (out / "scann").mkdir(parents=True)
    scann.scann_ops_pybind.builder(x, 10, "dot_product").score_brute_force().build().serialize(str(out / "scann"), relative_path=True)
    pq.write_table(items(50), out / "items.parquet")
    np.save(out / "embeddings.npy", x)
    files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "manifest.json").write_text(json.dumps({
        "format": LEGACY_FORMAT, "model_version": "m", "count": 50, "embed_dim": 4, "metric": "dot_product",
        "build": {"mode": "brute_force"}, "files": files}))
    index = ItemIndex.load(out)
    assert index.similar_to("item-7", 1)[0].id == f"item-{np.argsort(-(x @ x[7]))[1]}"
    with pytest.raises(ValueError, match="built without item docids.*rebuild"):
        index.delete(["item-1"])


@pytest.mark.parametrize("queries, threads, expected", [
    (1000, 2, 500),  # one mini-batch per thread
    (1001, 2, 501),
    (1000, 1, 1000),
    (100, 2, 50),
    (40, 2, 32),  # no mini-batch under 32 queries
    (20, 2, 20),
    (5000, 2, 834),  # 6 equal mini-batches of at most 1,024: each of 2 threads takes 3
    (2048, 2, 1024),
])
def test_parallel_batch_size_gives_every_thread_an_equal_share(queries, threads, expected):
    assert parallel_batch_size(queries, threads) == expected


def test_deep_leaves_widen_only_when_the_tuned_leaves_cannot_hold_the_candidates():
    # 20k items in 283 leaves (~71 each), tuned to 7 leaves: 7 hold ~495 items, enough for 4 x 123 candidates
    assert deep_leaves(7, 123, 20_000, 283) == 7
    assert deep_leaves(7, 1000, 20_000, 283) == 57  # 4,000 candidates need 57 mean leaves
    assert deep_leaves(7, 10_000, 20_000, 283) == 283  # never more leaves than there are
    assert deep_leaves(3, 50, 10, 283) == 10  # a shard smaller than its leaf count: at most one leaf per item
