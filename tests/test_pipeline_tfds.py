"""A TFDS data set as a corpus: conftest's tiny builder prepared offline (``tfds_dir``), then embedded."""

import numpy as np
import pytest

from lookalike.index.searcher import ItemIndex
from lookalike.pipeline.embed import EmbedConfig, run_embed
from lookalike.pipeline.tfds_source import TfdsNotAvailableError, TfdsSpec, load_builder

pytest.importorskip("tensorflow_datasets")


def test_tfds_split_is_embedded_with_label_first_ids(tmp_path, trained_store, tfds_dir):
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_shapes:train", tfds_data_dir=str(tfds_dir)))
    assert (summary.items, summary.failed) == (30, 0)  # conftest's lookalike_tiny_shapes
    index = ItemIndex.load(workdir / "indexes" / summary.index_version)
    from collections import Counter

    from PIL import Image

    labels = Counter(item["id"].split("/")[0] for item in index.items)
    assert labels == {"light": 10, "mid": 10, "dark": 10}
    assert all(item["id"].split("/")[1].startswith("lookalike_tiny_shapes-train-") for item in index.items)
    brightness = {
        label: np.mean([np.asarray(Image.open(i["thumbnail"]).convert("L")).mean()
                        for i in index.items if i["id"].startswith(label + "/")])
        for label in labels
    }
    assert brightness["light"] > brightness["mid"] > brightness["dark"]  # labels match the pixels


def test_missing_or_unprepared_data_sets_name_the_data_dir(tmp_path):
    with pytest.raises(TfdsNotAvailableError, match=str(tmp_path)):
        load_builder(TfdsSpec.parse("mnist", str(tmp_path)))
    with pytest.raises(TfdsNotAvailableError, match="no_such_dataset_xyz"):
        load_builder(TfdsSpec.parse("no_such_dataset_xyz:test", str(tmp_path)))


def test_unknown_split_lists_the_splits(tfds_dir):
    with pytest.raises(TfdsNotAvailableError, match="'train'"):
        load_builder(TfdsSpec.parse("lookalike_tiny_shapes:validation", str(tfds_dir)))
