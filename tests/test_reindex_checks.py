"""The reindex job's checks: canary queries, the frozen evaluation set. Real indexes
(ScaNN, tiny) and real image files; the end-to-end runs are in test_reindex.py."""

import json

import numpy as np
import pyarrow as pa
from PIL import Image

from lookalike.index.builder import build_and_publish
from lookalike.index.searcher import ItemIndex
from lookalike.model.store import Store
from lookalike.pipeline.reindex_checks import canary_ids, canary_overlap, canary_self_retrieval, frozen_eval_set


def unit_vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(store: Store, ids: list[str], vectors: np.ndarray) -> ItemIndex:
    items = pa.table({"id": ids, "kind": ["image"] * len(ids)})
    version = build_and_publish(store, vectors, items, model_version="m", make_current=False)
    return ItemIndex.load(store.index_dir(version))


def test_canaries_gone_from_the_corpus_are_picked_again(tmp_path, caplog):
    store = Store.at(tmp_path)
    x = unit_vectors(60)
    old = make_index(store, [f"a/{i}" for i in range(60)], x)
    first = canary_ids(store, [old, old], count=5)
    assert len(first) == 5 and json.loads((tmp_path / "eval" / "canaries.json").read_text())["ids"] == first
    renamed = make_index(store, [f"a/{i}" if i >= 40 else f"b/{i}" for i in range(60)], x)  # most canaries gone
    with caplog.at_level("WARNING"):
        again = canary_ids(store, [old, renamed], count=5)
    assert sum(renamed.row_of(i) is not None for i in first) == 2  # of 5: fewer than half are left
    assert again != first and all(old.row_of(i) is not None and renamed.row_of(i) is not None for i in again)
    assert "2 of 5 left" in caplog.text and "picked 5 new" in caplog.text
    assert json.loads((tmp_path / "eval" / "canaries.json").read_text())["ids"] == again
    assert canary_overlap(store, old, renamed, k=5, count=5) is not None


def test_no_canary_left_when_the_indexes_share_no_item(tmp_path):
    store = Store.at(tmp_path)
    old = make_index(store, [f"a/{i}" for i in range(30)], unit_vectors(30))
    new = make_index(store, [f"b/{i}" for i in range(30)], unit_vectors(30))
    assert canary_ids(store, [old, new], count=5) == []
    assert canary_overlap(store, old, new, k=5, count=5) is None


def test_self_retrieval_passes_a_sane_index_and_fails_a_collapsed_model(tmp_path):
    store = Store.at(tmp_path)
    ids = [f"a/{i}" for i in range(50)]
    assert canary_self_retrieval(store, make_index(store, ids, unit_vectors(50)), count=10) == 1.0
    collapsed = np.tile(unit_vectors(1), (50, 1)) + 1e-4 * unit_vectors(50, seed=1)  # everything alike
    collapsed /= np.linalg.norm(collapsed, axis=1, keepdims=True)
    (tmp_path / "eval" / "canaries.json").unlink()
    assert canary_self_retrieval(store, make_index(store, ids, collapsed.astype(np.float32)), count=10) < 0.9


def write_corpus(root, per_class: int, classes: int = 2, start: int = 0) -> None:
    for c in range(classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.new("L", (8, 8), (37 * i + 90 * c) % 256).save(root / str(c) / f"{i}.png")


def test_frozen_set_grows_back_when_the_corpus_does(tmp_path):
    store, corpus = Store.at(tmp_path / "store"), tmp_path / "corpus"
    write_corpus(corpus, per_class=4)  # the corpus had mostly vanished when the set was made
    small = frozen_eval_set(store, corpus, per_class=10)
    assert len(small) <= 8
    write_corpus(corpus, per_class=36, start=4)  # it came back
    grown = frozen_eval_set(store, corpus, per_class=10)
    assert len(grown) == 20 and json.loads((store.root / "eval" / "frozen.json").read_text())["ids"] == grown
    assert frozen_eval_set(store, corpus, per_class=10) == grown  # and then stays frozen


def test_frozen_set_is_at_most_half_of_each_class_and_marked_held_out(tmp_path):
    store, corpus = Store.at(tmp_path / "store"), tmp_path / "corpus"
    write_corpus(corpus, per_class=6)
    ids = frozen_eval_set(store, corpus, per_class=10)
    assert sorted(i.split("/")[0] for i in ids) == ["0"] * 3 + ["1"] * 3  # the other half is for training
    assert json.loads((store.root / "eval" / "frozen.json").read_text())["held_out"] is True
    (store.root / "eval" / "frozen.json").write_text(json.dumps({"ids": [f"0/{i}.png" for i in range(6)]}))
    assert len(frozen_eval_set(store, corpus, per_class=10)) == 6  # a set from before held-out sets is remade
