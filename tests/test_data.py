from pathlib import Path

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


def test_a_dangling_link_is_named_with_where_it_points_not_left_out_unseen(tmp_path, caplog):
    """A link to a photo that was moved: reported and skipped like any unreadable file (labelled
    and unlabelled training), not filtered out before anyone could see it."""
    from lookalike.model.unlabelled import load_unlabelled_folder

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 40 * i + (5 if label == "a" else 90)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "a" / "moved.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    for data in (load_labelled_folder(tmp_path, SPEC), load_unlabelled_folder(tmp_path, SPEC)):
        assert data.images.shape[0] == 4
        [(path, reason)] = data.failures
        assert path == str(tmp_path / "a" / "moved.jpg")
        assert f"dangling symbolic link: its target {str(tmp_path / 'elsewhere.jpg')!r} does not exist" in reason
    assert "moved.jpg" in caplog.text


def test_folder_loader_leaves_out_excluded_files(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / label / f"{i}.png")
    data = load_labelled_folder(tmp_path, SPEC, exclude=["a/0.png", "b/2.png", "c/9.png"])
    assert sorted(p.split(str(tmp_path) + "/")[1] for p in data.paths) == ["a/1.png", "a/2.png", "b/0.png", "b/1.png"]
    assert data.images.shape[0] == 4


def test_a_class_of_videos_only_is_explained(tmp_path, caplog):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / label / f"{i}.png")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "v.mp4").write_bytes(b"\x00" * 16)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"")
    with caplog.at_level("WARNING"):
        data = load_labelled_folder(tmp_path, SPEC)
    assert data.class_names == ["a", "b"]
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "class 'clips'" in warned and "videos but no images" in warned and "--unlabelled" in warned
    assert "class 'broken'" in warned and "no readable images" in warned


def test_images_outside_class_folders_and_videos_in_them_are_named_as_left_out(tmp_path, caplog):
    for label in ("a", "b"):
        (tmp_path / label / "sub").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / label / f"{i}.png")
    (tmp_path / "b" / "sub" / "trip.mp4").write_bytes(b"\x00" * 16)
    for name in ("loose.png", "other.jpg"):
        Image.new("L", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING"):
        data = load_labelled_folder(tmp_path, SPEC)
    assert data.images.shape[0] == 4
    warned = [r.getMessage() for r in caplog.records]
    assert f"2 image(s) at the top of {tmp_path} (e.g. loose.png) are in no class folder: left out of training (labelled " \
           "data is one sub-folder per class; `train --unlabelled` uses every image and video)" in warned, warned
    assert f"1 video(s) in the class folders of {tmp_path} (e.g. b/sub/trip.mp4) are left out of training: labelled " \
           "training uses images; `train --unlabelled` uses every image and video" in warned, warned
    caplog.clear()
    for name in ("loose.png", "other.jpg", "b/sub/trip.mp4"):
        (tmp_path / name).unlink()
    with caplog.at_level("WARNING"):
        load_labelled_folder(tmp_path, SPEC, role="evaluation")
    assert not caplog.records  # nothing left out: nothing said


def test_folder_without_classes_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=f"^training data folder {tmp_path} needs one sub-folder per class and at least "
                                         "2 classes, found 0$"):
        load_labelled_folder(tmp_path, SPEC)


def test_a_flat_folder_of_photos_is_pointed_to_unlabelled_training(tmp_path):
    """~/photos with every picture at its top level: no class to learn from, and the way out named."""
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"p{i}.JPG")
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"found 0; it holds 3 image\(s\) and 1 video\(s\) at its top level, in no "
                                         r"class: sort them into one sub-folder per class, or train without labels with "
                                         r"--unlabelled"):
        load_labelled_folder(tmp_path, SPEC)
    with pytest.raises(ValueError, match=r"^evaluation data folder .* found 0$"):  # eval trains nothing: no such hint
        load_labelled_folder(tmp_path, SPEC, role="evaluation")


def test_pk_sampler_draws_p_classes_with_k_images_each():
    from lookalike.model.data import PKSampler

    labels = np.repeat(np.arange(6), 5)
    sampler = PKSampler(labels, num_classes=4, per_class=3, seed=0)
    idx, lab = sampler.sample()
    assert idx.shape == (12,) and sampler.batch_size == 12
    assert (labels[idx] == lab).all()
    groups = lab.reshape(4, 3)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 4
    assert all(len(set(idx[i * 3:(i + 1) * 3].tolist())) == 3 for i in range(4))  # no repeats when a class has >= K
    again, _ = sampler.sample(np.random.default_rng([0, 7]))
    np.testing.assert_array_equal(again, sampler.sample(np.random.default_rng([0, 7]))[0])


def test_pk_sampler_policy_for_small_classes(caplog):
    from lookalike.model.data import PKSampler

    labels = np.array([0, 0, 1, 1, 1, 1, 2])  # class 0 has 2 < K images, class 2 a single one
    sampler = PKSampler(labels, num_classes=8, per_class=4, seed=0, class_names=["ant", "bee", "cat"])
    assert sampler.num_classes == 2  # P shrinks to the usable classes
    idx, lab = sampler.sample()
    assert len(idx) == 8 and 2 not in lab.tolist()
    assert "single image left out of P x K batches (e.g. 'cat')" in caplog.text and "replacement" in caplog.text
    assert "2 class(es) with 2+ images, fewer than pk_classes=8: P x K batches use P=2" in caplog.text
    with pytest.raises(ValueError, match="at least 2 classes"):
        PKSampler(np.array([0, 0, 1]), num_classes=2, per_class=2, seed=0)
    with pytest.raises(ValueError, match="per_class"):
        PKSampler(labels, num_classes=2, per_class=1, seed=0)


def test_samplers_keep_single_image_classes_when_asked(caplog):
    from lookalike.model.data import PKSampler

    labels = np.arange(5)  # unlabelled: each image its own instance
    sampler = PKSampler(labels, num_classes=3, per_class=4, seed=0, min_images=1)
    idx, lab = sampler.sample()
    assert sampler.num_classes == 3 and (idx.reshape(3, 4) == idx.reshape(3, 4)[:, :1]).all()
    assert "single image" not in caplog.text and "replacement" not in caplog.text
    a, b, sim = PairSampler(labels, seed=0, min_images=1).sample(16)
    assert (a[sim == 1] == b[sim == 1]).all() and (a[sim == 0] != b[sim == 0]).all()


def test_symlinked_folders_inside_a_class_are_read_once(tmp_path):
    import os

    def write(folder, count, shade):
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), shade + i).save(folder / f"{i}.png")

    write(tmp_path / "elsewhere" / "dogs", 3, 10)
    write(tmp_path / "data" / "cat", 2, 200)
    write(tmp_path / "data" / "dog", 1, 100)
    os.symlink(tmp_path / "elsewhere" / "dogs", tmp_path / "data" / "dog" / "more")
    os.symlink(tmp_path / "data" / "dog", tmp_path / "elsewhere" / "dogs" / "loop")  # a loop: each folder once
    data = load_labelled_folder(tmp_path / "data", PreprocessSpec(image_size=8, channels=1))
    assert sorted(np.bincount(data.labels).tolist()) == [2, 4]
    assert len(set(data.paths)) == len(data.paths) == 6


def test_a_sample_decodes_only_the_sampled_files(tmp_path):
    for label, shade in (("a", 10), ("b", 200)):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("L", (8, 8), shade).save(tmp_path / label / f"{i}.png")
            (tmp_path / label / f"bad{i}.png").write_bytes(b"not a png")
    spec = PreprocessSpec(image_size=8, channels=1)
    sample = load_labelled_folder(tmp_path, spec, max_items=6, seed=1)
    assert len(sample.labels) + len(sample.failures) == 6  # 40 files listed, 6 decoded
    again = load_labelled_folder(tmp_path, spec, max_items=6, seed=1)
    assert again.paths == sample.paths  # seeded
    assert len(load_labelled_folder(tmp_path, spec).labels) == 20


def test_an_unreadable_class_folder_is_named_not_called_empty(tmp_path, refuse_listing, caplog):
    for label in ("a", "b", "locked"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / label / f"{i}.png")
    refuse_listing(tmp_path / "locked")
    with caplog.at_level("WARNING"):
        data = load_labelled_folder(tmp_path, SPEC)
    assert data.class_names == ["a", "b"]
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert f"cannot read folder {tmp_path / 'locked'} (Permission denied)" in warned
    assert "class 'locked'" in warned and "cannot be read" in warned and "no images" not in warned


def test_a_named_pipe_in_a_class_folder_is_not_listed_so_never_opened(tmp_path):
    import os

    from lookalike.model.data import list_images

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / label / f"{i}.png")
    os.mkfifo(tmp_path / "a" / "pipe.png")  # read_bytes on it would block until a writer comes
    assert tmp_path / "a" / "pipe.png" not in list_images(tmp_path / "a")
    expected = [str(tmp_path / c / f"{i}.png") for c in "ab" for i in range(2)]
    assert load_labelled_folder(tmp_path, SPEC).paths == expected


def test_a_single_image_class_is_explained_for_what_the_folder_is_for(tmp_path, caplog):
    """Training: the image forms no similar pair; evaluation: as a query it can only miss."""
    for name, n in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("L", (8, 8), 60 * i).save(tmp_path / name / f"{i}.png")
    with caplog.at_level("WARNING"):
        load_labelled_folder(tmp_path, SPEC)
    assert "class 'a' has a single image: it forms no similar pair" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_labelled_folder(tmp_path, SPEC, role="evaluation")
    assert "class 'a' has a single image: no other image of its class can be found for it" in caplog.text
    assert "similar pair" not in caplog.text


def test_photo_sized_files_decode_on_several_threads_in_order(tmp_path, monkeypatch, watch_decode_pools):
    """Classes of big files go to the decode pool (``model.parallel``), small ones stay
    inline; either way the arrays, labels, paths and skipped files are those of decoding one
    by one."""
    import lookalike.model.parallel as parallel
    from lookalike.model.preprocess import decode_image

    pools = watch_decode_pools(parallel)
    monkeypatch.setattr(parallel, "available_cpus", lambda: 3)
    rng = np.random.default_rng(0)
    for label, side in (("big", 128), ("small", 12)):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "big" / "2.png").write_bytes((tmp_path / "big" / "3.png").read_bytes()[:40_000])  # truncated
    spec = PreprocessSpec(8, 3)
    got = load_labelled_folder(tmp_path, spec)
    assert pools == [True, False]  # "big" (~49 KB files) on the pool, "small" inline
    assert [p.rsplit("/", 2)[-2:] for p in got.paths] == [["big", n] for n in ("0.png", "1.png", "3.png", "4.png")] + [
        ["small", f"{i}.png"] for i in range(5)]
    assert got.labels.tolist() == [0] * 4 + [1] * 5
    assert [f[0].rsplit("/", 1)[-1] for f in got.failures] == ["2.png"]
    expected = np.stack([decode_image(open(p, "rb").read(), spec) for p in got.paths])
    np.testing.assert_array_equal(got.images, expected)


def test_a_file_given_as_the_data_folder_is_called_a_file(tmp_path):
    from lookalike.model.data import load_labelled_folder, not_a_folder

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"folder {tmp_path / 'notes.txt'} is a file, not a folder"):
        load_labelled_folder(tmp_path / "notes.txt", PreprocessSpec(8, 1))
    assert not_a_folder(tmp_path / "gone") == "does not exist"


def test_a_class_that_links_to_another_or_a_loop_to_the_root_adds_no_copies_under_another_label(tmp_path, caplog):
    """Each real folder once across classes: "dog2 -> dog" is not a third class of the same
    pictures, and a link inside a class back to the root does not read the other classes again."""
    import os

    def write(folder, count, shade):
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), shade + i).save(folder / f"{i}.png")

    root = tmp_path / "data"
    write(root / "cat", 2, 200)
    write(root / "dog", 3, 100)
    write(root / ".hidden", 2, 50)
    os.symlink(root / "dog", root / "dog2")
    os.symlink(root / "dog", root / "a_dog")  # an alias sorted before the folder itself
    os.symlink(root, root / "cat" / "loop")
    data = load_labelled_folder(root, PreprocessSpec(image_size=8, channels=1))
    assert data.class_names == ["cat", "dog"]
    assert sorted(p.relative_to(root).as_posix() for p in map(Path, data.paths)) == [
        "cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    assert np.bincount(data.labels).tolist() == [2, 3]
    assert "class 'dog2' in" in caplog.text and "is a symbolic link to a folder of class 'dog'" in caplog.text
    assert "class 'a_dog' in" in caplog.text and "has no images" not in caplog.text


def test_a_class_linked_into_a_hidden_pool_keeps_its_images_and_one_linked_into_another_class_names_it(tmp_path,
                                                                                                        caplog):
    import os

    root = tmp_path / "data"
    for folder, shade in ((".pool/cats", 10), ("dog", 100), ("all/kittens", 150), ("all/adults", 200)):
        (root / folder).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), shade + i).save(root / folder / f"{i}.png")
    os.symlink(root / ".pool" / "cats", root / "cat")  # the only way to its images: they are cat's
    os.symlink(root / "all" / "kittens", root / "kitten")  # a folder of class 'all': read once, as 'all'
    data = load_labelled_folder(root, PreprocessSpec(image_size=8, channels=1))
    assert data.class_names == ["all", "cat", "dog"] and np.bincount(data.labels).tolist() == [4, 2, 2]
    assert "class 'kitten' in" in caplog.text and "a folder of class 'all'" in caplog.text
    assert not [p for p in data.paths if "/.pool/" in p]  # listed by the class's path


def write_pngs(folder: Path, count: int, shade: int) -> Path:
    """``count`` distinct 8x8 gray PNGs in ``folder`` (created)."""
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("L", (8, 8), shade + i).save(folder / f"{i}.png")
    return folder


def test_classes_that_are_all_links_to_one_folder_keep_its_images_once(tmp_path):
    import os

    real = write_pngs(tmp_path / "elsewhere" / "birds", 3, 10)
    root = tmp_path / "data"
    write_pngs(root / "cat", 2, 200)
    for name in ("birds_b", "birds_a"):
        os.symlink(real, root / name)
    data = load_labelled_folder(root, PreprocessSpec(image_size=8, channels=1))
    assert data.class_names == ["birds_a", "cat"] and np.bincount(data.labels).tolist() == [3, 2]


def test_a_class_that_links_to_its_images_keeps_them_from_a_link_inside_another_class(tmp_path):
    """h1 -> ext and dog/cats -> ext: the class folder's own link wins, whatever the walk order."""
    import os

    ext = write_pngs(tmp_path / "ext", 3, 10)
    root = tmp_path / "data"
    write_pngs(root / "dog", 2, 200)
    for class_name in ("a_first", "z_last"):
        os.symlink(ext, root / class_name)
        os.symlink(ext, root / "dog" / "cats")
        data = load_labelled_folder(root, PreprocessSpec(image_size=8, channels=1))
        counts = dict(zip(data.class_names, np.bincount(data.labels).tolist()))
        assert counts == {class_name: 3, "dog": 2}, counts
        os.unlink(root / class_name)
        os.unlink(root / "dog" / "cats")
