import numpy as np
import pytest
from PIL import Image

from lookalike.model.data import PairSampler, load_labelled_folder, split_train_val
from lookalike.model.preprocess import PreprocessSpec

SPEC = PreprocessSpec(image_size=8, channels=1)


def test_pairs_are_balanced_and_labelled_correctly():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])  # class 3 has one image
    a, b, sim = PairSampler(labels, seed=0).sample(64)
    assert sim.sum() == 32
    assert (labels[a][sim == 1] == labels[b][sim == 1]).all() and (a[sim == 1] != b[sim == 1]).all()
    assert (labels[a][sim == 0] != labels[b][sim == 0]).all()


def test_sampler_needs_a_possible_positive():
    with pytest.raises(ValueError, match="2 or more"):
        PairSampler(np.array([0, 1, 2]), seed=0)


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(3), 10)
    train, val = split_train_val(labels, 0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 30
    assert np.bincount(labels[val]).tolist() == [2, 2, 2]


def test_folder_loader_skips_bad_files_and_keeps_the_rest(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / label / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not png")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    data = load_labelled_folder(tmp_path, SPEC)
    assert data.images.shape == (6, 8, 8, 1) and data.class_names == ["a", "b"]
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in data.failures) == ["broken.png", "empty.jpg"]


def test_folder_without_classes_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_labelled_folder(tmp_path, SPEC)
