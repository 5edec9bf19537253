"""A TFDS data set as a corpus: conftest's tiny builder prepared offline (``tfds_dir``), then embedded."""

import numpy as np
import pytest

from lookalike.index.searcher import ItemIndex
from lookalike.pipeline.embed import EmbedConfig, run_embed
from lookalike.pipeline.tfds_source import TfdsNotAvailableError, TfdsSpec, load_builder, png_bytes, split_ranges

pytest.importorskip("tensorflow_datasets")


def test_tfds_split_is_embedded_with_label_first_ids(tmp_path, trained_store, tfds_dir):
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_shapes:train", tfds_data_dir=str(tfds_dir)))
    assert (summary.items, summary.failed) == (30, 0)  # conftest's lookalike_tiny_shapes
    assert (summary.files_matched, summary.files_read) == (30, 30)  # examples selected, examples read
    index = ItemIndex.load(workdir / "indexes" / summary.index_version)
    from collections import Counter

    from PIL import Image

    labels = Counter(item["id"].split("/")[0] for item in index.items)
    assert labels == {"light": 10, "mid": 10, "dark": 10}
    assert all(item["id"].split("/")[1].startswith("lookalike_tiny_shapes-train-") for item in index.items)
    brightness = {
        label: np.mean([np.asarray(Image.open(workdir / i["thumbnail"]).convert("L")).mean()
                        for i in index.items if i["id"].startswith(label + "/")])
        for label in labels
    }
    assert brightness["light"] > brightness["mid"] > brightness["dark"]  # labels match the pixels


def test_float_images_are_embedded_and_unconvertible_ones_dead_lettered(tmp_path, trained_store, tfds_dir):
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_floats", tfds_data_dir=str(tfds_dir)))
    assert (summary.items, summary.failed) == (10, 2)  # conftest: values of 3.0 in one, NaN in another
    assert summary.files_read == 12  # the unconvertible examples were read too
    reasons = sorted(row["reason"] for row in summary.dead_letter_examples)
    assert "NaN" in reasons[0] and "must be in [0, 1], found" in reasons[1] and " to 3" in reasons[1]
    assert all(row["uri"].startswith("tfds://lookalike_tiny_floats/") and "-train-" in row["uri"]
               for row in summary.dead_letter_examples)
    assert len(ItemIndex.load(workdir / "indexes" / summary.index_version)) == 10


def test_png_bytes_converts_float_and_16_bit_images():
    import io

    from PIL import Image

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)))

    ramp = np.array([[0.0, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(pixels(png_bytes(ramp[:, :, None])), [[0, 128, 255]])
    colour16 = np.full((2, 2, 3), 0x8001, np.uint16)
    np.testing.assert_array_equal(pixels(png_bytes(colour16)), np.full((2, 2, 3), 0x80))
    gray16 = np.array([[0, 1000, 65535]], np.uint16)
    np.testing.assert_array_equal(pixels(png_bytes(gray16)), gray16)  # kept at 16 bits
    for bad, reason in [(ramp * 2, r"must be in \[0, 1\], found 0 to 2"), (ramp - 0.5, "found -0.5 to 0.5"),
                        (np.full((2, 2), np.inf, np.float32), "4 NaN or infinite"),
                        (np.zeros((0, 4), np.uint8), "not a picture"), (np.zeros((2, 2, 5), np.uint8), "cannot be encoded")]:
        with pytest.raises(ValueError, match=reason):
            png_bytes(bad)


def test_missing_or_unprepared_data_sets_name_the_data_dir(tmp_path):
    with pytest.raises(TfdsNotAvailableError, match=str(tmp_path)):
        load_builder(TfdsSpec.parse("mnist", str(tmp_path)))
    with pytest.raises(TfdsNotAvailableError, match="no_such_dataset_xyz"):
        load_builder(TfdsSpec.parse("no_such_dataset_xyz:test", str(tmp_path)))


def test_a_missing_data_set_is_our_error_alone_without_tfds_warnings_before_it(tmp_path, caplog):
    """TFDS warns (absl) "Variant folder .../cifar10/3.0.2 has no dataset_info.json", even for a folder that does
    not exist: our error says what was searched and what to do, so that line is only logged at DEBUG (-v)."""
    import logging

    caplog.set_level(logging.DEBUG)
    with pytest.raises(TfdsNotAvailableError, match=r"'cifar10' is not prepared in data_dir .*/none/tfds"):
        load_builder(TfdsSpec.parse("cifar10:test", str(tmp_path / "none" / "tfds")))
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not shown, [r.getMessage() for r in shown]
    assert any("has no dataset_info.json" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert not logging.getLogger("absl").filters  # only around the check: later absl warnings still show


def test_unknown_split_lists_the_splits(tfds_dir):
    with pytest.raises(TfdsNotAvailableError, match="'train'"):
        load_builder(TfdsSpec.parse("lookalike_tiny_shapes:validation", str(tfds_dir)))
    with pytest.raises(TfdsNotAvailableError, match=r"no split 'validation' \(in 'train\+validation\[:5\]'\); "
                                                    r"it has \['test', 'train'\]"):
        load_builder(TfdsSpec.parse("lookalike_tiny_counts:train+validation[:5]", str(tfds_dir)))


def test_tfds_split_syntax_selects_ranges_of_the_base_splits(tfds_dir):
    def ranges(text: str) -> list[tuple[str, int, int]]:
        spec = TfdsSpec.parse(text, str(tfds_dir))
        return split_ranges(load_builder(spec), spec)

    assert ranges("lookalike_tiny_shapes") == [("train", 0, 30)]  # conftest: 30 examples
    assert ranges("lookalike_tiny_shapes:train[:5]") == [("train", 0, 5)]
    assert ranges("lookalike_tiny_shapes:train[10%:20%]") == [("train", 3, 6)]
    assert ranges("lookalike_tiny_shapes:train[-2:]") == [("train", 28, 30)]
    assert ranges("lookalike_tiny_shapes:train[:5]+train[3:8]+train[20:22]") == [("train", 0, 8), ("train", 20, 22)]
    assert ranges("lookalike_tiny_counts:train[:2]+test[50%:]") == [("train", 0, 2), ("test", 3, 6)]
    assert ranges("lookalike_tiny_shapes:train[5:5]") == []
    with pytest.raises(ValueError, match=r"--tfds lookalike_tiny_shapes:train\[:abc\]: 'train\[:abc\]' is not a TFDS split"):
        ranges("lookalike_tiny_shapes:train[:abc]")
    with pytest.raises(ValueError, match=r"--tfds lookalike_tiny_shapes:train\[:50\]: .*incompatible with 30 examples"):
        ranges("lookalike_tiny_shapes:train[:50]")


def test_a_slice_is_embedded_with_the_ids_of_its_whole_split(tmp_path, trained_store, tfds_dir):
    import shutil

    from lookalike.pipeline.embed import read_embeddings

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_counts:train[:5]+train[3:6]+test[50%:]",
                                    tfds_data_dir=str(tfds_dir), publish=False))
    _, items = read_embeddings(workdir / "embeddings" / summary.run)
    from lookalike.model.preprocess import PreprocessSpec
    from lookalike.model.sources import load_tfds_images

    whole, _ = load_tfds_images(TfdsSpec.parse("lookalike_tiny_counts:train+test", str(tfds_dir)), PreprocessSpec(8, 1))
    label_of = {path.removeprefix("tfds://lookalike_tiny_counts/"): whole.class_names[label]  # e.g. 'train/000003'
                for path, label in zip(whole.paths, whole.labels)}
    expected = [f"{label_of[f'{split}/{i:06d}']}/lookalike_tiny_counts-{split}-{i:06d}.png"
                for split, indices in (("train", range(6)), ("test", range(3, 6))) for i in indices]
    assert (summary.files_matched, summary.files_read, summary.items) == (9, 9, 9)  # train 0-5 once, though two slices overlap
    assert items.column("id").to_pylist() == sorted(expected)
    assert all(uri == f"tfds://lookalike_tiny_counts/{i}" for uri, i in zip(items.column("uri").to_pylist(),
                                                                             items.column("id").to_pylist()))


def test_an_integer_label_comes_first_in_ids_as_train_names_its_classes(tmp_path, trained_store, tfds_dir):
    import shutil
    from collections import Counter

    from lookalike.index.evaluate import evaluate_index
    from lookalike.model.preprocess import PreprocessSpec
    from lookalike.model.sources import load_tfds_images

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_counts", tfds_data_dir=str(tfds_dir)))
    index = ItemIndex.load(workdir / "indexes" / summary.index_version)
    assert Counter(item["id"].split("/")[0] for item in index.items) == {"3": 6, "7": 6}  # conftest: a plain int64 label
    data, labelled = load_tfds_images(TfdsSpec.parse("lookalike_tiny_counts", str(tfds_dir)), PreprocessSpec(8, 1))
    assert labelled and data.class_names == ["3", "7"]  # train's classes are the ids' first parts, example by example
    assert sorted(item["id"] for item in index.items) == sorted(
        f"{data.class_names[label]}/lookalike_tiny_counts-train-{path.rsplit('/', 1)[1]}.png"
        for path, label in zip(data.paths, data.labels))
    assert "exact" in evaluate_index(index, k=3)  # `lookalike eval --index` has labels


def test_an_unchanged_incremental_tfds_rerun_embeds_nothing_and_keeps_current(tmp_path, trained_store, tfds_dir):
    import shutil

    from lookalike.pipeline.embed import read_embeddings

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    config = EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_floats", tfds_data_dir=str(tfds_dir), incremental=True)
    first = run_embed(EmbedConfig(**{**vars(config), "run_name": "first"}))
    again = run_embed(EmbedConfig(**{**vars(config), "run_name": "again"}))
    assert (again.embedded, again.unchanged, again.items, again.failed) == (0, 10, 10, 2)  # conftest: 2 unconvertible
    assert again.files_read == 12  # every example is read and hashed to be known unchanged
    assert again.index_version == first.index_version  # nothing new: CURRENT kept, no index built
    assert [p.name for p in (workdir / "indexes").iterdir()] == [first.index_version]
    emb1, items1 = read_embeddings(workdir / "embeddings" / "first")
    emb2, items2 = read_embeddings(workdir / "embeddings" / "again")
    assert items2.column("id").to_pylist() == items1.column("id").to_pylist() and all(items2.column("reused").to_pylist())
    np.testing.assert_array_equal(emb2, emb1)
    part = run_embed(EmbedConfig(**{**vars(config), "run_name": "part", "tfds": "lookalike_tiny_floats:train[:4]"}))
    assert part.embedded == 0 and part.unchanged == part.items > 0  # a slice: cached, but other items: a new index
    assert part.files_read == 4
    assert part.index_version != first.index_version
    _, items3 = read_embeddings(workdir / "embeddings" / "part")
    assert set(items3.column("id").to_pylist()) < set(items1.column("id").to_pylist())
