"""Random image augmentation for training batches, in numpy on the prefetch thread.

Two uses: labelled training with small distortions (Koch et al. 2015 train their
Omniglot Siamese net on affine-distorted characters), and unlabelled training, where
the positive of an image is another augmented view of it (random resized crop, flip,
colour jitter, as in SimCLR). Every geometric change is one affine map per image,
sampled bilinearly with the border pixels repeated, so a batch of 128 small images
costs a few milliseconds: far below a training step, and off its critical path.

All functions take ``[N, H, W, C]`` float32 images in [0, 1] and a
``numpy.random.Generator``; the same generator state gives the same batch, so a
resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentSpec:
    """What to randomise; the zero values switch each part off.

    crop_area: minimum area fraction of a random resized crop (1.0: no crop).
    shift: maximum translation, as a fraction of the image side.
    scale: maximum relative zoom in or out (0.1: 0.9x .. 1.1x).
    rotate_deg, shear_deg: maximum absolute rotation and shear.
    flip: mirror left-right with probability 1/2.
    jitter: strength of the brightness, contrast and saturation changes (0..1).
    """

    crop_area: float = 1.0
    shift: float = 0.0
    scale: float = 0.0
    rotate_deg: float = 0.0
    shear_deg: float = 0.0
    flip: bool = False
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.05 <= self.crop_area <= 1.0:
            raise ValueError(f"augment_crop_area={self.crop_area}: must be in [0.05, 1]")
        for name in ("shift", "scale", "jitter"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment_{name}={getattr(self, name)}: must be in [0, 1]")
        for name in ("rotate_deg", "shear_deg"):
            if not 0.0 <= getattr(self, name) <= 180.0:
                raise ValueError(f"augment_{name}={getattr(self, name)}: must be in [0, 180]")

    @property
    def geometric(self) -> bool:
        return (self.crop_area < 1.0 or self.shift > 0 or self.scale > 0 or self.rotate_deg > 0
                or self.shear_deg > 0 or self.flip)

    @property
    def enabled(self) -> bool:
        return self.geometric or self.jitter > 0


# The views of an unlabelled image: SimCLR's recipe scaled down for small images.
UNLABELLED_VIEWS = AugmentSpec(crop_area=0.35, flip=True, jitter=0.4, rotate_deg=10.0)


def random_affine(n: int, size: int, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """-> [n, 2, 3] maps from output (x, y) pixel coordinates to source coordinates."""
    c = (size - 1) / 2.0
    area = rng.uniform(spec.crop_area, 1.0, n)
    log_ratio = rng.uniform(np.log(3 / 4), np.log(4 / 3), n) if spec.crop_area < 1.0 else np.zeros(n)
    sx = np.sqrt(area * np.exp(log_ratio))
    sy = np.sqrt(area / np.exp(log_ratio))
    sx, sy = np.minimum(sx, 1.0), np.minimum(sy, 1.0)
    zoom = 1.0 / (1.0 + rng.uniform(-spec.scale, spec.scale, n))
    sx, sy = sx * zoom, sy * zoom
    if spec.flip:
        sx = np.where(rng.random(n) < 0.5, -sx, sx)
    theta = np.deg2rad(rng.uniform(-spec.rotate_deg, spec.rotate_deg, n))
    shear = np.tan(np.deg2rad(rng.uniform(-spec.shear_deg, spec.shear_deg, n)))
    # Crop position: anywhere the crop stays inside the image, plus the free shift.
    room_x = np.maximum(size - np.abs(sx) * size, 0.0) / 2.0
    room_y = np.maximum(size - np.abs(sy) * size, 0.0) / 2.0
    tx = rng.uniform(-1, 1, n) * room_x + rng.uniform(-spec.shift, spec.shift, n) * size
    ty = rng.uniform(-1, 1, n) * room_y + rng.uniform(-spec.shift, spec.shift, n) * size
    cos, sin = np.cos(theta), np.sin(theta)
    # A = R(theta) @ [[1, shear], [0, 1]] @ diag(sx, sy)
    a00, a01 = cos * sx, (cos * shear - sin) * sy
    a10, a11 = sin * sx, (sin * shear + cos) * sy
    mats = np.empty((n, 2, 3), np.float64)
    mats[:, 0, 0], mats[:, 0, 1] = a00, a01
    mats[:, 1, 0], mats[:, 1, 1] = a10, a11
    mats[:, 0, 2] = c + tx - a00 * c - a01 * c
    mats[:, 1, 2] = c + ty - a10 * c - a11 * c
    return mats


def warp_affine(images: np.ndarray, mats: np.ndarray) -> np.ndarray:
    """[N, H, W, C] images, [N, 2, 3] output->source maps -> [N, H, W, C], bilinear,
    border pixels repeated outside the image."""
    if images.ndim != 4 or mats.shape != (images.shape[0], 2, 3):
        raise ValueError(f"expected [N, H, W, C] images and [N, 2, 3] maps, got {images.shape} and {mats.shape}")
    n, h, w, _ = images.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    src_x = mats[:, 0, 0, None, None] * xs + mats[:, 0, 1, None, None] * ys + mats[:, 0, 2, None, None]
    src_y = mats[:, 1, 0, None, None] * xs + mats[:, 1, 1, None, None] * ys + mats[:, 1, 2, None, None]
    src_x = np.clip(src_x, 0, w - 1)
    src_y = np.clip(src_y, 0, h - 1)
    x0 = np.minimum(np.floor(src_x).astype(np.int64), w - 2 if w > 1 else 0)
    y0 = np.minimum(np.floor(src_y).astype(np.int64), h - 2 if h > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx = (src_x - x0)[..., None].astype(np.float32)
    wy = (src_y - y0)[..., None].astype(np.float32)
    b = np.arange(n)[:, None, None]
    top = images[b, y0, x0] * (1 - wx) + images[b, y0, x1] * wx
    bottom = images[b, y1, x0] * (1 - wx) + images[b, y1, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def color_jitter(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and (for RGB) saturation, each up to ``strength``."""
    n = images.shape[0]
    shape = (n, 1, 1, 1)
    out = images + rng.uniform(-strength, strength, shape).astype(np.float32) * 0.5
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    out = (out - mean) * rng.uniform(1 - strength, 1 + strength, shape).astype(np.float32) + mean
    if images.shape[-1] == 3:
        gray = out @ np.asarray([0.299, 0.587, 0.114], np.float32)
        sat = rng.uniform(1 - strength, 1 + strength, shape).astype(np.float32)
        out = (out - gray[..., None]) * sat + gray[..., None]
    return np.clip(out, 0.0, 1.0)


def augment_batch(images: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """[N, H, W, C] float32 in [0, 1] -> a randomly augmented copy of the same shape."""
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected [N, S, S, C] square images, got {images.shape}")
    out = images.astype(np.float32, copy=False)
    if spec.geometric:
        out = warp_affine(out, random_affine(len(out), out.shape[1], spec, rng))
    if spec.jitter > 0:
        out = color_jitter(out, spec.jitter, rng)
    return out
