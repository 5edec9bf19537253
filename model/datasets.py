"""The embedded default data: scikit-learn's bundled handwritten digits, as files.

``write_digits_corpus(dest)`` writes the 1,797 8x8 digits (real handwriting, shipped
inside the scikit-learn wheel, so nothing is downloaded) as PNG files under
``dest/<label>/digit_NNNN.png``: dark ink on white, upscaled ``scale`` times with
nearest-neighbour so the pixels stay honest. Every stage then reads files, exactly as
it would read a user's own folder of images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """-> images [1797, 8, 8] uint8 (0 white .. 255 ink), labels [1797] int."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits_corpus(dest: str | Path, scale: int = 4, limit: int | None = None) -> int:
    """Write the digits as PNG files under ``dest/<label>/``; return the number written.

    Existing identical files are left alone, so rerunning is cheap and idempotent.
    """
    dest = Path(dest)
    images, labels = load_digits_arrays()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    written = 0
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = dest / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"digit_{i:04d}.png"
        if not path.exists():
            pixels = np.kron(255 - img, np.ones((scale, scale), np.uint8))
            Image.fromarray(pixels, mode="L").save(path, optimize=True)
        written += 1
    log.info("wrote %d digit images under %s", written, dest)
    return written
