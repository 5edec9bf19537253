"""A training job is known by its inputs: the reindex cron does not train the same candidate twice."""

import dataclasses
import logging
import shutil

import numpy as np
from PIL import Image

from lookalike.model.data import LabelledImages
from lookalike.model.training_inputs import METRIC_KEY, model_trained_from, training_inputs_sha256


def images(seed: int = 0) -> LabelledImages:
    x = np.random.default_rng(seed).random((6, 8, 8, 1)).astype(np.float32)
    return LabelledImages(x, np.array([0, 0, 0, 1, 1, 1], np.int32), ["a", "b"], [f"{i}.png" for i in range(6)], [])


def test_the_hash_changes_with_every_input_but_not_with_skipped_files(tiny_config):
    base = training_inputs_sha256(tiny_config, images(), None)
    assert training_inputs_sha256(tiny_config, images(), None) == base
    pixel = images()
    pixel.images[5, 7, 7, 0] += 1e-6  # one pixel of one image
    relabelled = images()
    relabelled.labels[2] = 1
    others = [
        training_inputs_sha256(tiny_config, pixel, None),
        training_inputs_sha256(tiny_config, relabelled, None),
        training_inputs_sha256(dataclasses.replace(tiny_config, seed=1), images(), None),
        training_inputs_sha256(tiny_config, images(), "m-0123456789ab"),  # warm-started from a model
        training_inputs_sha256(tiny_config, dataclasses.replace(images(), class_names=["a", "c"]), None),
    ]
    assert len({base, *others}) == 1 + len(others)
    skipped = dataclasses.replace(images(), failures=[("x.png", "truncated")])
    assert training_inputs_sha256(tiny_config, skipped, None) == base
    # The same folder elsewhere (a store copied or moved) is the same input; another file name is not.
    here, there = (dataclasses.replace(images(), paths=[f"{root}/corpus/{p}" for p in images().paths])
                   for root in ("/srv/a", "/backup/b"))
    assert training_inputs_sha256(tiny_config, here, None) == training_inputs_sha256(tiny_config, there, None)
    renamed = dataclasses.replace(here, paths=[*here.paths[:5], "/srv/a/corpus/x.png"])
    assert training_inputs_sha256(tiny_config, renamed, None) != training_inputs_sha256(tiny_config, here, None)


def test_an_identical_training_is_reused_and_a_changed_corpus_trains_again(tiny_config, tmp_path, caplog):
    from lookalike.model.train import train_and_evaluate

    corpus = tmp_path / "corpus"
    for label, shade in (("a", 40), ("b", 200)):
        (corpus / label).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), shade + 3 * i).save(corpus / label / f"{i}.png")
    config = dataclasses.replace(tiny_config, num_steps=4, eval_every_steps=4)
    first = train_and_evaluate(config, tmp_path / "store", data_dir=corpus, set_latest=False)
    assert not first.reused and len(first.metrics[METRIC_KEY]) == 64
    assert model_trained_from(tmp_path / "store" / "models", first.metrics[METRIC_KEY]) == first.version
    with caplog.at_level(logging.INFO):
        again = train_and_evaluate(config, tmp_path / "store", data_dir=corpus, set_latest=False, reuse_identical=True)
    assert again.reused and again.version == first.version and again.metrics == first.metrics
    assert f"model {first.version} was trained from exactly these inputs" in caplog.text
    assert not (tmp_path / "store" / "models" / ".runs").exists()  # no training run was started
    Image.new("L", (16, 16), 90).save(corpus / "a" / "new.png")
    changed = train_and_evaluate(config, tmp_path / "store", data_dir=corpus, set_latest=False, reuse_identical=True)
    assert not changed.reused and changed.metrics[METRIC_KEY] != first.metrics[METRIC_KEY]
    shutil.rmtree(tmp_path / "store" / "models" / first.version / "params")  # a damaged model is never reused
    assert model_trained_from(tmp_path / "store" / "models", first.metrics[METRIC_KEY]) is None
