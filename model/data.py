"""Training data: a folder of labelled images and balanced similar/dissimilar pairs.

A labelled folder has one sub-folder per class (``corpus/<label>/*.png``), exactly
what a user brings. Unreadable files are logged and skipped; training goes on with
the rest. ``PairSampler`` draws batches that are half similar, half dissimilar.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec, decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class LabelledImages:
    images: np.ndarray  # [N, H, W, C] float32 in [0, 1]
    labels: np.ndarray  # [N] int32 class index
    class_names: list[str]
    paths: list[str]
    failures: list[tuple[str, str]]  # (path, reason) of skipped files


def list_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (by suffix), sorted for reproducibility."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_labelled_folder(root: str | Path, spec: PreprocessSpec) -> LabelledImages:
    """Read ``root/<label>/*`` into arrays; raise ValueError if nothing trainable is there."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"training data folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise ValueError(
            f"training data folder {root} needs one sub-folder per class and at least 2 classes, "
            f"found {len(class_dirs)}"
        )
    images, labels, paths, failures, names = [], [], [], [], []
    for class_dir in class_dirs:
        files = list_images(class_dir)
        label = len(names)
        count = 0
        for path in files:
            try:
                images.append(decode_image(path.read_bytes(), spec))
            except (ImageDecodeError, OSError) as e:
                log.warning("skipping %s: %s", path, e)
                failures.append((str(path), str(e)))
                continue
            labels.append(label)
            paths.append(str(path))
            count += 1
        if count == 0:
            log.warning("class %r in %s has no readable images; ignored", class_dir.name, root)
            continue
        if count == 1:
            log.warning("class %r has a single image: usable only in dissimilar pairs", class_dir.name)
        names.append(class_dir.name)
    if len(names) < 2:
        raise ValueError(f"training data folder {root}: fewer than 2 classes have readable images")
    return LabelledImages(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int32),
        class_names=names,
        paths=paths,
        failures=failures,
    )


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
    """Balanced batches of (index_a, index_b, similar) over items with ``labels``."""

    def __init__(self, labels: np.ndarray, seed: int):
        self.labels = np.asarray(labels)
        self.rng = np.random.default_rng(seed)
        classes = np.unique(self.labels)
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in classes}
        self.classes = np.asarray(sorted(self.by_class))
        self.pos_classes = np.asarray([c for c in self.classes if len(self.by_class[int(c)]) >= 2])
        if len(self.pos_classes) == 0:
            raise ValueError("no class has 2 or more images: similar pairs are impossible")
        if len(self.classes) < 2:
            raise ValueError("need at least 2 classes for dissimilar pairs")

    def _pick(self, classes: np.ndarray) -> np.ndarray:
        return np.asarray([self.rng.choice(self.by_class[int(c)]) for c in classes])

    def sample(self, batch_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> idx_a [B], idx_b [B], similar [B] float32 (first half 1, second half 0)."""
        n_pos = batch_pairs // 2
        n_neg = batch_pairs - n_pos
        pos_c = self.rng.choice(self.pos_classes, size=n_pos)
        pos_a, pos_b = [], []
        for c in pos_c:
            a, b = self.rng.choice(self.by_class[int(c)], size=2, replace=False)
            pos_a.append(a)
            pos_b.append(b)
        neg_ca = self.rng.choice(self.classes, size=n_neg)
        offset = self.rng.integers(1, len(self.classes), size=n_neg)
        pos_of = {int(c): i for i, c in enumerate(self.classes)}
        neg_cb = self.classes[(np.asarray([pos_of[int(c)] for c in neg_ca]) + offset) % len(self.classes)]
        idx_a = np.concatenate([np.asarray(pos_a, dtype=np.int64), self._pick(neg_ca)])
        idx_b = np.concatenate([np.asarray(pos_b, dtype=np.int64), self._pick(neg_cb)])
        similar = np.concatenate([np.ones(n_pos, np.float32), np.zeros(n_neg, np.float32)])
        return idx_a, idx_b, similar
