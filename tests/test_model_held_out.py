"""The files a model never trained on, recorded beside it for the reindex job's evaluation set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lookalike.model.data import load_labelled_folder, split_train_val
from lookalike.model.held_out import HELD_OUT_FILE, files_unseen_by
from lookalike.model.preprocess import PreprocessSpec


def test_train_records_exactly_the_files_it_held_out(trained_store, tiny_config):
    model_dir = trained_store.require_model()
    record = json.loads((model_dir / HELD_OUT_FILE).read_text())
    corpus = trained_store.corpus_dir
    assert Path(record["data_dir"]) == corpus.absolute()
    data = load_labelled_folder(corpus, PreprocessSpec(tiny_config.image_size, tiny_config.channels))
    train_idx, val_idx = split_train_val(data.labels, tiny_config.val_fraction, tiny_config.seed)
    relative = np.asarray([str(Path(p).relative_to(corpus)) for p in data.paths])
    assert record["files"] == sorted(relative[val_idx]) and len(val_idx) > 0
    assert not set(record["files"]) & set(relative[train_idx])  # none of them trained on
    assert files_unseen_by(model_dir, corpus) == set(record["files"])


def test_unseen_files_are_only_those_of_the_same_folder(trained_store, tmp_path):
    model_dir = trained_store.require_model()
    assert files_unseen_by(model_dir, tmp_path) == set()  # trained on another folder
    assert files_unseen_by(None, trained_store.corpus_dir) == set()  # nothing served
    older = tmp_path / "m-old"
    older.mkdir()
    assert files_unseen_by(older, trained_store.corpus_dir) == set()  # a model from before the record
    (older / HELD_OUT_FILE).write_text("{not json")
    assert files_unseen_by(older, trained_store.corpus_dir) == set()  # unreadable: unknown, logged


def test_a_copied_store_still_knows_which_of_its_own_corpus_files_were_held_out(trained_store, tmp_path):
    """The record names the store's corpus relative to the store too: in a copy, `eval --model`
    and reindex still score only the held-out files (an absolute path named the original, so a
    copy scored the model on its own training images without calling the scores optimistic)."""
    import shutil

    from lookalike.model.held_out import files_unseen_by, read_held_out

    original = read_held_out(trained_store.require_model())
    assert original is not None and original.covers(trained_store.corpus_dir) and original.files
    copy = tmp_path / "copy"
    shutil.copytree(trained_store.root, copy)
    model_in_copy = copy / "models" / trained_store.require_model().name
    record = read_held_out(model_in_copy)
    assert record.covers(copy / "corpus") and not record.covers(trained_store.corpus_dir)
    assert files_unseen_by(model_in_copy, copy / "corpus") == set(original.files)


def test_files_written_after_training_are_unseen_and_a_copied_store_keeps_its_verdicts(tmp_path):
    """The record lists what a model held out when it trained; a file written later is newer
    than its model.json. By modification time: a copy of the whole store (cp -a) changes
    nothing, while a photo copied in with its old time kept (cp -p) counts as maybe seen."""
    import os
    import shutil
    import time

    from lookalike.model.held_out import added_since_training

    corpus, model = tmp_path / "corpus", tmp_path / "models" / "m-1"
    (corpus / "a").mkdir(parents=True)
    model.mkdir(parents=True)
    (corpus / "a" / "old.png").write_bytes(b"old")
    os.utime(corpus / "a" / "old.png", (1_000_000, 1_000_000))
    time.sleep(0.05)
    (model / "model.json").write_text("{}")
    time.sleep(0.05)
    (corpus / "a" / "new.png").write_bytes(b"new")
    shutil.copy2(corpus / "a" / "old.png", corpus / "a" / "copied.png")  # its 1970 mtime kept
    ids = ["a/old.png", "a/new.png", "a/copied.png", "a/gone.png"]
    assert added_since_training(model, corpus, ids) == {"a/new.png"}
    shutil.copytree(tmp_path, tmp_path.parent / "copy")  # the whole store copied later, times kept
    copy = tmp_path.parent / "copy"
    assert added_since_training(copy / "models" / "m-1", copy / "corpus", ids) == {"a/new.png"}
    assert added_since_training(None, corpus, ids) == set() == added_since_training(tmp_path / "none", corpus, ids)


def test_a_warm_started_model_holds_out_only_files_its_parent_never_trained_on_either(trained_store, tiny_config,
                                                                                       tmp_path):
    """reindex warm-starts each candidate from the served model and draws its validation split
    afresh: its record must leave out what the parent trained on, or `eval --model` and the
    gate score it on images its weights have seen (and call that held out)."""
    import dataclasses
    import shutil

    from lookalike.model.held_out import read_held_out
    from lookalike.model.store import Store
    from lookalike.model.train import train_and_evaluate

    shutil.copytree(trained_store.root, tmp_path / "store")
    store = Store.at(tmp_path / "store")
    parent = store.require_model()
    config = dataclasses.replace(tiny_config, seed=tiny_config.seed + 1, num_steps=2)  # another validation split
    child = train_and_evaluate(config, store.root, init_from=parent)
    assert child.metrics["warm_start"]
    corpus = store.corpus_dir
    data = load_labelled_folder(corpus, PreprocessSpec(config.image_size, config.channels))
    _, val_idx = split_train_val(data.labels, config.val_fraction, config.seed)
    own_split = {str(Path(data.paths[i]).relative_to(corpus)) for i in val_idx}
    parent_files = read_held_out(parent).files
    assert own_split - parent_files  # the child's split holds images the parent trained on ...
    held_out = read_held_out(child.model_dir).files
    assert held_out == own_split & parent_files and held_out  # ... which its record leaves out
