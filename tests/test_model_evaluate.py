import argparse
import json

import numpy as np
import pytest

from lookalike.model.evaluate import (
    evaluate_embeddings,
    evaluate_model_cli,
    few_shot_accuracy,
    nearest_prototype_accuracy,
    verification_roc_auc,
)


def test_roc_auc_matches_hand_computed_value():
    # points 0, 1 (class 0) and 1.5 (class 1): pairs (0,1) d=1 same, (0,2) d=1.5 diff, (1,2) d=.5 diff.
    # The one positive outranks one of the two negatives -> AUC 0.5.
    emb, labels = np.array([[0.0], [1.0], [1.5]]), np.array([0, 0, 1])
    assert verification_roc_auc(emb, labels) == pytest.approx(0.5)
    assert verification_roc_auc(np.array([[0.0], [0.1], [5.0]]), labels) == 1.0
    assert np.isnan(verification_roc_auc(emb, np.array([0, 1, 2])))


def test_nearest_prototype_uses_the_mean_of_the_support():
    support = np.array([[0.0], [2.0], [2.5]])  # class 0 prototype at 1.0, class 1 at 2.5
    queries = np.array([[1.9], [1.7]])  # 1.9 is nearer 2.5 (0.6 vs 0.9); 1.7 nearer 1.0 (0.7 vs 0.8)
    assert nearest_prototype_accuracy(support, np.array([0, 0, 1]), queries, np.array([1, 0])) == 1.0
    assert nearest_prototype_accuracy(support, np.array([0, 0, 1]), queries, np.array([0, 1])) == 0.0


def test_few_shot_and_full_report_on_separable_and_random_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 4)
    separable = np.eye(10)[labels] + 0.01 * rng.standard_normal((40, 10))
    assert few_shot_accuracy(separable, labels, n_way=5, k_shot=1, episodes=50) == 1.0
    noise = rng.standard_normal((40, 10))
    assert few_shot_accuracy(noise, labels, n_way=5, k_shot=1, episodes=300) < 0.45  # chance is 0.2
    report = evaluate_embeddings(separable, labels, episodes=20)
    assert report["map_at_r"] == 1.0 and report["verification_roc_auc"] == 1.0
    assert report["few_shot_5way_1shot_acc"] == 1.0 and report["recall_at_10"] == 1.0
    with pytest.raises(ValueError, match="20-way"):
        few_shot_accuracy(separable, labels, n_way=20, k_shot=1)


def test_cli_evaluates_the_latest_model_on_the_corpus(trained_store, capsys):
    args = argparse.Namespace(workdir=str(trained_store.root), model=None, data=None, k=5, n_way=5, k_shot=1,
                              episodes=50, max_items=None, all_images=True)
    assert evaluate_model_cli(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == trained_store.latest_model() and report["items"] > 100
    assert 0.2 < report["map_at_r"] <= 1.0 and report["verification_roc_auc"] > 0.6
    assert report["few_shot_5way_1shot_acc"] > 0.3  # chance is 0.2


def test_a_store_without_its_corpus_names_the_folder_the_model_was_trained_on(trained_store, tmp_path):
    """eval --model in a store whose corpus is elsewhere (train --data DIR): the error says which --data to give."""
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    trained_on = json.loads((trained_store.require_model() / "model.json").read_text())["metrics"]["data_dir"]
    args = argparse.Namespace(workdir=str(workdir), model=None, data=None, k=5, n_way=None, k_shot=None, episodes=5,
                              max_items=None)
    with pytest.raises(ValueError) as raised:
        evaluate_model_cli(args)
    assert str(raised.value) == (
        f"evaluation folder {workdir / 'corpus'} does not exist (--data: a folder with one sub-folder per label); model "
        f"{trained_store.latest_model()} was trained on {trained_on}: `--data {trained_on}`")


def test_a_report_without_evidence_is_strict_json_with_nulls(trained_store, capsys):
    """Two items of different classes: no class has a second item, so MAP@R and ROC AUC are undefined."""
    args = argparse.Namespace(workdir=str(trained_store.root), model=None, data=None, k=5, n_way=None, k_shot=None,
                              episodes=3, max_items=2)  # the default few-shot score: skipped with a warning
    assert evaluate_model_cli(args) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out
    report = json.loads(out, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert report["map_at_r"] is None and report["verification_roc_auc"] is None


def test_a_one_class_folder_is_named_as_the_evaluation_data_folder(trained_store, tmp_path):
    """eval --model --data one: the shared folder loader names the folder by what it is for here."""
    from PIL import Image

    (tmp_path / "one" / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "one" / "cat" / f"{i}.png")
    args = argparse.Namespace(workdir=str(trained_store.root), model=None, data=str(tmp_path / "one"), k=5,
                              n_way=None, k_shot=None, episodes=5, max_items=None)
    with pytest.raises(ValueError, match=r"^evaluation data folder .*/one needs one sub-folder per class and at least "
                                         r"2 classes, found 1$"):
        evaluate_model_cli(args)


def test_a_few_shot_score_asked_for_that_the_classes_cannot_give_is_an_error(trained_store, tmp_path, capsys):
    """eval --model --data c3 --n-way 5 on 3 classes: an error naming why; without --n-way the
    default 5-way score is only skipped (a warning) and the other metrics are printed."""
    from PIL import Image

    from lookalike.pipeline.cli import main

    rng = np.random.default_rng(5)
    for c in range(3):
        (tmp_path / "c3" / f"k{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "c3" / f"k{c}" / f"{i}.png")
    argv = ["eval", "--workdir", str(trained_store.root), "--model", "--data", str(tmp_path / "c3"), "--episodes", "5"]
    assert main([*argv, "--n-way", "5"]) == 1
    err = capsys.readouterr().err
    assert "lookalike eval: error: few-shot accuracy cannot be computed: 5-way 1-shot needs 5 classes, the data has " \
           "3: n-way is larger than the number of classes" in err
    assert main([*argv, "--n-way", "2", "--k-shot", "3"]) == 1  # no class has the 3 + 1 images an episode takes
    assert "2-way 3-shot needs 2 classes with 4+ items; found 0 (of 3 classes)" in capsys.readouterr().err
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == 3 and not any(key.startswith("few_shot") for key in report)


def test_an_impossible_few_shot_setting_asked_for_fails_before_anything_is_embedded(
        trained_store, tmp_path, capsys, monkeypatch):
    """The classes are counted from the labels: a big folder is not embedded for nothing."""
    from PIL import Image

    from lookalike.model.artifact import Encoder
    from lookalike.pipeline.cli import main

    rng = np.random.default_rng(6)
    for c in range(3):
        (tmp_path / "c3" / f"k{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "c3" / f"k{c}" / f"{i}.png")
    embedded = []
    embed = Encoder.embed

    def counting_embed(self, images):
        embedded.append(len(images))
        return embed(self, images)

    monkeypatch.setattr(Encoder, "embed", counting_embed)
    argv = ["eval", "--workdir", str(trained_store.root), "--model", "--data", str(tmp_path / "c3"), "--episodes", "5"]
    assert main([*argv, "--n-way", "4"]) == 1
    err = capsys.readouterr().err
    assert "few-shot accuracy cannot be computed: 4-way 1-shot needs 4 classes, the data has 3" in err
    assert main([*argv, "--n-way", "2", "--k-shot", "2"]) == 1
    assert "2-way 2-shot needs 2 classes with 3+ items; found 0 (of 3 classes)" in capsys.readouterr().err
    assert embedded == []
    assert main([*argv, "--n-way", "3"]) == 0  # possible: embedded and scored
    assert embedded and "few_shot_3way_1shot_acc" in json.loads(capsys.readouterr().out)


def test_json_ready_turns_every_non_finite_float_into_null():
    from lookalike.model.metrics import json_ready

    value = {"a": float("nan"), "b": [np.float32("inf"), 1.5, {"c": -float("inf")}], "d": "NaN", "e": 2}
    assert json_ready(value) == {"a": None, "b": [None, 1.5, {"c": None}], "d": "NaN", "e": 2}


def test_a_mistyped_model_folder_is_named_as_a_missing_folder(trained_store, tmp_path):
    args = argparse.Namespace(workdir=str(trained_store.root), model=str(tmp_path / "models" / "m-x"), data=None, k=5,
                              n_way=5, k_shot=1, episodes=5, max_items=None)
    with pytest.raises(FileNotFoundError, match=f"model folder {tmp_path}/models/m-x does not exist"):
        evaluate_model_cli(args)


def test_on_its_training_folder_a_model_is_scored_on_its_held_out_images_only(trained_store, capsys, caplog):
    """eval --model on the corpus it trained on: not its training images (they flatter it), unless --all-images,
    which warns that the scores are optimistic; the report says which images were scored."""
    import logging

    from lookalike.model.held_out import HELD_OUT_FILE
    from lookalike.pipeline.cli import main

    held_out = json.loads((trained_store.require_model() / HELD_OUT_FILE).read_text())["files"]
    total = sum(1 for p in trained_store.corpus_dir.rglob("*.png"))
    argv = ["eval", "--workdir", str(trained_store.root), "--model", "--episodes", "5"]
    with caplog.at_level(logging.INFO, logger="lookalike"):
        assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < len(held_out) < total
    assert report["images"] == "held_out" and report["items"] == report["held_out_in_folder"] == len(held_out)
    assert report["images_in_folder"] == total and report["optimistic"] is False
    assert f"{len(held_out)} of {total} images were held out of training; scoring those" in caplog.text
    assert "optimistic" not in " ".join(r.message for r in caplog.records if r.levelno >= logging.WARNING)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lookalike"):
        assert main([*argv, "--all-images"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == "all" and report["items"] == report["images_in_folder"] == total
    assert report["held_out_in_folder"] == len(held_out) and report["optimistic"] is True
    warning = " ".join(r.message for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{total - len(held_out)} of the {total} images scored were not held out of training" in warning
    assert "optimistic" in warning


def test_a_model_without_a_held_out_record_is_scored_on_all_images_with_a_warning(
        trained_store, tmp_path, capsys, caplog):
    import logging
    import shutil

    from lookalike.model.held_out import HELD_OUT_FILE

    older = tmp_path / "m-older"
    shutil.copytree(trained_store.require_model(), older)
    (older / HELD_OUT_FILE).unlink()  # a model from before the record
    args = argparse.Namespace(workdir=str(trained_store.root), model=str(older), data=None, k=5, n_way=None,
                              k_shot=None, episodes=5, max_items=None)
    assert evaluate_model_cli(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == "all" and report["optimistic"] is True and report["held_out_in_folder"] is None
    assert report["items"] == report["images_in_folder"]
    assert any(r.levelno == logging.WARNING and "optimistic" in r.message and HELD_OUT_FILE in r.message
               for r in caplog.records)


def test_another_folder_is_scored_whole_and_a_folder_without_the_held_out_images_is_an_error(
        trained_store, tmp_path, capsys, caplog):
    import logging
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained_store.corpus_dir, other)
    args = argparse.Namespace(workdir=str(trained_store.root), model=None, data=str(other), k=5, n_way=None,
                              k_shot=None, episodes=5, max_items=None)
    assert evaluate_model_cli(args) == 0  # the model never saw this folder (as far as its record tells)
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == "all" and report["optimistic"] is False and report["items"] == report["images_in_folder"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "optimistic" in r.message]

    from lookalike.model.held_out import HELD_OUT_FILE

    model = tmp_path / "m-moved"
    shutil.copytree(trained_store.require_model(), model)
    (model / HELD_OUT_FILE).write_text(json.dumps({"data_dir": str(other), "files": ["0/gone.png"]}))
    args.model = str(model)
    with pytest.raises(ValueError, match=r"none of the 1 images model m-moved held out of training .* are in "
                                         r".*/other any more: give --all-images to score all \d+ images"):
        evaluate_model_cli(args)


def test_folder_images_lists_what_training_reads_not_a_linked_class_twice(tmp_path):
    import os

    from PIL import Image

    from lookalike.model.evaluate import folder_images

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 10 * i).save(tmp_path / name / f"{i}.png")
    os.symlink(tmp_path / "dog", tmp_path / "dog2")
    os.symlink(tmp_path, tmp_path / "cat" / "loop")
    assert folder_images(tmp_path) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
