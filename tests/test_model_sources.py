"""Training sources: a TFDS data set prepared offline (conftest's ``tfds_dir``), end to end."""

import json

import numpy as np
import pytest

from lookalike.model.config import apply_overrides
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.sources import load_tfds_images, load_training_data
from lookalike.model.train import train_and_evaluate
from lookalike.pipeline.tfds_source import TfdsNotAvailableError, TfdsSpec

pytest.importorskip("tensorflow_datasets")


def test_tfds_examples_come_with_their_class_labels(tfds_dir):
    tfds_spec = TfdsSpec.parse("lookalike_tiny_shapes", str(tfds_dir))
    data, labelled = load_tfds_images(tfds_spec, PreprocessSpec(image_size=8, channels=1))
    assert labelled and data.images.shape == (30, 8, 8, 1) and data.class_names == ["light", "mid", "dark"]
    brightness = [data.images[data.labels == c].mean() for c in range(3)]
    assert brightness[0] > brightness[1] > brightness[2]  # labels match the pixels
    assert data.paths[0] == "tfds://lookalike_tiny_shapes/train/000000"


def test_an_integer_tfds_label_gives_classes_named_by_value(tfds_dir):
    tfds_spec = TfdsSpec.parse("lookalike_tiny_counts", str(tfds_dir))
    data, labelled = load_tfds_images(tfds_spec, PreprocessSpec(image_size=8, channels=1))
    assert labelled and data.images.shape == (12, 8, 8, 1)
    assert data.class_names == ["3", "7"] and sorted(np.unique(data.labels)) == [0, 1]  # conftest: labels 3 and 7
    assert data.images[data.labels == 0].mean() > data.images[data.labels == 1].mean() + 0.3  # 3 is light, 7 dark


def test_a_tfds_slice_trains_on_its_examples_named_by_their_base_split(tfds_dir, tiny_config):
    def load(split: str):
        tfds_spec = TfdsSpec.parse(f"lookalike_tiny_counts:{split}", str(tfds_dir))
        return load_tfds_images(tfds_spec, PreprocessSpec(image_size=8, channels=1))[0]

    whole = load("train+test")  # conftest: 12 + 6 examples
    sliced = load("train[:4]+test[-2:]")
    assert sliced.paths == [f"tfds://lookalike_tiny_counts/train/{i:06d}" for i in range(4)] + [
        f"tfds://lookalike_tiny_counts/test/{i:06d}" for i in (4, 5)]
    rows = [whole.paths.index(path) for path in sliced.paths]  # the same examples, named alike in any slice
    np.testing.assert_array_equal(sliced.images, whole.images[rows])
    assert [sliced.class_names[c] for c in sliced.labels] == [whole.class_names[whole.labels[r]] for r in rows]
    with pytest.raises(TfdsNotAvailableError, match=r"no split 'valid' \(in 'valid\[:4\]'\); it has \['test', 'train'\]"):
        load_training_data(tiny_config, tfds_dir, tfds="lookalike_tiny_counts:valid[:4]", tfds_data_dir=str(tfds_dir))


def test_float_tfds_images_are_converted_and_bad_ones_skipped_by_name(tfds_dir, caplog):
    import logging

    tfds_spec = TfdsSpec.parse("lookalike_tiny_floats", str(tfds_dir))
    with caplog.at_level(logging.WARNING):
        data, labelled = load_tfds_images(tfds_spec, PreprocessSpec(image_size=8, channels=1))
    assert labelled and data.images.shape == (10, 8, 8, 1)  # conftest: 2 of 12 cannot be converted
    assert data.images[data.labels == 0].mean() > data.images[data.labels == 1].mean() + 0.4  # light vs dark, in [0, 1]
    reasons = sorted(reason for _, reason in data.failures)
    assert len(reasons) == 2 and "NaN" in reasons[0] and "must be in [0, 1], found" in reasons[1]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for uri, _ in data.failures:
        assert uri.startswith("tfds://lookalike_tiny_floats/train/")
        assert len([m for m in warned if uri in m]) == 1, warned


def test_training_on_a_tfds_data_set_offline(tmp_path, tfds_dir, tiny_config):
    result = train_and_evaluate(tiny_config, tmp_path, tfds="lookalike_tiny_shapes:train", tfds_data_dir=str(tfds_dir))
    assert (tmp_path / "models" / "LATEST").read_text().strip() == result.version
    assert result.metrics["data_dir"] == f"tfds://lookalike_tiny_shapes/train@{tfds_dir.resolve()}"
    assert result.metrics["train_images"] == 24 and result.metrics["val_images"] == 6  # 2 of each class held out
    assert result.metrics["precision_at_1"] >= 0.8, result.metrics  # light, mid and dark: easy


def test_a_tfds_data_set_without_labels_trains_on_views(tmp_path, tfds_dir, tiny_config):
    config = apply_overrides(tiny_config, ["num_steps=10", "eval_every_steps=10", "val_fraction=0.25"])
    loaded = load_training_data(config, tmp_path, tfds="lookalike_tiny_patterns", tfds_data_dir=str(tfds_dir))
    assert loaded.config.unlabelled and np.array_equal(loaded.data.labels, np.arange(12))
    result = train_and_evaluate(config, tmp_path, tfds="lookalike_tiny_patterns", tfds_data_dir=str(tfds_dir))
    meta = json.loads((result.model_dir / "model.json").read_text())
    assert meta["config"]["unlabelled"] is True and result.metrics["val_views"] == 9  # 3 held-out images x 3 views


def test_asking_for_no_labels_drops_the_tfds_labels(tmp_path, tfds_dir, tiny_config):
    config = apply_overrides(tiny_config, ["unlabelled=true"])
    loaded = load_training_data(config, tmp_path, tfds="lookalike_tiny_shapes", tfds_data_dir=str(tfds_dir))
    assert len(np.unique(loaded.data.labels)) == 30 and loaded.data.class_names[0].endswith("/000000")


def test_a_tfds_data_set_not_prepared_names_the_data_dir(tmp_path, tiny_config):
    with pytest.raises(TfdsNotAvailableError, match=str(tmp_path)):
        train_and_evaluate(tiny_config, tmp_path / "w", tfds="mnist:test", tfds_data_dir=str(tmp_path))
    assert not (tmp_path / "w" / "models" / "LATEST").exists()
    with pytest.raises(ValueError, match="not both"):
        train_and_evaluate(tiny_config, tmp_path / "w", data_dir=tmp_path, tfds="mnist")
