"""Training without labels: instances from images and video windows, views as positives."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lookalike.model.config import apply_overrides
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.unlabelled import load_unlabelled_folder, split_instances, video_windows, view_set

SPEC = PreprocessSpec(image_size=8, channels=1)
# P x K batches of augmented views (the recipe README recommends for unlabelled data).
VIEWS = ["unlabelled=true", "loss=triplet", "mining=batch_all", "margin=0.5", "pk_classes=16", "pk_images=4"]


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_any_nesting_each_image_one_instance_and_bad_files_skipped(tmp_path, caplog):
    _png(tmp_path / "a.png", 10)
    _png(tmp_path / "x" / "y" / "b.png", 100)
    _png(tmp_path / "x" / "c.png", 200)
    (tmp_path / "x" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_unlabelled_folder(tmp_path, SPEC)
    assert data.images.shape == (3, 8, 8, 1) and data.labels.tolist() == [0, 1, 2]
    assert data.class_names == ["a.png", "x/c.png", "x/y/b.png"]
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in data.failures) == ["broken.jpg", "clip.mp4"]
    assert "broken.jpg" in caplog.text and "clip.mp4" in caplog.text


def test_byte_identical_copies_and_links_are_one_instance_not_negatives(tmp_path, caplog):
    """IMG_1 (1).png, a backup, a link to a file: the same bytes are the same picture, trained
    once, not as "different" instances pushed apart at distance 0."""
    _png(tmp_path / "2023" / "img_1.png", 10)
    _png(tmp_path / "2024" / "img_2.png", 120)
    shutil.copy(tmp_path / "2023" / "img_1.png", tmp_path / "2023" / "img_1 (1).png")
    (tmp_path / "backup").mkdir()
    shutil.copy(tmp_path / "2023" / "img_1.png", tmp_path / "backup" / "img_1.png")
    (tmp_path / "2024" / "link.png").symlink_to(tmp_path / "2024" / "img_2.png")
    with caplog.at_level("INFO", logger="lookalike.model.unlabelled"):
        data = load_unlabelled_folder(tmp_path, SPEC)
    assert data.class_names == ["2023/img_1 (1).png", "2024/img_2.png"]  # the first of each in sorted order
    assert data.labels.tolist() == [0, 1] and data.images.shape[0] == 2
    assert "3 byte-identical copies trained once, as the first file with those bytes" in caplog.text
    assert "from 2 files" in caplog.text
    (tmp_path / "2024" / "img_2.png").unlink()
    (tmp_path / "2024" / "link.png").unlink()
    with pytest.raises(ValueError, match=r"1 usable image\(s\) or video window\(s\) in 3 file\(s\) "
                                         r"\(0 unreadable, 2 byte-identical to another\); need at least 2"):
        load_unlabelled_folder(tmp_path, SPEC)


@pytest.mark.parametrize("cpus", [1, 3])
def test_a_copy_is_hashed_never_decoded_and_a_copy_of_a_broken_file_is_skipped_with_its_reason(
        tmp_path, make_video, monkeypatch, caplog, cpus):
    """A backup of a photo library doubles its files, not the decoding: only the first file
    (in listing order) with some bytes is decoded, on one thread or several."""
    import lookalike.model.parallel as parallel
    import lookalike.model.unlabelled as unlabelled

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    make_video(tmp_path / "clip.mp4", seconds=1.0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    shutil.copytree(tmp_path, tmp_path.parent / "backup")
    shutil.move(tmp_path.parent / "backup", tmp_path / "z-backup")
    # Listed between originals and copies, more files than the threads read ahead (2 per CPU): every
    # original is read before its copy starts, so the count below does not depend on the threads' timing.
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"m{i}.png")
    decoded = []
    for name in ("decode_image", "video_windows"):
        real = getattr(unlabelled, name)
        monkeypatch.setattr(unlabelled, name, lambda data, *a, real=real, **k: decoded.append(len(data)) or real(data, *a, **k))
    monkeypatch.setattr(parallel, "available_cpus", lambda: cpus)
    with caplog.at_level("INFO", logger="lookalike.model.unlabelled"):
        data = load_unlabelled_folder(tmp_path, PreprocessSpec(8, 3), window_s=1.0, frame_interval_s=0.5)
    assert len(decoded) == 14  # 4 images, the video, the broken file and the 8 others: none of the 6 copies
    assert [n.split("#")[0] for n in data.class_names] == ["clip.mp4", "img0.png", "img1.png", "img2.png", "img3.png",
                                                           *(f"m{i}.png" for i in range(8))]
    assert "5 byte-identical copies trained once" in caplog.text
    assert data.failures == [(str(tmp_path / "bad.png"), data.failures[0][1]),
                             (str(tmp_path / "z-backup" / "bad.png"),
                              f"the same bytes as bad.png, which failed: {data.failures[0][1]}")]


def test_listed_as_labelled_training_lists_an_unreadable_folder_named_and_a_linked_one_once(
        tmp_path, refuse_listing, caplog):
    """As ``data.walk_folders`` lists: a folder that cannot be read is named in a warning with
    its OS error (its files not used), a symlinked folder is followed, each real folder once."""
    import os

    _png(tmp_path / "data" / "a.png", 10)
    _png(tmp_path / "data" / "locked" / "hidden.png", 100)
    _png(tmp_path / "elsewhere" / "b.png", 200)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "elsewhere" / "loop")  # a loop: each folder once
    refuse_listing(tmp_path / "data" / "locked")
    with caplog.at_level("WARNING"):
        data = load_unlabelled_folder(tmp_path / "data", SPEC)
    assert data.class_names == ["a.png", "linked/b.png"]
    assert data.paths == [str(tmp_path / "data" / "a.png"), str(tmp_path / "data" / "linked" / "b.png")]
    assert f"cannot read folder {tmp_path / 'data' / 'locked'} (Permission denied)" in caplog.text


def test_a_data_folder_that_cannot_be_read_is_named_in_the_error(tmp_path, refuse_listing):
    """Not "0 file(s)" alone: the folder that could not be listed, and why."""
    _png(tmp_path / "data" / "a.png", 10)
    refuse_listing(tmp_path / "data")
    with pytest.raises(ValueError) as refused:
        load_unlabelled_folder(tmp_path / "data", SPEC)
    assert f"in 0 file(s) (0 unreadable); need at least 2; cannot read folder {tmp_path / 'data'}: Permission denied" \
        in str(refused.value)


@pytest.mark.parametrize("usable", [0, 1])
def test_fewer_than_two_usable_images_is_a_clear_error(tmp_path, usable):
    for i in range(usable):
        _png(tmp_path / f"{i}.png", 50)
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{tmp_path}: {usable} usable .* \(1 unreadable\); need at least 2"):
        load_unlabelled_folder(tmp_path, SPEC)
    with pytest.raises(ValueError, match="does not exist"):
        load_unlabelled_folder(tmp_path / "nothing", SPEC)


def test_video_windows_hold_nearby_frames_of_one_shot(tmp_path, make_video):
    data = make_video(tmp_path / "clip.mp4", seconds=3.0, fps=10, cut_at_s=1.5).read_bytes()
    frames, times, windows = video_windows(data, SPEC, window_s=1.0, frame_interval_s=0.25)
    assert frames.shape == (len(times), 8, 8, 1) and len(times) >= 8
    assert np.all(np.diff(windows) >= 0) and windows[0] == 0 and np.all(np.diff(windows) <= 1)
    for w in np.unique(windows):
        t = times[windows == w]
        assert t.max() - t.min() < 1.0
        assert np.all(t < 1.5) or np.all(t >= 1.5)  # no window spans the cut
    assert windows[times >= 1.5][0] == windows[times < 1.5][-1] + 1


def test_instances_are_held_out_whole_and_views_are_seeded():
    labels = np.repeat(np.arange(10), [1, 1, 1, 1, 1, 1, 3, 3, 3, 3])
    train, val = split_instances(labels, 0.3, seed=0)
    assert set(labels[train]).isdisjoint(labels[val]) and len(np.unique(labels[val])) == 3
    assert len(train) + len(val) == len(labels)
    assert len(split_instances(labels[:3], 0.3, seed=0)[1]) == 0  # 1 held out would give no retrieval query
    from lookalike.model.augment import UNLABELLED_VIEWS

    images = np.random.default_rng(0).random((len(labels), 8, 8, 1)).astype(np.float32)
    x, y = view_set(images, labels, UNLABELLED_VIEWS, views=3, seed=1)
    assert x.shape == (30, 8, 8, 1) and np.bincount(y).tolist() == [3] * 10
    np.testing.assert_array_equal(x, view_set(images, labels, UNLABELLED_VIEWS, views=3, seed=1)[0])


def test_unlabelled_batches_are_augmented_views_and_a_function_of_the_step(tiny_config):
    from lookalike.model.train import batch_maker, data_mesh

    config = apply_overrides(tiny_config, VIEWS + ["pk_classes=4"])
    images = np.random.default_rng(0).random((6, 16, 16, 1)).astype(np.float32)
    make_batch, _, per_step = batch_maker(config, images, np.arange(6, dtype=np.int32), data_mesh())
    x, labels = (np.asarray(a) for a in make_batch(3))
    assert per_step == 16 and x.shape == (16, 16, 16, 1)
    assert (labels.reshape(4, 4) == labels.reshape(4, 4)[:, :1]).all()  # K views of each of P images
    assert not np.allclose(x[0], x[1])  # the K copies of an image differ
    np.testing.assert_array_equal(x, np.asarray(make_batch(3)[0]))  # resume sees the same batch


def test_training_without_labels_beats_an_untrained_encoder_at_finding_views(tmp_path, digits_corpus, tiny_config):
    """200 real digits, folder labels ignored: after 100 steps, a view of a held-out image finds
    another view of the same image far more often than with the untrained encoder."""
    from lookalike.model.artifact import load_encoder
    from lookalike.model.encoder import create_encoder
    from lookalike.model.sources import load_training_data
    from lookalike.model.train import evaluate, train_and_evaluate
    from lookalike.model.unlabelled import view_holdout

    config = apply_overrides(tiny_config, VIEWS + ["num_steps=100", "eval_every_steps=50"])
    result = train_and_evaluate(config, tmp_path, data_dir=digits_corpus)
    meta = json.loads((result.model_dir / "model.json").read_text())
    assert meta["config"]["unlabelled"] is True and meta["same_item_threshold"] > 0
    assert result.metrics["val_images"] == 40 and result.metrics["val_views"] == 120  # 20 % of 200 images, 3 views

    _, _, x_val, y_val = view_holdout(load_training_data(config, digits_corpus).data, config)
    trained = load_encoder(result.model_dir).embed(x_val)
    from lookalike.model.metrics import retrieval_metrics

    after, before = retrieval_metrics(trained, y_val), evaluate(create_encoder(config), x_val, y_val)
    assert after["precision_at_1"] == pytest.approx(result.metrics["precision_at_1"], abs=0.02)
    # Chance is 2/119; the untrained encoder gets ~0.09, the trained one ~0.3 (seeds 1-3: 2.8x-3.5x).
    assert after["precision_at_1"] > 2 * before["precision_at_1"], (after, before)
    assert after["map_at_r"] > before["map_at_r"] + 0.04, (after, before)


def test_training_on_unlabelled_videos_and_images_publishes_a_model(tmp_path, make_video, digits_corpus, tiny_config):
    from lookalike.model.train import train_and_evaluate

    data = tmp_path / "clips"
    data.mkdir()
    make_video(data / "a.mp4", seconds=3.0, cut_at_s=1.5)
    make_video(data / "b.mp4", seconds=2.0, cut_at_s=None)
    for path in sorted(digits_corpus.rglob("*.png"))[:4]:
        shutil.copy(path, data / path.name)
    config = apply_overrides(tiny_config, VIEWS + ["num_steps=10", "eval_every_steps=10", "val_fraction=0.3"])
    result = train_and_evaluate(config, tmp_path / "w", data_dir=data)
    assert (tmp_path / "w" / "models" / "LATEST").read_text().strip() == result.version
    assert result.metrics["val_views"] >= 6 and np.isfinite(result.metrics["final_loss"])
    assert 0.0 <= result.metrics["map_at_r"] <= 1.0


def test_videos_and_photos_decode_on_several_threads_as_on_one(tmp_path, make_video, monkeypatch, watch_decode_pools):
    """A folder holding videos goes to the decode pool (``model.parallel``); the instances,
    frames and skipped files are those of decoding one file at a time."""
    import lookalike.model.parallel as parallel

    pools = watch_decode_pools(parallel)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    make_video(tmp_path / "clip.mp4", seconds=2.0)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500)
    spec = PreprocessSpec(8, 3)
    results = []
    for cpus in (1, 3):
        monkeypatch.setattr(parallel, "available_cpus", lambda cpus=cpus: cpus)
        results.append(load_unlabelled_folder(tmp_path, spec, window_s=1.0, frame_interval_s=0.5))
    one, three = results
    assert pools == [False, True]  # videos: on the pool when there is more than one CPU, inline with one
    assert three.class_names == one.class_names and any("#t=" in n for n in one.class_names)
    assert three.paths == one.paths and three.labels.tolist() == one.labels.tolist()
    assert [f[0] for f in three.failures] == [f[0] for f in one.failures] == [str(tmp_path / "broken.mp4")]
    np.testing.assert_array_equal(three.images, one.images)
