"""Video frames as items: sample every N seconds plus on shot changes (PyAV).

A frame is kept when ``interval_s`` has passed since the last kept frame, or when a
cheap shot-change test fires: the L1 distance between normalised 32-bin grayscale
histograms of consecutive (downscaled) frames exceeds ``shot_threshold``. Each kept
frame becomes an item ``<video id>#t=<seconds>`` with its timestamp, so the server can
say where in the video the match is. A video's source hash includes the key of these
settings (``video_source_hash``): its cached frames are reused only for the same sampling.
Frames are turned upright as the video's display matrix says (a phone video recorded in
portrait is stored sideways with a rotation of 90 or -90 degrees), like the EXIF
orientation of an image, so frames, thumbnails and their width and height are as a player
shows them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from lookalike.model.preprocess import DEFAULT_MAX_PIXELS, MIN_SIDE_PX
from lookalike.pipeline.interrupts import stop_mark

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg"}


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video with a video stream; the message says why."""


# How frames are decoded, beyond the sampling settings; part of FrameSampling.key, so raising
# it makes --incremental sample every cached video again. 2: frames turned upright by the
# display rotation (they were cached sideways). 3: timestamps count from the start of the
# video (they included the container's start time, e.g. 0.54 s in an MPEG program stream).
# 4: an interval is reached within TIME_TOLERANCE_S (0.3 - 0.2 < 0.1 in floating point skipped
# every other frame when the interval was the frame spacing), and no two frames share an id.
# 5: damaged packets skipped (one ended the video), restarting frame times continued (the rest
# of joined recordings was dropped), cover art no video, frames over max_pixels refused; videos
# recorded as corrupt under 4 are tried again.
FRAME_DECODING_VERSION = 5
# Frame times are rationals (pts x time base) computed in floating point: differences this
# close to the interval count as reaching it.
TIME_TOLERANCE_S = 1e-6


# A frame this much earlier than the one before it starts a new clock (recordings joined into
# one file: concatenated MPEG program or transport streams restart their timestamps). Smaller
# steps back are frames reordered by their codec (B-frames in an AVI), left as they are.
CLOCK_RESTART_S = 1.0

# Packets that fail to decode are skipped, as the ffmpeg tool does, up to this many or this share
# of the packets read so far (whichever is more); past that the stream counts as broken.
BAD_PACKETS_SKIPPED_MIN = 10
BAD_PACKETS_SKIPPED_SHARE = 0.01

# A frame id names its time in milliseconds (``frame_id``): frames closer than this share an id.
MIN_INTERVAL_S = 0.001
DEFAULT_MAX_FRAMES = 10_000
PROGRESS_INTERVAL_S = 10.0  # a video decoding longer than this logs how far it is, this often
READ_BUFFER_BYTES = 256 * 1024  # how much of a video file FFmpeg asks for at a time (``sample_frames``)


@dataclass(frozen=True)
class FrameSampling:
    interval_s: float = 2.0
    shot_threshold: float = 0.5  # L1 histogram distance in [0, 2]
    min_shot_gap_s: float = 0.5
    max_frames: int = DEFAULT_MAX_FRAMES  # sampled frames per video; the rest of a longer one is not indexed

    def __post_init__(self) -> None:
        if not self.interval_s >= MIN_INTERVAL_S:  # NaN too
            raise ValueError(f"interval_s must be at least {MIN_INTERVAL_S} s (frame ids name milliseconds), "
                             f"got {self.interval_s}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")

    @property
    def key(self) -> str:
        """12 hex digits that change with any setting the sampled frames depend on, and with
        ``FRAME_DECODING_VERSION``."""
        text = f"{float(self.interval_s)!r},{float(self.shot_threshold)!r},{float(self.min_shot_gap_s)!r},{int(self.max_frames)}"
        if FRAME_DECODING_VERSION > 1:
            text += f",v{FRAME_DECODING_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SAMPLING_KEY_SEPARATOR = "~"


def video_source_hash(bytes_sha256: str, sampling: FrameSampling) -> str:
    """A video's source hash: the sha256 of its bytes and the key of how its frames are
    sampled (``<sha256>~<key>``), so the embedding cache holds a video's frames per sampling
    and an ``--incremental`` run with other ``--frame-interval-s`` or ``--shot-threshold``
    samples it again instead of reusing (or mixing in) frames sampled otherwise."""
    return f"{bytes_sha256}{SAMPLING_KEY_SEPARATOR}{sampling.key}"


def reusable_source_hashes(hashes: Any, sampling: FrameSampling) -> Any:
    """The cached source hashes a run sampling videos with ``sampling`` may reuse: every
    image's, and a video's only when sampled the same way. ``hashes``: a set, or an Arrow
    string array (returned as an Arrow array)."""
    suffix = SAMPLING_KEY_SEPARATOR + sampling.key
    if isinstance(hashes, (set, frozenset, list, tuple)):
        return {h for h in hashes if SAMPLING_KEY_SEPARATOR not in h or h.endswith(suffix)}
    import pyarrow as pa
    import pyarrow.compute as pc

    array = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
    keep = pc.or_(pc.invert(pc.match_substring(array, SAMPLING_KEY_SEPARATOR)), pc.ends_with(array, suffix))
    return array.filter(pc.fill_null(keep, False))


def is_video_path(path: str) -> bool:
    dot = path.rfind(".")
    return dot >= 0 and path[dot:].lower() in VIDEO_SUFFIXES


def frame_id(video_id: str, timestamp_s: float) -> str:
    return f"{video_id}#t={timestamp_s:.3f}"


# A frame id with its seconds written any way (``clip.mp4#t=1.2``, ``#t=1.200``, ``#t=.5``).
FRAME_TIME = re.compile(r"^(?P<video>.+)#t=(?P<seconds>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")


def canonical_frame_id(item_id: str) -> str:
    """``item_id`` as the pipeline writes it: a frame id's seconds with three decimals
    (``clip.mp4#t=1.2`` -> ``clip.mp4#t=1.200``); any other id unchanged."""
    frame = FRAME_TIME.match(item_id)
    return frame_id(frame["video"], float(frame["seconds"])) if frame else item_id


_QUARTER_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def display_rotation(frame: Any) -> int:
    """Counter-clockwise quarter turns (0-3) that show ``frame`` (a PyAV VideoFrame) upright:
    its display matrix's rotation (``frame.rotation``, degrees counter-clockwise) rounded to
    a right angle; 0 without a display matrix or for an angle that is not a right angle."""
    try:
        degrees = float(frame.rotation)
    except (AttributeError, ValueError, OverflowError):  # no such attribute, or a degenerate matrix (NaN)
        return 0
    turns = round(degrees / 90)
    if abs(degrees - 90 * turns) > 1:
        log.debug("ignoring a display rotation of %.1f degrees (not a right angle)", degrees)
        return 0
    return turns % 4


def upright_image(frame: Any) -> Image.Image:
    """``frame`` as an RGB PIL image, turned as its display matrix says (``display_rotation``)."""
    img = frame.to_image().convert("RGB")
    turns = display_rotation(frame)
    return img.transpose(_QUARTER_TURNS[turns]) if turns else img


def _histogram(gray: np.ndarray) -> np.ndarray:
    hist = np.bincount((gray.ravel() >> 3).astype(np.int64), minlength=32).astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def frame_histogram(frame: Image.Image) -> np.ndarray:
    """The shot-change signature of a sampled frame: its normalised 32-bin grayscale
    histogram at 64x36, as ``sample_frames`` computes it; compare two with the L1 distance
    against ``FrameSampling.shot_threshold``."""
    return _histogram(np.asarray(frame.convert("L").resize((64, 36), Image.Resampling.BILINEAR)))


def start_offset_s(container: Any, stream: Any) -> float:
    """Seconds to subtract from a frame's presentation time to count from the start of the
    video, as players do: the container's start time (its earliest stream; an MPEG program
    stream typically starts at 0.5 s), else the video stream's; 0 when unknown or negative."""
    if container.start_time is not None:  # AV_TIME_BASE units (microseconds)
        return max(float(container.start_time) / 1_000_000, 0.0)
    if stream.start_time is not None and stream.time_base:
        return max(float(stream.start_time * stream.time_base), 0.0)
    return 0.0


def _reason(e: Exception) -> str:
    """An error's type and message; for FFmpeg's, its message alone: PyAV's str() adds FFmpeg's
    error code and the file name, which for bytes in memory is a meaningless '<none>'."""
    import av  # already imported by the caller

    message = e.strerror if isinstance(e, av.error.FFmpegError) else None
    return f"{type(e).__name__}: {message or e}"


def _too_many_pixels(width: int, height: int, limit: int) -> str:
    return (f"video frames of {width}x{height} = {width * height} pixels exceed the limit of {limit} pixels "
            "(decompression bomb?)")


def picture_streams(container: Any) -> list[Any]:
    """A container's video streams that are moving pictures: not cover art (an
    ``attached_pic``, the album picture of an audio file, is one still image)."""
    import av

    cover = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not s.disposition & cover]


def decoded_frames(container: Any, stream: Any, skipped: list[Exception]) -> Iterator[Any]:
    """``stream``'s frames, decoded packet by packet: a packet that fails to decode (a damaged
    part of the file) is skipped and its error added to ``skipped``, within the budget of
    BAD_PACKETS_SKIPPED_MIN and BAD_PACKETS_SKIPPED_SHARE; the error past it is raised."""
    import av

    packets = 0
    for packet in container.demux(stream):
        packets += 1
        try:
            frames = packet.decode()
        except MemoryError:  # av.error.MemoryError too: not the packet's fault
            raise
        except av.error.FFmpegError as e:
            if len(skipped) >= max(BAD_PACKETS_SKIPPED_MIN, BAD_PACKETS_SKIPPED_SHARE * packets):
                raise
            skipped.append(e)
            continue
        yield from frames


def sample_frames(data: bytes | BinaryIO, sampling: FrameSampling = FrameSampling(),
                  name: str = "video", max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[float, Image.Image]]:
    """Video file bytes, or the file opened for reading (seekable; read piece by piece as the
    frames decode, ``READ_BUFFER_BYTES`` at a time) -> (timestamp_s, upright RGB PIL frame)
    for each sampled frame; times count from the start of the video (``start_offset_s``),
    never negative.

    Raises VideoDecodeError for bytes that are not a video, a container with no video
    stream (audio only, with or without cover art: ``picture_streams``), frames of more than
    ``max_pixels`` pixels (as an image that large is refused, before decoding one), or a
    stream that yields no decodable frame. A stream that breaks or
    ends well before the duration its container declares (a truncated file) keeps the frames
    sampled so far, with a warning naming ``name`` (the file), where it stopped and how long
    the video should be. Frame times that restart (``CLOCK_RESTART_S``: recordings joined
    into one file) go on from the last frame's, with a warning, so the rest of the video is
    sampled as it plays; a single frame whose time jumps ahead and back is not taken for a
    restart (nor does it stop the sampling after it). A damaged packet is skipped
    (``decoded_frames``), with a warning counting them, rather than ending the video there.
    Two sampled frames never share an id (``frame_id``: milliseconds): a
    frame at the time of one already kept (a duplicate timestamp) is skipped. A video stops
    after ``sampling.max_frames`` sampled frames, with a warning naming it.
    """
    import av

    if isinstance(data, (bytes, bytearray, memoryview)):
        data = io.BytesIO(data)
    if data.seek(0, io.SEEK_END) == 0:
        raise VideoDecodeError("empty file (0 bytes)")
    data.seek(0)
    try:
        container = av.open(data, buffer_size=READ_BUFFER_BYTES)
    except MemoryError:  # not the bytes' fault: never recorded as undecodable
        raise
    except OSError as e:  # reading the file failed (EIO, a network filesystem): not the bytes' fault either
        if not isinstance(e, av.error.FFmpegError):  # FFmpeg's own errors (bad data) are OSErrors too
            raise
        raise VideoDecodeError(f"not a decodable video ({_reason(e)})") from None
    except Exception as e:
        raise VideoDecodeError(f"not a decodable video ({_reason(e)})") from None
    with container:
        streams = picture_streams(container)
        if not streams:
            cover = " with cover art" if container.streams.video else ""
            raise VideoDecodeError(f"no video stream (audio-only{cover} or empty container)")
        stream = streams[0]
        width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
        if width * height > max_pixels:  # as declared; every decoded frame is checked too
            raise VideoDecodeError(_too_many_pixels(width, height, max_pixels))
        stream.thread_type = "AUTO"
        start_s = start_offset_s(container, stream)
        last_kept: float | None = None
        kept_ids: set[str] = set()  # the seconds of each kept frame's id
        last_shot: float = -1e9
        prev_hist: np.ndarray | None = None
        kept = 0
        decoded = 0
        t = 0.0
        skipped: list[Exception] = []  # packets that failed to decode, skipped
        stops_before = stop_mark()  # stop signals so far (``interrupts.request_stop``)
        next_report_s = time.monotonic() + PROGRESS_INTERVAL_S
        clock_offset_s = 0.0  # added to frame times after their clock restarted (``CLOCK_RESTART_S``)
        frame_step_s = min(1.0 / float(stream.average_rate or 25), 1.0)
        before_s = 0.0  # the time of the frame before the last one
        try:
            for frame in decoded_frames(container, stream, skipped):
                decoded += 1
                if stop_mark() > stops_before:  # Ctrl-C or SIGTERM: an hour of video must not hold the run up
                    raise KeyboardInterrupt(f"stopped while decoding {name} (at {t:.1f} s)")
                if decoded % 64 == 0 and time.monotonic() >= next_report_s:  # a long video says how far it is
                    next_report_s = time.monotonic() + PROGRESS_INTERVAL_S
                    log.info("%s: decoded to %.0f s%s, %d frame(s) sampled", name, t, _of_duration(container), kept)
                if min(frame.width, frame.height) < MIN_SIDE_PX:  # as an image that small is refused
                    raise VideoDecodeError(f"video frames of {frame.width}x{frame.height} pixels are smaller than the "
                                           f"{MIN_SIDE_PX}x{MIN_SIDE_PX} minimum")
                if frame.width * frame.height > max_pixels:
                    raise VideoDecodeError(_too_many_pixels(frame.width, frame.height, max_pixels))
                step_before_s, previous_s = t - before_s, t
                before_s = t
                t = float(frame.time) - start_s if frame.time is not None else (decoded - 1) * frame_step_s
                t = max(t, 0.0) + clock_offset_s
                if decoded > 1 and t < previous_s - CLOCK_RESTART_S:
                    if decoded > 2 and step_before_s > CLOCK_RESTART_S:  # the frame before jumped ahead alone
                        last_kept = t if last_kept is not None and last_kept > t else last_kept
                        last_shot = min(last_shot, t)
                    else:  # the clock restarted: times go on from the last frame's
                        log.warning("%s: frame times restart at %.1f s after %.1f s (recordings joined into one "
                                    "file?); counting on from there", name, t - clock_offset_s, previous_s)
                        clock_offset_s += previous_s + frame_step_s - t
                        t = previous_s + frame_step_s
                hist = _histogram(frame.reformat(width=64, height=36, format="gray").to_ndarray())
                shot = (
                    prev_hist is not None
                    and float(np.abs(hist - prev_hist).sum()) > sampling.shot_threshold
                    and t - last_shot >= sampling.min_shot_gap_s
                )
                prev_hist = hist
                due = last_kept is None or t - last_kept >= sampling.interval_s - TIME_TOLERANCE_S
                seconds = f"{t:.3f}"  # as the frame's id names them
                if (due or shot) and seconds not in kept_ids:
                    kept_ids.add(seconds)
                    if shot:
                        last_shot = t
                    last_kept = t
                    kept += 1
                    yield t, upright_image(frame)
                    if kept >= sampling.max_frames:
                        log.warning("%s: stopping after %d sampled frames, at %.1f s%s: the rest is not indexed "
                                    "(--max-frames-per-video)", name, kept, t, _of_duration(container))
                        return
        except MemoryError:
            raise
        except av.error.FFmpegError as e:
            if kept == 0:
                raise VideoDecodeError(f"corrupt video stream ({_reason(e)})") from None
            log.warning("%s: video stream broken at %.1f s%s after %d decoded frames%s; keeping the %d sampled: %s", name,
                        t, _of_duration(container), decoded, f" and {len(skipped)} damaged packet(s) skipped" if skipped
                        else "", kept, _reason(e))
            return
        if skipped:
            log.warning("%s: %d damaged packet(s) skipped, their frames missing (first: %s); %d frames decoded", name,
                        len(skipped), _reason(skipped[0]), decoded)
        if kept == 0:
            raise VideoDecodeError("the video stream has no decodable frames")
        declared = _declared_duration_s(container)
        if declared is not None and t < declared - max(1.0, 0.1 * declared):  # decoding just ended: truncated?
            log.warning("%s: video stream ends at %.1f s of the %.1f s its container declares (a truncated file?); "
                        "keeping the %d sampled frames", name, t, declared, kept)


def _declared_duration_s(container: Any) -> float | None:
    """The duration in seconds the container declares (from its start, as frame times count), or None."""
    duration = getattr(container, "duration", None)  # microseconds (AV_TIME_BASE)
    return duration / 1e6 if duration else None


def _of_duration(container: Any) -> str:
    declared = _declared_duration_s(container)
    return f" of {declared:.1f} s" if declared is not None else ""
