"""Thumbnails written by the decode stage, and the encoder batch the inference handler uses."""

import hashlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from lookalike.pipeline.inference import FlaxEncoderHandler
from lookalike.pipeline.thumbnails import ThumbnailWriter, reusable_jpeg, thumbnail_path


def _jpeg(size=(32, 32), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90 if mode == "L" else (200, 30, 40)).save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_small_exif_free_rgb_jpeg_is_its_own_thumbnail_a_hard_link(tmp_path):
    """No new inode (file creation is the cost); a link to a source edited in place since is
    made again to the file that now has those bytes (the server checks links: test_serving_thumbnails)."""
    data, other = _jpeg(), _jpeg(size=(24, 24))
    source = tmp_path / "a.jpg"
    source.write_bytes(data)
    writer = ThumbnailWriter(threads=2)
    path = thumbnail_path(str(tmp_path / "thumbs"), "h1")
    writer.submit(Image.open(io.BytesIO(data)), path, (str(source), data)).result()
    assert open(path, "rb").read() == data and os.path.samefile(path, source)
    with open(source, "r+b") as f:  # an in-place edit: same inode, new picture
        f.write(other)
        f.truncate()
    copy = tmp_path / "copy-of-a.jpg"  # the old bytes found again under another name
    copy.write_bytes(data)
    writer.submit(Image.open(io.BytesIO(data)), path, (str(copy), data)).result()
    writer.close()
    assert open(path, "rb").read() == data and os.path.samefile(path, copy)
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary file left


def test_a_present_thumbnail_is_kept_and_a_short_one_rewritten(tmp_path):
    from lookalike.pipeline.thumbnails import write_copy

    path = thumbnail_path(str(tmp_path / "thumbs"), "h2")
    os.makedirs(os.path.dirname(path))
    write_copy(b"thumbnail", path)
    first = os.stat(path).st_ino
    write_copy(b"thumbnail", path)  # another writer of the same thumbnail: the first file stays
    assert open(path, "rb").read() == b"thumbnail" and os.stat(path).st_ino == first
    with open(path, "wb") as f:  # as a run killed while writing it leaves it
        f.write(b"thumb")
    write_copy(b"thumbnail", path)
    assert open(path, "rb").read() == b"thumbnail"
    assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]


@pytest.mark.parametrize("kind", ["large", "grayscale", "exif", "png", "frame"])
def test_other_pictures_are_re_encoded_as_small_rgb_jpegs(tmp_path, kind):
    if kind == "png":
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated: the bytes are not the picture as shown
        data = {"large": lambda: _jpeg((300, 200)), "grayscale": lambda: _jpeg(mode="L"),
                "exif": lambda: _jpeg(exif=exif.tobytes()), "frame": _jpeg}[kind]()
    img = Image.open(io.BytesIO(data))
    img.load()
    original = None if kind == "frame" else (str(tmp_path / "src"), data)
    assert not (original and reusable_jpeg(img, data))
    writer = ThumbnailWriter(threads=2)
    path = thumbnail_path(str(tmp_path / "thumbs"), kind)
    writer.submit(img, path, original)
    assert writer.wait() == 1
    thumb = Image.open(path)
    assert thumb.format == "JPEG" and thumb.mode == "RGB" and max(thumb.size) <= 128


def test_a_failed_thumbnail_surfaces_in_its_future(tmp_path):
    (tmp_path / "thumbs").write_text("a file where the folder should be")
    writer = ThumbnailWriter(threads=1)
    with pytest.raises(OSError):
        writer.submit(Image.new("RGB", (8, 8)), str(tmp_path / "thumbs" / "ab" / "x.jpg"), None).result()


def test_handler_runs_whole_batches_through_one_forward(trained_store):
    handler = FlaxEncoderHandler(str(trained_store.require_model()), min_batch_size=1, max_batch_size=1, encoder_batch=64)
    assert handler.load_model().max_batch == 64


def test_thumbnail_paths_in_one_loop_match_thumbnail_path():
    from lookalike.pipeline.thumbnails import thumbnail_path, thumbnail_paths

    hashes = ["ab" * 32, "ab" * 32 + "#t=1.500", "x"]
    for folder in ("/w/thumbnails/", "/w/thumbnails", ""):
        assert thumbnail_paths(folder, hashes) == [thumbnail_path(folder, h) for h in hashes]


@pytest.mark.parametrize("kind", ["gray16", "rgba", "palette_transparent"])
def test_thumbnails_show_16_bit_and_transparent_pictures_as_the_model_sees_them(tmp_path, kind):
    """16-bit grayscale scaled to 8 bits (not clipped to white); transparency on white."""
    import numpy as np

    from lookalike.model.preprocess import to_mode

    if kind == "gray16":
        img = Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16), "I;16")
    elif kind == "rgba":
        img = Image.new("RGBA", (64, 64), (0, 0, 255, 0))  # fully transparent blue: white where it shows
        img.paste((255, 0, 0, 255), (0, 0, 32, 64))
    else:
        img = Image.new("P", (64, 64), 0)
        img.putpalette([0, 0, 255] + [255, 0, 0] * 255)
        img.paste(1, (0, 0, 32, 64))
        img.info["transparency"] = 0
    path = tmp_path / f"{kind}.jpg"
    ThumbnailWriter(threads=1).submit(img, str(path)).result()
    thumb = np.asarray(Image.open(path).convert("RGB"), np.float64)
    expected = np.asarray(to_mode(img, 3), np.float64)
    assert np.abs(thumb - expected).mean() < 6  # JPEG noise only
    if kind == "gray16":
        assert 60 < thumb.mean() < 200  # the old convert("RGB") made it almost all white
    else:
        assert thumb[:, 40:].mean() > 240  # transparent: white, not the hidden blue


def test_a_dark_16_bit_picture_has_the_thumbnail_of_its_8_bit_original(tmp_path):
    """Scaled by bit depth like the model input (to_mode), not stretched to its own maximum."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 41, (40, 48), dtype=np.uint8)  # dark: at most 40
    writer = ThumbnailWriter(threads=1)
    for name, img in (("eight", Image.fromarray(pixels, "L")), ("sixteen", Image.fromarray(pixels.astype(np.uint16) * 257))):
        writer.submit(img, str(tmp_path / f"{name}.jpg"))
    writer.close()
    eight, sixteen = (np.asarray(Image.open(tmp_path / f"{n}.jpg").convert("L")) for n in ("eight", "sixteen"))
    np.testing.assert_array_equal(sixteen, eight)


def test_prune_removes_the_folders_it_empties_and_empty_ones(tmp_path, monkeypatch):
    import lookalike.pipeline.thumbnails as thumbnails

    monkeypatch.setattr(thumbnails, "PRUNE_GRACE_S", 0.0)
    (tmp_path / "ab").mkdir()
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / "old.jpg").write_bytes(b"x")
    (tmp_path / "ef").mkdir()
    (tmp_path / "ef" / "kept.jpg").write_bytes(b"y")
    assert thumbnails.prune_thumbnails(tmp_path, {"ef/kept.jpg"}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ef"]


def test_a_linked_thumbnail_is_stale_only_once_its_bytes_changed_and_a_grown_file_is_not_read(tmp_path):
    """``stale_linked_thumbnails``: a thumbnail hard-linked to a changed file is stale when its
    bytes no longer match its address (edited in place), not when the file was only touched; a
    file grown past what is ever linked is stale without being read."""
    import tracemalloc

    from lookalike.pipeline.reuse import ListedFile
    from lookalike.pipeline.thumbnails import COPY_MAX_BYTES, stale_linked_thumbnails, thumbnail_path

    thumbs = tmp_path / "thumbs"
    photos = {}
    for name, data in (("touched.jpg", b"\xff\xd8\xff one"), ("edited.jpg", b"\xff\xd8\xff two"),
                       ("grown.jpg", b"\xff\xd8\xff three")):
        photo = tmp_path / name
        photo.write_bytes(data)
        link = Path(thumbnail_path(str(thumbs), hashlib.sha256(data).hexdigest()))
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(photo, link)
        photos[name] = link
    os.utime(tmp_path / "touched.jpg", (1e9, 1e9))
    with open(tmp_path / "edited.jpg", "r+b") as f:
        f.write(b"\xff\xd8\xff TWO")
    with open(tmp_path / "grown.jpg", "ab") as f:
        f.write(b"\0" * (8 * COPY_MAX_BYTES))
    listed = [ListedFile(str(p), p.stat().st_size, p.stat().st_mtime, p.stat().st_ino) for p in tmp_path.glob("*.jpg")]
    tracemalloc.start()
    try:
        stale = stale_linked_thumbnails(listed, str(thumbs))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(stale) == sorted([str(photos["edited.jpg"]), str(photos["grown.jpg"])])
    assert peak < 2 * COPY_MAX_BYTES, peak
