"""Training without labels: every image is its own class, every short video window one.

A user with a folder of photos or clips and no labels can still train an encoder: the
positive of an image is another random view of it (crop, flip, colour jitter, small
rotation: ``augment.UNLABELLED_VIEWS``), the positive of a video frame is a nearby
frame of the same shot (augmented too), and every other image or window is a negative
(instance discrimination, as in SimCLR). ``load_unlabelled_folder`` turns a folder (any
nesting; class sub-folders, if any, are ignored) into ``LabelledImages`` whose labels
are these instances, so the training loop samples pairs or P x K batches over them as
it does over classes and augments every image on the prefetch thread.

Validation holds out whole instances and asks whether a random view of each one finds
the other views of the same instance (view-retrieval Precision@1 and MAP@R): the same
figures that pick the best checkpoint and calibrate the same-item threshold on
labelled data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from lookalike.model.augment import UNLABELLED_VIEWS, AugmentSpec, augment_batch
from lookalike.model.config import TrainConfig, augment_spec
from lookalike.model.data import (IMAGE_SUFFIXES, LabelledImages, is_file_or_dangling_link, not_a_folder, read_media,
                                  walk_folders, warn_unreadable_folder)
from lookalike.model.parallel import decode_in_order, holds_big_files
from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec, decode_image, image_to_array
from lookalike.model.progress import Progress

log = logging.getLogger(__name__)

# Views of each held-out instance in the validation set (R = VAL_VIEWS - 1 per query).
VAL_VIEWS = 3
# Shot-change threshold for splitting video windows (L1 histogram distance in [0, 2]).
SHOT_THRESHOLD = 0.5


def training_augment(config: TrainConfig) -> AugmentSpec:
    """The augmentation of training batches: ``augment_*`` when set; for unlabelled
    training with none set, ``UNLABELLED_VIEWS`` (without it every positive is a copy)."""
    spec = augment_spec(config)
    return UNLABELLED_VIEWS if config.unlabelled and not spec.enabled else spec


def video_windows(
    data: bytes, spec: PreprocessSpec, window_s: float, frame_interval_s: float, shot_threshold: float = SHOT_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Video file bytes -> frames [F, H, W, C] float32, timestamps [F] seconds, window [F] int.

    A frame is sampled every ``frame_interval_s`` (and at shot changes); it opens a new
    window (0, 1, 2, ...) when ``window_s`` has passed since the window's first frame or
    when it differs from the previous frame by more than ``shot_threshold`` (a cut), so
    frames sharing a window are nearby frames of one shot. Raises VideoDecodeError."""
    from lookalike.pipeline.video import FrameSampling, frame_histogram, sample_frames

    sampling = FrameSampling(interval_s=frame_interval_s, shot_threshold=shot_threshold)
    frames, times, windows = [], [], []
    window, start, prev = -1, 0.0, None
    for t, img in sample_frames(data, sampling):
        hist = frame_histogram(img)
        cut = prev is not None and float(np.abs(hist - prev).sum()) > shot_threshold
        if window < 0 or t - start >= window_s or cut:
            window, start = window + 1, t
        prev = hist
        frames.append(image_to_array(img, spec))
        times.append(t)
        windows.append(window)
    return np.stack(frames), np.asarray(times, np.float64), np.asarray(windows, np.int64)


def list_media(root: Path, onerror: Callable[[OSError], None] | None = None) -> list[Path]:
    """Every image and video file under ``root`` (any nesting), sorted, listed as labelled
    training and ``embed`` list (``data.walk_folders``): symlinked folders followed, each real
    folder once; only regular files (links to them included), so a named pipe is never opened;
    a folder that cannot be read goes to ``onerror`` (default: named in a warning with its OS
    error), never left out silently."""
    from lookalike.pipeline.video import is_video_path

    return sorted(Path(folder) / name for folder, names in walk_folders(root, onerror) for name in names
                  if (Path(name).suffix.lower() in IMAGE_SUFFIXES or is_video_path(name))
                  and is_file_or_dangling_link(os.path.join(folder, name)))


def load_unlabelled_folder(
    root: str | Path, spec: PreprocessSpec, window_s: float = 1.0, frame_interval_s: float = 0.25,
    exclude: Collection[str] = (),
) -> LabelledImages:
    """Read every image and video under ``root`` (any nesting, listed by ``list_media``) into
    arrays labelled by instance.

    Each image is one instance (named by its path relative to ``root``); each window of
    a video (see ``video_windows``) is one, named ``<path>#t=<start>``. Unreadable files
    are logged, listed in ``failures`` and skipped; fewer than 2 instances is a ValueError.
    Files whose ``root``-relative path is in ``exclude`` (e.g. held-out evaluation images) are left out."""
    from lookalike.pipeline.video import VideoDecodeError, frame_id, is_video_path

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"training data folder {root} {not_a_folder(root)}")
    excluded = frozenset(exclude)
    unreadable: list[OSError] = []  # folders that could not be listed
    files = [p for p in list_media(root, unreadable.append) if p.relative_to(root).as_posix() not in excluded]
    for error in unreadable:
        warn_unreadable_folder(error)
    images, labels, paths, names, failures = [], [], [], [], []
    order = {path: i for i, path in enumerate(files)}
    first_decoded: dict[str, int] = {}  # content hash -> the earliest file (listing order) decoding it
    claim = threading.Lock()

    def decode(path: Path) -> tuple[str | None, Exception | tuple[np.ndarray, np.ndarray | None, np.ndarray] | None]:
        """(content hash or None if unread, (frames, times, windows) or the error); None instead
        of the frames for a copy of an earlier file already hashed, which is not decoded. The
        earliest file (in listing order) with some bytes is always decoded, whatever the threads'
        timing; a copy read at the same moment as its original, just before it, may be too."""
        digest = None
        try:
            data = read_media(path)
            digest = hashlib.sha256(data).hexdigest()
            with claim:
                if first_decoded.get(digest, len(files)) < order[path]:
                    return digest, None
                first_decoded[digest] = order[path]
            if is_video_path(path.name):
                return digest, video_windows(data, spec, window_s, frame_interval_s)
            return digest, (decode_image(data, spec)[None], None, np.zeros(1, np.int64))
        except (ImageDecodeError, VideoDecodeError, OSError) as e:
            return digest, e

    first_of: dict[str, str] = {}  # content hash -> the first file with those bytes
    failed_first: dict[str, tuple[str, str]] = {}  # content hash -> (the first file with them, why it failed)
    copies: list[tuple[str, str]] = []  # (a byte-identical copy, the file it repeats): trained once

    progress = Progress("reading training images and videos", len(files), "files", log)
    # Videos and photos decode several at once (lookalike.model.parallel); small images inline.
    on_pool = holds_big_files(files) or any(is_video_path(p.name) for p in files)
    for path, (digest, decoded) in decode_in_order(decode, files, progress, on_pool=on_pool):
        rel = path.relative_to(root).as_posix()
        if isinstance(decoded, Exception):
            log.warning("skipping %s: %s", path, decoded)
            failures.append((str(path), str(decoded)))
            if digest is not None:
                failed_first.setdefault(digest, (rel, str(decoded)))
            continue
        if digest in first_of:  # a copy (IMG_1 (1).jpg, a backup, a link) is the same instance, not a negative of it
            copies.append((rel, first_of[digest]))
            continue
        if decoded is None:  # a copy of an earlier file that failed: the same bytes fail the same way
            first, reason = failed_first[digest]
            log.warning("skipping %s: the same bytes as %s, which failed: %s", path, first, reason)
            failures.append((str(path), f"the same bytes as {first}, which failed: {reason}"))
            continue
        frames, times, windows = decoded
        first_of[digest] = rel
        first_label = len(names)
        if times is None:
            names.append(rel)
            paths.append(str(path))
        else:
            names.extend(frame_id(rel, times[windows == w][0]) for w in range(int(windows.max()) + 1))
            paths.extend(frame_id(str(path), t) for t in times)
        images.extend(frames)
        labels.extend(first_label + windows)
    if len(names) < 2:
        folders = "".join(f"; cannot read folder {e.filename}: {e.strerror or e}" for e in unreadable)
        copied = f", {len(copies)} byte-identical to another" if copies else ""
        raise ValueError(
            f"unlabelled training data {root}: {len(names)} usable image(s) or video window(s) in "
            f"{len(files)} file(s) ({len(failures)} unreadable{copied}); "
            f"need at least 2{folders}"
        )
    if copies:
        log.info("%d byte-identical cop%s trained once, as the first file with those bytes (e.g. %s repeats %s)",
                 len(copies), "y" if len(copies) == 1 else "ies", *copies[0])
    log.info("unlabelled training data %s: %d instances (%d images or frames) from %d files",
             root, len(names), len(images), len(files) - len(failures) - len(copies))
    return LabelledImages(images=np.stack(images).astype(np.float32), labels=np.asarray(labels, np.int32),
                          class_names=names, paths=paths, failures=failures)


def split_instances(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item indices (train, val) holding out ``val_fraction`` of the instances whole (all
    frames of a window go to one side); none when either side would get fewer than 2."""
    instances = np.unique(labels)
    n_val = int(round(len(instances) * val_fraction))
    if n_val < 2 or len(instances) - n_val < 2:
        n_val = 0
    held = np.random.default_rng(seed).permutation(instances)[:n_val]
    mask = np.isin(labels, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def view_set(
    images: np.ndarray, labels: np.ndarray, spec: AugmentSpec, views: int = VAL_VIEWS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, W, C] images with [N] instance labels -> ([M * views, H, W, C] views, [M * views] labels)
    for the M instances: each view a random member (frame) of its instance, augmented
    with ``spec``. Seeded, so every evaluation of a run scores the same views."""
    rng = np.random.default_rng([seed, views, len(labels)])
    instances = np.unique(labels)
    idx = np.concatenate([
        rng.choice(members, size=views, replace=len(members) < views)
        for members in (np.flatnonzero(labels == c) for c in instances)
    ]) if len(instances) else np.zeros(0, np.int64)
    y = np.repeat(instances, views).astype(np.int32)
    return (augment_batch(images[idx], spec, rng) if len(idx) else images[idx]), y


def view_holdout(
    data: LabelledImages, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> train item indices, held-out item indices, and the validation views [V, H, W, C]
    with their instance labels [V] (``VAL_VIEWS`` augmented views of each held-out instance)."""
    train_idx, val_idx = split_instances(data.labels, config.val_fraction, config.seed)
    x_val, y_val = view_set(data.images[val_idx], data.labels[val_idx], training_augment(config), seed=config.seed)
    return train_idx, val_idx, x_val, y_val
