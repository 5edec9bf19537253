import json

import numpy as np
import pyarrow as pa
import pytest

from lookalike.index.builder import IndexOptions, build_and_publish, build_index, resolve_options
from lookalike.index.searcher import IndexLoadError, ItemIndex
from lookalike.model.store import Store


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int) -> pa.Table:
    return pa.table({"id": [f"item-{i}" for i in range(n)], "uri": [f"/x/{i}.png" for i in range(n)]})


@pytest.mark.parametrize("mode", ["brute_force", "tree_ah"])
def test_every_item_is_its_own_nearest_neighbour(tmp_path, mode):
    emb = unit_vectors(500, 16)
    build_index(emb, items(500), model_version="m-test", out_dir=tmp_path / "i", options=IndexOptions(mode=mode, num_leaves=10, leaves_to_search=10))
    index = ItemIndex.load(tmp_path / "i")
    found = index.search(emb[:50], k=3)
    assert [r[0].id for r in found] == [f"item-{i}" for i in range(50)]
    assert found[0][0].score == pytest.approx(1.0, abs=1e-3)
    assert index.manifest["build"]["mode"] == mode


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


def test_auto_mode_chooses_by_size():
    assert resolve_options(1000, IndexOptions())["mode"] == "brute_force"
    big = resolve_options(1_000_000, IndexOptions())
    assert big["mode"] == "tree_ah" and big["num_leaves"] == 1000


@pytest.mark.parametrize(
    "emb, ids, message",
    [
        (np.full((3, 4), np.nan, np.float32), ["a", "b", "c"], "NaN"),
        (np.zeros((3, 4), np.int64), ["a", "b", "c"], "dtype"),
        (np.zeros((3,), np.float32), ["a", "b", "c"], r"\[N, D\]"),
        (unit_vectors(3, 4), ["a", "b", "a"], "duplicate item id 'a'"),
    ],
)
def test_bad_builds_are_refused_and_leave_nothing(tmp_path, emb, ids, message):
    with pytest.raises(ValueError, match=message):
        build_and_publish(Store.at(tmp_path), emb, pa.table({"id": ids}), model_version="m")
    assert Store.at(tmp_path).current_index() is None
    assert not list((tmp_path / "indexes").iterdir())


def test_tampered_or_truncated_index_is_refused(tmp_path):
    build_index(unit_vectors(20, 4), items(20), model_version="m", out_dir=tmp_path / "i")
    (tmp_path / "i" / "embeddings.npy").write_bytes(b"tampered")
    with pytest.raises(IndexLoadError, match="embeddings.npy"):
        ItemIndex.load(tmp_path / "i")
    build_index(unit_vectors(20, 4), items(20), model_version="m", out_dir=tmp_path / "j")
    (tmp_path / "j" / "items.parquet").unlink()
    with pytest.raises(IndexLoadError, match="items.parquet.*missing"):
        ItemIndex.load(tmp_path / "j")


def test_query_dimension_and_nan_are_refused(tmp_path):
    build_index(unit_vectors(20, 4), items(20), model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    with pytest.raises(ValueError, match=r"expected \[N, 4\]"):
        index.search(np.zeros((1, 5), np.float32), 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.array([[np.nan, 0, 0, 0]], np.float32), 3)


def test_publish_moves_current_atomically(tmp_path):
    store = Store.at(tmp_path)
    v1 = build_and_publish(store, unit_vectors(10, 4), items(10), model_version="m")
    v2 = build_and_publish(store, unit_vectors(10, 4, seed=1), items(10), model_version="m")
    assert store.current_index() == v2 != v1
    assert json.loads((store.index_dir(v1) / "manifest.json").read_text())["count"] == 10


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
