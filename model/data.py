"""Training data: a folder of labelled images and balanced similar/dissimilar pairs.

A labelled folder has one sub-folder per class (``corpus/<label>/*.png``), exactly
what a user brings. Unreadable files are logged and skipped; training goes on with
the rest. ``PairSampler`` draws batches that are half similar, half dissimilar (for
the contrastive loss); ``PKSampler`` draws P classes x K images (for triplet mining).
Both take an optional ``rng`` per call, so a batch can be a pure function of
(seed, step) and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.model.parallel import decode_in_order, holds_big_files
from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec, decode_image
from lookalike.model.progress import Progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class LabelledImages:
    images: np.ndarray  # [N, H, W, C] float32 in [0, 1]
    labels: np.ndarray  # [N] int32 class index
    class_names: list[str]
    paths: list[str]
    failures: list[tuple[str, str]]  # (path, reason) of skipped files



def not_a_folder(path: str | Path) -> str:
    """Why ``path``, wanted as a folder, is not one: "does not exist", "is a file, not a folder"."""
    path = Path(path)
    if path.exists():
        return "is a file, not a folder" if path.is_file() else "is not a folder"
    return "does not exist"

def walk_folders(root: str | Path, onerror: Callable[[OSError], None] | None = None) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of ``root`` and every folder below it, symlinked folders
    included: each real folder once, so a link loop ends (``os.walk`` order). A folder reached
    both through a symlink and without one is listed by the path without (its files' ids do
    not change when a link to their folder is added). A folder that
    cannot be listed (no read permission) is passed to ``onerror`` as its OSError (its
    ``filename`` the folder), as ``os.walk`` does; without ``onerror`` it is logged as a warning,
    never left out silently."""
    yield from walk_folder_trees([root], onerror)


# How a folder was reached, best first: without links; inside a root that is itself a link (a
# class folder linking to its images); through a link below a root.
DIRECT, ROOT_LINK, INNER_LINK = 0, 1, 2


def walk_folder_trees(roots: Sequence[str | Path], onerror: Callable[[OSError], None] | None = None,
                      never: Collection[str | Path] = ()) -> Iterator[tuple[str, list[str]]]:
    """``walk_folders`` over several ``roots`` at once: each real folder once over all of
    them, by its best path (``DIRECT`` < ``ROOT_LINK`` < ``INNER_LINK``; the first reached
    among equals). Folders in ``never`` (and what is only reachable through them) are not walked."""
    walked: dict[tuple[int, int], tuple[str, list[str], int]] = {}  # real folder -> (path, names, how reached)
    reached: dict[str, int] = {}  # how a folder to be walked was reached, when not DIRECT
    skip = set()
    for folder in never:
        try:
            st = os.stat(folder)
            skip.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    for root in map(str, roots):
        if os.path.islink(root):
            reached[root] = ROOT_LINK
        for dirpath, dirnames, names in os.walk(root, onerror=onerror or warn_unreadable_folder, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            how = reached.get(dirpath, DIRECT)
            before = walked.get(key)
            if key in skip or (before is not None and before[2] <= how):  # never, or no better: walked
                dirnames[:] = []
                continue
            walked[key] = (dirpath, names, how)  # first, or a better path replaces it
            for name in dirnames:
                child = os.path.join(dirpath, name)
                if os.path.islink(child):
                    reached[child] = INNER_LINK
                elif how != DIRECT:
                    reached[child] = how
    for dirpath, names, _ in walked.values():  # in the order first reached
        yield dirpath, names


def warn_unreadable_folder(error: OSError) -> None:
    log.warning("cannot read folder %s (%s): its files are left out", error.filename, error.strerror or error)


def list_images(root: Path, onerror: Callable[[OSError], None] | None = None) -> list[Path]:
    """Every image file under ``root`` (by suffix; symlinked files and folders followed, as
    the embed pipeline does), sorted for reproducibility. Only regular files (links to them
    included): a named pipe, socket or device is never listed, so never opened. Folders that
    cannot be read go to ``onerror`` (``walk_folders``)."""
    return sorted(path for folder, names in walk_folders(root, onerror) for path in image_files(folder, names))


def image_files(folder: str, names: list[str]) -> list[Path]:
    """The image files (by suffix; regular files or links to them) among ``names`` in ``folder``,
    and dangling links named like one: listed, so reading them reports them (``read_media``)
    instead of leaving them out unseen."""
    return [Path(folder) / name for name in names
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and is_file_or_dangling_link(os.path.join(folder, name))]


def is_file_or_dangling_link(path: str) -> bool:
    """A regular file (or a link to one), or a symbolic link whose target is missing."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def read_media(path: Path) -> bytes:
    """The bytes of ``path``; a dangling link's OSError says it is one and where it points."""
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        if not path.is_symlink():
            raise
        raise FileNotFoundError(e.errno, f"dangling symbolic link: its target {os.readlink(path)!r} does not exist",
                                str(path)) from None


def _decode_file(path: Path, spec: PreprocessSpec) -> np.ndarray | ImageDecodeError | OSError:
    """One image file's model input, or the error that makes it skipped."""
    try:
        return decode_image(read_media(path), spec)
    except (ImageDecodeError, OSError) as e:
        return e


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of a labelled ``root/<label>/*`` folder, by name (hidden ones skipped)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_class_images(root: Path, class_dirs: list[Path], unreadable: dict[Path, list[OSError]],
                      warn: bool = True, videos: dict[Path, list[str]] | None = None) -> tuple[list[Path], list[list[Path]]]:
    """(class folders, each one's image files), from one walk of the class folders together
    (``walk_folder_trees``): every real folder is read once, by a path without links where
    there is one, so a class folder that is a link to another class (or into one), or a link
    inside a class back up to ``root`` (never walked: a loop), adds no second copy of the same
    images under another label; such a class is left out, with a warning naming the class that
    has its images. Hidden folders of ``root`` are walked only where a class links into them.
    Folders that cannot be listed go to ``unreadable`` under their class; given ``videos``,
    the paths of the video files (not hidden) met on the way go there under their class."""

    def on_error(error: OSError) -> None:
        try:
            parts = Path(error.filename).relative_to(root).parts
        except (TypeError, ValueError):
            parts = ()
        errors = unreadable.get(root / parts[0]) if parts else None
        if errors is None:
            warn_unreadable_folder(error)
        else:
            errors.append(error)

    by_class: dict[Path, list[Path]] = {class_dir: [] for class_dir in class_dirs}
    walked_as: dict[str, Path] = {}  # real folder -> the class its images were listed under
    for folder, names in walk_folder_trees(class_dirs, on_error, never=[root]):
        owner = root / Path(folder).relative_to(root).parts[0]
        walked_as.setdefault(os.path.realpath(folder), owner)
        by_class[owner] += image_files(folder, names)
        if videos is not None:
            from lookalike.pipeline.video import is_video_path  # as model.unlabelled does

            videos.setdefault(owner, []).extend(os.path.join(folder, n) for n in names
                                                if is_video_path(n) and not n.startswith("."))
    kept = []
    for class_dir in class_dirs:
        holder = walked_as.get(os.path.realpath(class_dir), class_dir)
        if class_dir.is_symlink() and holder != class_dir and not by_class[class_dir]:
            (log.warning if warn else log.debug)("class %r in %s is a symbolic link to a folder of class %r: its images are read once, as "
                        "%r; %r is ignored", class_dir.name, root, holder.name, holder.name, class_dir.name)
            continue
        kept.append(class_dir)
    return kept, [sorted(by_class[class_dir]) for class_dir in kept]


def unsorted_media_hint(root: Path) -> str:
    """For a folder with too few classes: how many images and videos lie at its top level,
    in no class, and what to do with them ("" when none do)."""
    from lookalike.pipeline.video import is_video_path

    try:
        names = [entry.name for entry in os.scandir(root) if not entry.name.startswith(".") and entry.is_file()]
    except OSError:
        return ""
    images = sum(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in names)
    videos = sum(is_video_path(name) for name in names)
    if not images and not videos:
        return ""
    return (f"; it holds {images} image(s) and {videos} video(s) at its top level, in no class: sort them into one "
            "sub-folder per class, or train without labels with --unlabelled (similar = views of one image)")


def load_labelled_folder(root: str | Path, spec: PreprocessSpec, *, max_items: int | None = None,
                         seed: int = 0, exclude: Collection[str] = (), include: Collection[str] | None = None,
                         role: str = "training") -> LabelledImages:
    """Read ``root/<label>/*`` into arrays; raise ValueError if nothing usable is there, naming
    the folder by its ``role`` ("training", "evaluation": what the user gave it for).
    Files whose ``root``-relative path is in ``exclude`` (e.g. held-out evaluation images), or,
    given ``include``, not in ``include`` (e.g. only a model's held-out images), are left out;
    ``max_items``: decode only a seeded sample of that many of the others."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{role} data folder {root} {not_a_folder(root)}")
    class_dirs = class_folders(root)
    if len(class_dirs) < 2:
        raise ValueError(f"{role} data folder {root} needs one sub-folder per class and at least 2 classes, "
                         f"found {len(class_dirs)}{unsorted_media_hint(root) if role == 'training' else ''}")
    excluded = frozenset(exclude)
    included = None if include is None else frozenset(include)
    unreadable: dict[Path, list[OSError]] = {class_dir: [] for class_dir in class_dirs}  # folders not listed
    videos: dict[Path, list[str]] = {}
    class_dirs, every = list_class_images(root, class_dirs, unreadable, videos=videos)
    warn_media_outside_classes(root, [v for d, files in zip(class_dirs, every) if files for v in videos.get(d, [])], role)
    listed = [[p for p in files if p.relative_to(root).as_posix() not in excluded
               and (included is None or p.relative_to(root).as_posix() in included)] for files in every]
    filtered_out = {class_dir for class_dir, files, kept in zip(class_dirs, every, listed) if files and not kept}
    for error in (e for errors in unreadable.values() for e in errors):
        warn_unreadable_folder(error)
    sampled = max_items is not None and sum(map(len, listed)) > max_items
    if sampled:
        flat = [(c, path) for c, files in enumerate(listed) for path in files]
        keep = np.random.default_rng(seed).choice(len(flat), size=max_items, replace=False)
        chosen = {flat[i] for i in keep.tolist()}
        log.info("reading a seeded sample of %d of the %d images in %s", max_items, len(flat), root)
        listed = [[p for p in files if (c, p) in chosen] for c, files in enumerate(listed)]
    images, labels, paths, failures, names = [], [], [], [], []
    progress = Progress(f"reading {role} images", sum(map(len, listed)), "files", log)
    decode = functools.partial(_decode_file, spec=spec)
    for class_dir, files in zip(class_dirs, listed):
        if (sampled and not files) or class_dir in filtered_out:
            continue  # none of its images in the sample, or all of them left out (exclude, include)
        label = len(names)
        count = 0
        # Photos decode several at once (lookalike.model.parallel); small images inline.
        for path, decoded in decode_in_order(decode, files, progress, on_pool=holds_big_files(files)):
            if isinstance(decoded, Exception):
                log.warning("skipping %s: %s", path, decoded)
                failures.append((str(path), str(decoded)))
                continue
            images.append(decoded)
            labels.append(label)
            paths.append(str(path))
            count += 1
        if count == 0 and unreadable[class_dir] and not files:  # not "no images": they could not be listed
            log.warning("class %r in %s cannot be read (%s); ignored", class_dir.name, root,
                        "; ".join(f"{e.filename}: {e.strerror or e}" for e in unreadable[class_dir]))
            continue
        if count == 0:
            from lookalike.pipeline.video import is_video_path  # as model.unlabelled does

            videos = not files and any(p.is_file() and is_video_path(p.name) for p in class_dir.rglob("*"))
            log.warning("class %r in %s has %s; ignored", class_dir.name, root,
                        "no readable images" if files else
                        "videos but no images (labelled training uses images; --unlabelled also learns from videos)"
                        if videos else "no images")
            continue
        if count == 1 and role == "training":
            log.warning("class %r has a single image: it forms no similar pair (contrastive loss uses it only in "
                        "dissimilar pairs, triplet loss leaves it out)", class_dir.name)
        elif count == 1:
            log.warning("class %r has a single image: no other image of its class can be found for it, so as a query "
                        "it counts as a miss in Precision@1 and Recall@K", class_dir.name)
        names.append(class_dir.name)
    if len(names) < 2:
        raise ValueError(f"{role} data folder {root}: fewer than 2 classes have readable images")
    return LabelledImages(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int32),
        class_names=names,
        paths=paths,
        failures=failures,
    )


def warn_media_outside_classes(root: Path, videos: list[str], role: str) -> None:
    """Labelled data is images in class folders: images at the top of ``root`` (in no class)
    and ``videos`` (those of classes with images, as listed; a class of videos only is
    warned about as such) are left out, each kind with a warning rather than silently."""
    hint = "; `train --unlabelled` uses every image and video" if role == "training" else ""
    top = image_files(str(root), sorted(p.name for p in root.iterdir() if not p.name.startswith(".")))
    if top:
        log.warning("%d image(s) at the top of %s (e.g. %s) are in no class folder: left out of %s (labelled data is "
                    "one sub-folder per class%s)", len(top), root, top[0].name, role, hint)
    if videos:
        videos = sorted(videos)
        log.warning("%d video(s) in the class folders of %s (e.g. %s) are left out of %s: labelled %s uses images%s",
                    len(videos), root, os.path.relpath(videos[0], root), role, role, hint)


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of item indices: each class keeps at least 2 items for training."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 3 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


class PairSampler:
    """Balanced batches of (index_a, index_b, similar) over items with ``labels``.

    ``min_images=1`` also draws similar pairs from single-item classes (both sides the
    same item: unlabelled training, where each side is augmented differently)."""

    def __init__(self, labels: np.ndarray, seed: int, min_images: int = 2):
        self.labels = np.asarray(labels)
        self.rng = np.random.default_rng(seed)
        classes = np.unique(self.labels)
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in classes}
        self.classes = np.asarray(sorted(self.by_class))
        self.pos_classes = np.asarray([c for c in self.classes if len(self.by_class[int(c)]) >= min_images])
        if len(self.pos_classes) == 0:
            raise ValueError("no class has 2 or more images: similar pairs are impossible")
        if len(self.classes) < 2:
            raise ValueError("need at least 2 classes for dissimilar pairs")

    def _pick(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray([rng.choice(self.by_class[int(c)]) for c in classes])

    def sample(self, batch_pairs: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> idx_a [B], idx_b [B], similar [B] float32 (first half 1, second half 0).

        Draws from ``rng`` when given, else from the sampler's own generator."""
        rng = self.rng if rng is None else rng
        n_pos = batch_pairs // 2
        n_neg = batch_pairs - n_pos
        pos_c = rng.choice(self.pos_classes, size=n_pos)
        pos_a, pos_b = [], []
        for c in pos_c:
            members = self.by_class[int(c)]
            a, b = rng.choice(members, size=2, replace=len(members) < 2)
            pos_a.append(a)
            pos_b.append(b)
        neg_ca = rng.choice(self.classes, size=n_neg)
        offset = rng.integers(1, len(self.classes), size=n_neg)
        pos_of = {int(c): i for i, c in enumerate(self.classes)}
        neg_cb = self.classes[(np.asarray([pos_of[int(c)] for c in neg_ca]) + offset) % len(self.classes)]
        idx_a = np.concatenate([np.asarray(pos_a, dtype=np.int64), self._pick(neg_ca, rng)])
        idx_b = np.concatenate([np.asarray(pos_b, dtype=np.int64), self._pick(neg_cb, rng)])
        similar = np.concatenate([np.ones(n_pos, np.float32), np.zeros(n_neg, np.float32)])
        return idx_a, idx_b, similar


class PKSampler:
    """Class-balanced batches: ``num_classes`` (P) classes, ``per_class`` (K) images each.

    Policy for data that does not fit P x K exactly (documented, logged once):
    - a class with a single image cannot give a positive and is left out;
    - a class with 2..K-1 images is drawn with replacement (repeated images);
    - with fewer than P usable classes, P shrinks to the number there is
      (``self.num_classes``); fewer than 2 usable classes is a ValueError.

    ``min_images=1`` keeps single-image classes (unlabelled training: the K copies of an
    image become K different augmented views) and expects repeats, so logs nothing.
    """

    def __init__(self, labels: np.ndarray, num_classes: int, per_class: int, seed: int, min_images: int = 2,
                 class_names: list[str] | None = None):
        if per_class < 2:
            raise ValueError(f"per_class (K) = {per_class}: a triplet needs at least 2 images per class")
        self.labels = np.asarray(labels)
        self.rng = np.random.default_rng(seed)
        by_class = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}
        singles = sorted(c for c, idx in by_class.items() if len(idx) < min_images)
        if singles:
            log.warning("%d class(es) with a single image left out of P x K batches (e.g. %r)",
                        len(singles), class_names[singles[0]] if class_names else singles[0])
        self.by_class = {c: idx for c, idx in by_class.items() if len(idx) >= min_images}
        self.classes = np.asarray(sorted(self.by_class))
        if len(self.classes) < 2:
            raise ValueError(f"P x K batches need at least 2 classes with {min_images} or more images, "
                             f"found {len(self.classes)}")
        if len(self.classes) < num_classes:
            log.warning("%d class(es) with 2+ images, fewer than pk_classes=%d: P x K batches use P=%d",
                        len(self.classes), num_classes, len(self.classes))
        self.num_classes = min(num_classes, len(self.classes))
        self.per_class = per_class
        small = sum(len(idx) < per_class for idx in self.by_class.values())
        if small and min_images > 1:
            log.warning("%d class(es) have fewer than K=%d images; they are drawn with replacement", small, per_class)

    @property
    def batch_size(self) -> int:
        return self.num_classes * self.per_class

    def sample(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> item indices [P*K] and their labels [P*K] (class-major: K in a row per class)."""
        rng = self.rng if rng is None else rng
        chosen = rng.choice(self.classes, size=self.num_classes, replace=False)
        idx = np.concatenate([
            rng.choice(self.by_class[int(c)], size=self.per_class, replace=len(self.by_class[int(c)]) < self.per_class)
            for c in chosen
        ])
        return idx.astype(np.int64), self.labels[idx].astype(np.int32)
