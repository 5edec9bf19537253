import json

import numpy as np
import pyarrow as pa
import pytest

from lookalike.index.builder import IndexOptions, build_index
from lookalike.index.evaluate import evaluate_index, label_from_id, retrieval_scores
from lookalike.index.searcher import ItemIndex
from lookalike.pipeline.cli import main


def test_label_from_id():
    assert label_from_id("3/digit_0042.png") == "3"
    assert label_from_id("cat/sub/x.jpg") == "cat"
    with pytest.raises(ValueError, match="'plain.png' has no '<label>/' prefix"):
        label_from_id("plain.png")


def test_retrieval_scores_by_hand():
    labels = np.array(["a", "a", "a", "b", "b"])
    # query 0 (label a, R=2): neighbours a, b -> P@1 1, AP = (1/1)/2 = 0.5
    # query 3 (label b, R=1): neighbours a -> P@1 0, AP 0
    neighbors = np.array([[1, 3, 2], [0, 4, -1]])
    s = retrieval_scores(neighbors, np.array(["a", "b"]), labels, ks=(1, 3))
    assert s["precision_at_1"] == 0.5 and s["recall_at_1"] == 0.5 and s["recall_at_3"] == 1.0
    assert s["map_at_r"] == pytest.approx(0.25)
    # late hits count less: a, x, a for R=2 -> (1 + 2/3)/2 ... only the first R=2 results count
    s = retrieval_scores(np.array([[1, 3, 2]]), np.array(["a"]), labels, ks=(1,))
    assert s["map_at_r"] == pytest.approx(0.5)
    s = retrieval_scores(np.array([[1, 2]]), np.array(["a"]), labels, ks=(1,))
    assert s["map_at_r"] == pytest.approx(1.0)


def test_exact_index_loses_nothing_and_a_starved_one_does(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = rng.integers(0, 5, 2000)
    x = centres[labels] + 0.9 * rng.normal(size=(2000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = pa.table({"id": [f"{c}/{i}.png" for i, c in enumerate(labels)]})
    build_index(x, ids, model_version="m", out_dir=tmp_path / "bf")
    exact = evaluate_index(ItemIndex.load(tmp_path / "bf"), k=10, max_queries=300)
    assert exact["ann_recall_at_10"] == 1.0 and exact["approximation_loss"]["map_at_r"] == 0.0
    assert 0.2 < exact["exact"]["map_at_r"] < 1.0 and exact["num_queries"] == 300
    build_index(x, ids, model_version="m", out_dir=tmp_path / "ann", options=IndexOptions(
        mode="tree_ah", num_leaves=40, leaves_to_search=1, reorder=10))
    starved = evaluate_index(ItemIndex.load(tmp_path / "ann"), k=10, max_queries=300)
    assert starved["ann_recall_at_10"] < 0.9
    assert starved["exact"] == exact["exact"]  # the exact side does not depend on the ANN settings
    # its MAP@R lists (R ~400 deep) are full: one leaf of ~50 items no longer truncates them to a fake loss
    assert starved["depth"] >= 350 and "ann_short_lists" not in starved


def test_unlabelled_items_still_get_ann_recall(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = pa.table({"id": [f"{i % 3}/{i}.png" for i in range(299)] + ["top-level.png"]})
    build_index(x, ids, model_version="m", out_dir=tmp_path / "i")
    report = evaluate_index(ItemIndex.load(tmp_path / "i"), k=5)
    assert report["ann_recall_at_5"] == 1.0 and "exact" not in report
    assert "'top-level.png' has no '<label>/' prefix" in report["label_metrics"] and "label_function" not in report
    assert json.dumps(report).count("-0.0") == 0


def test_a_single_label_gets_no_label_metrics_only_ann_recall(tmp_path, caplog):
    """One class folder (one/cat/*.jpg): every neighbour has the query's label, so an untrained
    model would score MAP@R 1.0; the label metrics are not computed, with the reason, and a warning.
    No ``label_function`` is reported then, as if labels had been used; with 2 labels it is."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    build_index(x, pa.table({"id": [f"cat/{i:04d}.jpg" for i in range(40)]}), model_version="m", out_dir=tmp_path / "i")
    with caplog.at_level("WARNING", logger="lookalike.index.evaluate"):
        report = evaluate_index(ItemIndex.load(tmp_path / "i"), k=10)
    assert report["ann_recall_at_10"] == 1.0 and "label_function" not in report
    assert "exact" not in report and "ann" not in report and "approximation_loss" not in report
    assert report["label_metrics"].startswith("not computed: label metrics need at least 2 labels, found 1: "
                                              "every item has the label 'cat' (label_from_id)")
    assert any("every item has the label 'cat'" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    two = pa.table({"id": [f"{('cat', 'dog')[i % 2]}/{i:04d}.jpg" for i in range(40)]})
    build_index(x, two, model_version="m", out_dir=tmp_path / "two")
    report = evaluate_index(ItemIndex.load(tmp_path / "two"), k=10)
    assert report["label_function"] == "label_from_id" and "label_metrics" not in report and "exact" in report


def test_eval_command_on_the_pipeline_index(indexed_store, capsys):
    assert main(["eval", "--workdir", str(indexed_store.root), "--index", "--k", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["index"] == indexed_store.current_index() and report["k"] == 5
    assert report["label_function"] == "label_from_id"
    assert report["ann_recall_at_5"] == 1.0  # the tiny corpus gets an exact index
    assert report["approximation_loss"]["map_at_r"] == 0.0
    assert report["exact"]["precision_at_1"] > 0.3  # a trained model on digits beats chance (0.1)
    assert main(["eval", "--workdir", str(indexed_store.root), "--index", "--k", "5", "--label-column", "kind"]) == 0
    one_label = json.loads(capsys.readouterr().out)  # every item an image: one label, no label metrics
    assert "label_function" not in one_label and "exact" not in one_label
    assert one_label["label_metrics"].startswith("not computed: label metrics need at least 2 labels, found 1")
    assert "(column kind)" in one_label["label_metrics"]  # where the one label was read
    assert main(["eval", "--workdir", str(indexed_store.root), "--index", "no-such-version"]) == 1


def test_map_at_r_of_a_tree_index_compares_full_depth_lists(tmp_path):
    """R (~1000 items per label) is far deeper than the leaves tuned for k=10 hold: the ANN lists
    must still reach depth R, or MAP@R reports a loss that is only truncation."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 3000)
    x = rng.normal(size=(3, 16))[labels] + 0.8 * rng.normal(size=(3000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = pa.table({"id": [f"{c}/{i}.png" for i, c in enumerate(labels)]})
    build_index(x, ids, model_version="m", out_dir=tmp_path / "i", options=IndexOptions(mode="tree_exact"))
    index = ItemIndex.load(tmp_path / "i")
    report = evaluate_index(index, k=10, max_queries=100)
    assert report["depth"] >= 950 and "ann_short_lists" not in report
    assert abs(report["approximation_loss"]["map_at_r"]) <= 0.02, report
    rows = np.arange(100)
    truncated = index.search_rows(x[rows], report["depth"] + 1, leaves_to_search=1)[0]  # what one leaf holds
    assert (truncated < 0).any()


def test_labels_from_a_metadata_column(tmp_path):
    """A corpus not laid out as <label>/<file> gets label metrics from a column (eval --label-column)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 300)
    x = rng.normal(size=(3, 8))[labels] + 0.5 * rng.normal(size=(300, 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    species = [f"s{c}" for c in labels]
    colour = [None] + ["red"] * 299  # a column that exists but lacks a value for an item
    build_index(x, pa.table({"id": [f"img{i}.png" for i in range(300)], "species": species, "colour": colour}),
                model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    no_labels = evaluate_index(index, k=5)
    assert "--label-column COLUMN" in no_labels["label_metrics"]  # what a command-line user can do
    report = evaluate_index(index, k=5, label_column="species")
    assert report["label_function"] == "column species" and report["exact"]["precision_at_1"] > 0.5
    assert report["approximation_loss"]["map_at_r"] == 0.0
    missing = evaluate_index(index, k=5, label_column="colour")
    assert "item 'img0.png' has no value in the label column 'colour' (1 of the 300 items have none): name a " \
           "column every item has a value in (--label-column; the items' other columns: species), or give every " \
           "item a 'colour' value in the metadata file and publish it with lookalike embed --incremental " \
           "--metadata FILE" in missing["label_metrics"]  # what to do, not only why
    with pytest.raises(ValueError, match=r"label column 'specie' does not exist in the items of index .*; "
                                         r"its columns are: id, species, colour"):
        evaluate_index(index, k=5, label_column="specie")  # a mistyped name is not "missing labels"


def test_eval_command_names_a_label_column_that_does_not_exist(indexed_store, capsys):
    assert main(["eval", "--workdir", str(indexed_store.root), "--index", "--label-column", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "lookalike eval: error: label column 'nosuch' does not exist in the items of index" in err
    assert "its columns are: id, " in err and "kind" in err
