"""Image decoding and preprocessing, in one place for training, pipeline and server.

Every image, whatever its format or mode, goes through ``decode_image``: safe
against decompression bombs, EXIF orientation applied, converted to the model's
channel count (alpha composited on white), resized on the short side and centre-
cropped to ``image_size``, scaled to [0, 1] float32.

A large image is decoded shrunk (``open_image`` with ``min_side_px``, which
``decode_image`` sets from the model's input size: ``decode_side_px``): a JPEG at a reduced
DCT scale (Pillow's ``draft``), anything else reduced by an integer factor right after
decoding, before its mode is converted, to a short side of at least eight model inputs (and
256 px) that the resize then brings down to ``image_size``. A 12-megapixel photo decodes in a
third of the time and a fraction of the memory, with inputs within 1/255 of a full-size
decode's; training, the embed pipeline and the server's queries all decode this way, so
the same file gives the same input everywhere.

Plain JPEGs (no EXIF, so no orientation to apply; colour for an RGB model, grayscale
for a grayscale one) that need no shrinking take a fast path: libjpeg-turbo through
``simplejpeg``, the same library and IDCT as Pillow's decoder, so the pixels are identical,
at about a sixth of the cost for small images (10 vs 65 us for a CIFAR JPEG). Anything else, including every
JPEG the fast path refuses or finds corrupt, goes through Pillow, which names the problem.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # an optional speed-up: Pillow decodes everything without it
    simplejpeg = None

# Refuse images claiming more pixels than this before decoding them.
DEFAULT_MAX_PIXELS = 64_000_000
# Every image lookalike decodes is checked against its own limit (DEFAULT_MAX_PIXELS, or the
# model's ``PreprocessSpec.max_pixels``) from the header, before decoding: ``open_image``, and
# ``serving.decode.image_pixels`` for queries. Pillow's own check would print a
# DecompressionBombWarning to stderr over 89 MP (even for an image within a raised limit) and
# refuse over 179 MP, quoting a second limit, so it is off: the one refusal users see is ours.
Image.MAX_IMAGE_PIXELS = None
# Refuse images with a side shorter than this: nothing to compare in them.
MIN_SIDE_PX = 4
# How images are turned into model input, beyond the PreprocessSpec: part of the embedding
# cache's key (``pipeline.cache.cache_dir``), so a change makes --incremental embed every file
# again rather than mix embeddings of two decoders. 2: a large image is decoded shrunk
# (``decode_side_px``), and 16-bit pictures are scaled by their bit depth, not their maximum.
IMAGE_DECODING_VERSION = 2
# A large image is decoded shrunk to a short side of no less than this many model inputs ...
SHRINK_TO_INPUT_SIDES = 8
# ... and no less than this (thumbnails are made from the same decoded picture).
SHRINK_MIN_SIDE_PX = 256
_ORIENTATION_TAG = 0x0112
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_UNREDUCIBLE = ("1", "P", "I;16", "I;16B", "I;16L")  # modes Pillow's reduce() refuses
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # scaled to 8 bits by bit depth (``to_mode``)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {self.image_size}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(**{k: d[k] for k in ("image_size", "channels", "max_pixels") if k in d})


def too_many_pixels(width: int, height: int, limit: int) -> str:
    """The reason an image of ``width`` x ``height`` is refused, the same for every decoder."""
    return f"image of {width}x{height} = {width * height} pixels exceeds the limit of {limit} pixels (decompression bomb?)"


def decode_side_px(spec: PreprocessSpec) -> int:
    """The short side an image of model input ``spec`` is decoded to at the least (``open_image``)."""
    return max(SHRINK_TO_INPUT_SIDES * spec.image_size, SHRINK_MIN_SIDE_PX)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side_px: int | None = None) -> Image.Image:
    """Open and decode ``data`` as a PIL image (first frame), EXIF orientation applied, or
    raise ImageDecodeError. With ``min_side_px``, an image whose short side is at least twice
    that is decoded shrunk to a short side between ``min_side_px`` and twice it (a JPEG at a
    reduced DCT scale, anything else reduced right after decoding); ``original_size`` then
    gives its upright size as stored."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except MemoryError:  # not the bytes' fault: never a permanent 'corrupt' verdict
        raise
    except Exception as e:  # PIL raises many types for damaged headers
        raise ImageDecodeError(f"corrupt or truncated image header ({type(e).__name__}: {e})") from None
    width, height = img.size
    if min(width, height) < MIN_SIDE_PX:
        raise ImageDecodeError(f"image of {width}x{height} pixels is smaller than the {MIN_SIDE_PX}x{MIN_SIDE_PX} minimum")
    if width * height > max_pixels:
        raise ImageDecodeError(too_many_pixels(width, height, max_pixels))
    if min_side_px and min(width, height) >= 2 * min_side_px:
        return _open_shrunk(img, min_side_px)
    try:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    return img


def _open_shrunk(img: Image.Image, min_side_px: int) -> Image.Image:
    """``img`` (opened, not decoded) decoded to a short side in [min_side_px, 2 min_side_px)
    where it can be reduced, upright; its upright full size in ``original_size``."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG)
        full_size = img.size
        if img.format == "JPEG":
            img.draft(img.mode, (min_side_px, min_side_px))  # the scale only: colours convert as unshrunk
        img.seek(0)
        img.load()
        factor = min(img.size) // min_side_px
        if factor >= 2:
            if img.mode in _UNREDUCIBLE:  # to a mode the model input is converted from anyway
                img = img.convert("RGBA") if img.mode == "P" else to_mode(img, 1)
            img = img.reduce(factor)
    except MemoryError:
        raise
    except Exception as e:  # damaged data
        raise ImageDecodeError(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    if orientation in _TRANSPOSES:
        img = img.transpose(_TRANSPOSES[orientation])
        if orientation >= 5:  # a quarter turn
            full_size = full_size[::-1]
    img.info["original_size"] = full_size
    return img


def original_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the upright image ``img`` was decoded from (``open_image``)."""
    return img.info.get("original_size", img.size)


_JPEG_SOI = b"\xff\xd8\xff"
_FAST_COLORSPACES = {1: ("Gray",), 3: ("YCbCr", "RGB")}


def decode_plain_jpeg(data: bytes, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                      min_side_px: int | None = None) -> np.ndarray | None:
    """[H, W, channels] uint8 pixels of a plain JPEG, decoded exactly as Pillow would, or
    None when the fast path does not apply (not a JPEG, EXIF present, a colour space that
    needs converting, outside the size limits, large enough to be decoded shrunk with
    ``min_side_px``, corrupt): the caller then uses Pillow (``open_image``)."""
    if simplejpeg is None or not data.startswith(_JPEG_SOI) or b"Exif\x00\x00" in data[:65536]:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _FAST_COLORSPACES[channels] or min(width, height) < MIN_SIDE_PX or width * height > max_pixels:
            return None
        if min_side_px and min(width, height) >= 2 * min_side_px:  # decoded shrunk, by Pillow
            return None
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB")
    except ValueError:  # corrupt or unsupported: Pillow decides, and explains
        return None
    return pixels.reshape(height, width, channels)


def pixels_to_image(pixels: np.ndarray) -> Image.Image:
    """[H, W, 1 or 3] uint8 pixels -> a PIL image of mode L or RGB."""
    return Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")


def pixels_to_array(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """[H, W, C] uint8 pixels (C = ``spec.channels``) -> float32 array of ``spec.shape`` in [0, 1]."""
    if pixels.shape == spec.shape:
        return np.asarray(pixels, dtype=np.float32) / 255.0
    return image_to_array(pixels_to_image(pixels), spec)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (palette, CMYK, 16-bit, alpha) to L or RGB.

    16-bit samples (modes I;16, I;16B, I;16L) are scaled by their bit depth, 65535 -> 255
    (v / 257, rounded), never by the image's own maximum: a dark 16-bit picture stays as dark
    as its 8-bit original, and an 8-bit picture saved as 16-bit (v * 257) gives exactly its
    8-bit pixels. Mode I (32-bit integers: how Pillow opens some 16-bit PGM, PNG and TIFF
    files) is taken as 16-bit samples too: 0..65535 scaled the same way, negative values
    black, values over 65535 white. Mode F (32-bit float samples, e.g. a float TIFF) with
    values in [0, 1] is scaled by 255, as TFDS float images are; values in [0, 255] are taken
    as they are; other values (or NaN) raise ImageDecodeError naming them (Pillow's own
    conversion clips, so a [0, 1] picture came out black)."""
    if img.mode == "F":
        img = Image.fromarray(float_samples_to_uint8(np.asarray(img, dtype=np.float32)), "L")
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img)
        if img.mode == "I":
            arr = np.clip(arr, 0, 65535)
        img = Image.fromarray(((arr.astype(np.uint32) + 128) // 257).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def float_samples_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float samples in [0, 1] (scaled by 255) or [0, 255] -> uint8; ImageDecodeError otherwise."""
    finite = np.isfinite(arr)
    if not finite.all():
        raise ImageDecodeError(f"float image has {int(arr.size - finite.sum())} NaN or infinite value(s)")
    low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise ImageDecodeError(f"float image values from {low:g} to {high:g}: expected [0, 1] or [0, 255]")
    scale = 255.0 if high <= 1.0 else 1.0
    return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` and centre-crop to ``size`` x ``size``."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_pixels(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """PIL image -> uint8 pixels of shape ``spec.shape``, as ``image_to_array`` takes them: a
    quarter of its memory, for input held a while (a video's frames until they are embedded)."""
    img = to_mode(img, spec.channels) if img.mode != ("L" if spec.channels == 1 else "RGB") else img
    if img.size != (spec.image_size, spec.image_size):  # Pillow's same-size resize is a copy
        img = resize_center_crop(img, spec.image_size)
    return np.asarray(img, dtype=np.uint8).reshape(spec.shape)


def image_to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """PIL image -> float32 array of shape ``spec.shape`` with values in [0, 1]."""
    return image_to_pixels(img, spec).astype(np.float32) / 255.0


def decode_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Image file bytes -> float32 [H, W, C] model input (a large image decoded shrunk:
    ``decode_side_px``); ImageDecodeError if unusable."""
    side = decode_side_px(spec)
    pixels = decode_plain_jpeg(data, spec.channels, spec.max_pixels, side)
    if pixels is not None:
        return pixels_to_array(pixels, spec)
    return image_to_array(open_image(data, spec.max_pixels, side), spec)
