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
