"""Reading corpus files: whole, whatever the size the listing saw, with errors naming the path."""

import os

import pytest

from lookalike.model.parallel import PARALLEL_MIN_BYTES
from lookalike.pipeline.sources import hash_file, read_bytes, worth_a_thread


def test_a_local_file_is_read_whole(tmp_path):
    data = os.urandom(3_000_000)
    (tmp_path / "f.bin").write_bytes(data)
    assert read_bytes(str(tmp_path / "f.bin")) == data
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert read_bytes(str(tmp_path / "empty.jpg")) == b""


@pytest.mark.parametrize("most_per_read", [1, 1000, 2_999_999])
def test_a_short_read_is_continued_to_the_end_of_the_file(tmp_path, monkeypatch, most_per_read):
    """Linux reads at most 2 GiB - 4 KiB at once and a network filesystem may give less than
    asked: such a short read is not the whole file (an image over 2 GiB was cut short,
    hashed and indexed as its first 2 GiB). Simulated here by capping every read."""
    data = os.urandom(3_000_000)
    (tmp_path / "f.bin").write_bytes(data)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, most_per_read)))
    assert read_bytes(str(tmp_path / "f.bin")) == data


def test_a_file_that_grows_or_shrinks_after_its_stat_is_read_whole(tmp_path, monkeypatch):
    import lookalike.pipeline.sources as sources

    path = tmp_path / "f.bin"
    real_check = sources.check_regular_file
    for before, after in ((b"x" * 10, b"y" * 5000), (b"x" * 5000, b"y" * 10), (b"", b"z" * 3)):
        path.write_bytes(before)

        def check_then_rewrite(uri, after=after):
            found = real_check(uri)
            path.write_bytes(after)  # between the stat and the read
            return found

        monkeypatch.setattr(sources, "check_regular_file", check_then_rewrite)
        assert read_bytes(str(path)) == after


def test_unreadable_paths_raise_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_bytes(str(tmp_path / "missing.jpg"))
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.jpg"):
        read_bytes(str(tmp_path / "folder.jpg"))


def test_a_large_photo_is_embedded_from_the_servers_input_and_recorded_at_its_size(tmp_path):
    """The pipeline decodes a large image shrunk, exactly as training and the server's
    queries do (``decode_image``), so an upload of an indexed file is its exact twin; the
    item keeps the photo's upright size, and its thumbnail comes from the shrunk picture."""
    import io

    import numpy as np
    from PIL import Image

    from lookalike.model.preprocess import PreprocessSpec, decode_image
    from lookalike.pipeline.batches import stack_model_input
    from lookalike.pipeline.sources import decode_source
    from lookalike.pipeline.thumbnails import write_thumbnail
    from lookalike.pipeline.video import FrameSampling

    y, x = np.mgrid[0:900, 0:1600].astype(np.float32)
    photo = Image.fromarray(np.stack([x / 1600 * 255, y / 900 * 255, (x + y) % 256], -1).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8  # shown turned a quarter: 900 wide, 1600 high
    for name, save in (("plain.jpg", {}), ("turned.jpg", {"exif": exif.tobytes()}), ("photo.png", {})):
        buf = io.BytesIO()
        photo.save(buf, "PNG" if name.endswith("png") else "JPEG", **save)
        data = buf.getvalue()
        spec = PreprocessSpec(image_size=32, channels=3)
        thumbs = tmp_path / "thumbs" / name
        [(meta, model_input)] = decode_source("h" + name, [str(tmp_path / name)], spec, str(thumbs), FrameSampling(), data,
                                              write_thumbnail)
        assert (meta["width"], meta["height"]) == ((900, 1600) if name == "turned.jpg" else (1600, 900))
        np.testing.assert_array_equal(stack_model_input([model_input])[0], decode_image(data, spec))
        [written] = list(thumbs.rglob("*.jpg"))
        assert max(Image.open(written).size) == 128


def test_list_file_comments_byte_order_mark_and_hashes_in_names(tmp_path):
    from lookalike.pipeline.sources import read_list_file

    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeff../mix/dog/d1.jpg\n"  # a BOM, as Windows editors write
                        "# a whole-line comment\n"
                        "  ../mix/dog/d5.jpg # five\n"
                        "../mix/dog/d6.jpg\t# six\n"
                        "../mix/clip#2.jpg\n"  # '#' inside a name is part of it
                        "file:///data/odd%20%23name.jpg\n"
                        "\n".encode("utf-8"))
    mix = str(tmp_path.parent / "mix")
    assert read_list_file(str(listing)) == [f"{mix}/dog/d1.jpg", f"{mix}/dog/d5.jpg", f"{mix}/dog/d6.jpg",
                                            f"{mix}/clip#2.jpg", "/data/odd #name.jpg"]


def test_file_urls_of_this_machine_in_any_spelling_and_others_named(tmp_path):
    from lookalike.pipeline.sources import read_list_file

    listing = tmp_path / "list.txt"
    listing.write_text("file:///data/a.jpg\nfile://localhost/data/b%20c.jpg\nFILE:///data/d.jpg\n"
                       "File://LocalHost/data/e.jpg\n")
    assert read_list_file(str(listing)) == ["/data/a.jpg", "/data/b c.jpg", "/data/d.jpg", "/data/e.jpg"]
    listing.write_text("file:///data/a.jpg\n# another machine's\nfile://nas/photos/x.jpg\n")
    with pytest.raises(ValueError, match=rf"list file {listing} line 3: 'file://nas/photos/x.jpg' names a file on "
                                         r"host 'nas', not on this machine"):
        read_list_file(str(listing))


def test_a_list_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    from lookalike.pipeline.sources import read_list_file

    listing = tmp_path / "latin1.txt"
    listing.write_bytes(b"a.jpg\n# notes\ncaf\xe9.jpg\n")
    with pytest.raises(ValueError, match=rf"list file {listing} is not UTF-8 text: line 3 has a byte it cannot decode "
                                         r"\(b'\\xe9', invalid continuation byte\)"):
        read_list_file(str(listing))


def _in_thread(fn, timeout_s: float = 10.0):
    """``fn()``'s result or exception, from a daemon thread: a call that would block forever
    (opening a named pipe) fails the test after ``timeout_s`` instead of hanging it."""
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still blocked after {timeout_s}s"
    return out


def test_a_named_pipe_or_socket_is_never_opened(tmp_path):
    """Opening a named pipe blocks until a writer comes: a path that is not a regular file
    (a pipe, a socket, a link to one) is refused by its stat, naming it and what it is."""
    import socket

    from lookalike.pipeline.sources import NotRegularFileError

    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink(tmp_path / "pipe.jpg", tmp_path / "link.jpg")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.jpg"))
        for name, kind in (("pipe.jpg", "named pipe"), ("link.jpg", "named pipe"), ("sock.jpg", "socket")):
            out = _in_thread(lambda: read_bytes(str(tmp_path / name)))
            assert isinstance(out.get("error"), NotRegularFileError), out
            assert f"not a regular file ({kind})" in str(out["error"]) and name in str(out["error"])


def test_a_large_file_is_hashed_piece_by_piece(tmp_path):
    """``hash_file`` gives the sha256 of the whole file while holding one chunk of it at a
    time; like ``read_bytes``, it names a path it cannot read and never opens a named pipe."""
    import hashlib
    import tracemalloc

    from lookalike.pipeline.sources import NotRegularFileError

    data = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "big.mp4").write_bytes(data)
    tracemalloc.start()
    try:
        digest = hash_file(str(tmp_path / "big.mp4"), chunk_bytes=64 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(data).hexdigest()
    assert peak < 512 * 1024, peak
    assert hash_file(str(tmp_path / "big.mp4")) == digest  # the default chunk
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        hash_file(str(tmp_path / "gone.mp4"))
    os.mkfifo(tmp_path / "pipe.mp4")
    out = _in_thread(lambda: hash_file(str(tmp_path / "pipe.mp4")))
    assert isinstance(out.get("error"), NotRegularFileError) and "pipe.mp4" in str(out["error"]), out


def test_a_large_video_is_hashed_and_decoded_without_being_held_whole(tmp_path, make_noisy_video):
    """A video larger than what travels between stages is hashed piece by piece (its bytes
    never go on) and decoded from the file as it plays: every frame is an item, with the
    source hash of its bytes, while memory holds a small part of the file at a time."""
    import hashlib
    import tracemalloc

    import numpy as np

    from lookalike.model.preprocess import PreprocessSpec
    from lookalike.pipeline.sources import CARRY_BYTES_MAX, HASH_CHUNK_BYTES, NEW, ReadSourceFn, decode_source
    from lookalike.pipeline.video import READ_BUFFER_BYTES, FrameSampling, video_source_hash

    path = make_noisy_video(tmp_path / "noise.mp4", frames=48)
    size = path.stat().st_size
    assert size > 8 * max(CARRY_BYTES_MAX, HASH_CHUNK_BYTES, READ_BUFFER_BYTES), size
    sampling = FrameSampling(interval_s=1.0)
    reader = ReadSourceFn(None, 1, sampling)
    reader.setup()
    tracemalloc.start()
    try:
        outputs = list(reader.read_one(str(path), size, path.stat().st_mtime))
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        (tag, (source_hash, uri, data)), = [o for o in outputs if o[0] == NEW]
        thumbs = tmp_path / "thumbs"
        thumbs.mkdir()
        decoded = list(decode_source(source_hash, [uri], PreprocessSpec(32, 3), str(thumbs), sampling, data))
        items = [(meta["content_hash"], meta["timestamp_s"]) for meta, _ in decoded]
        decode_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data is None and source_hash == video_source_hash(hashlib.sha256(path.read_bytes()).hexdigest(), sampling)
    assert [t for _, t in items] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and items[0][0] == f"{source_hash}#t=0.000"
    # frames wait for each other as uint8 pixels of the model's shape (a quarter of float32's memory)
    assert all(pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3) for _, pixels in decoded)
    # decoding holds a few read buffers and a few decoded 320x240 frames at a time
    assert read_peak < 3 * HASH_CHUNK_BYTES and decode_peak < size / 3, (read_peak, decode_peak, size)


def test_a_relative_local_glob_is_made_absolute_and_a_remote_one_kept(tmp_path, monkeypatch):
    from lookalike.pipeline.sources import absolute_pattern

    monkeypatch.chdir(tmp_path)
    assert absolute_pattern("c3/*/00[0-1]*.jpg") == f"{tmp_path}/c3/*/00[0-1]*.jpg"
    assert absolute_pattern("./c3/../c4/a*.jpg") == f"{tmp_path}/c4/a*.jpg"  # the literal folder normalised
    assert absolute_pattern("*.jpg") == f"{tmp_path}/*.jpg"
    for kept in ("/data/*.jpg", "gs://bucket/c*/x.jpg", "s3://b/*.png", "hf://d/*/a.jpg"):
        assert absolute_pattern(kept) == kept


@pytest.mark.parametrize("data, uri, expected", [
    (b"x" * 100, "/c/a.jpg", False),
    (b"x" * PARALLEL_MIN_BYTES, "/c/a.jpg", True),
    (None, "/c/a.png", True),  # bytes left on disk: a large file
    (b"x" * 100, "/c/clip.MP4", True),
])
def test_what_is_worth_a_decode_thread(data, uri, expected):
    assert worth_a_thread(data, uri) is expected


def test_a_video_whose_decoding_fails_midway_is_closed_at_once(tmp_path, make_noisy_video):
    """A failure while a video's frames are handed on (here its thumbnail) closes the video's
    file as the failure leaves ``decode_source``, not when the garbage collector gets to the
    traceback that holds it (a decode pool keeps failures for a while)."""
    import gc

    from lookalike.model.preprocess import PreprocessSpec
    from lookalike.pipeline.sources import decode_source
    from lookalike.pipeline.video import FrameSampling

    path = make_noisy_video(tmp_path / "noise.mp4")

    def open_on_path() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == str(path))

    def failing_thumbnail(picture, thumb_path, original):
        raise OSError(28, "No space left on device", thumb_path)

    gc.disable()
    try:
        with pytest.raises(OSError, match="No space left") as raised:
            list(decode_source("h", [str(path)], PreprocessSpec(32, 3), str(tmp_path), FrameSampling(), None,
                               failing_thumbnail))
        assert open_on_path() == 0
        del raised
    finally:
        gc.enable()
