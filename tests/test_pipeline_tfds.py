"""A TFDS data set as a corpus: a tiny builder prepared here (no download), then embedded."""

import numpy as np
import pytest

from lookalike.index.searcher import ItemIndex
from lookalike.pipeline.embed import EmbedConfig, run_embed
from lookalike.pipeline.tfds_source import TfdsNotAvailableError, TfdsSpec, load_builder

tfds = pytest.importorskip("tensorflow_datasets")

NUM_EXAMPLES = 30


class LookalikeTinyShapes(tfds.core.GeneratorBasedBuilder):
    """Three classes of 16x16 grayscale images: light, mid and dark squares with noise."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(16, 16, 1)),
            "label": tfds.features.ClassLabel(names=["light", "mid", "dark"]),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(NUM_EXAMPLES):
            label = i % 3
            image = np.clip(220 - 90 * label + rng.integers(-20, 20, (16, 16, 1)), 0, 255).astype(np.uint8)
            yield i, {"image": image, "label": label}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    LookalikeTinyShapes(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir


def test_tfds_split_is_embedded_with_label_first_ids(tmp_path, trained_store, tfds_dir):
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_shapes:train", tfds_data_dir=str(tfds_dir)))
    assert (summary.items, summary.failed) == (NUM_EXAMPLES, 0)
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
