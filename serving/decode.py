"""Decoding query images with bounded memory and CPU.

An image of many pixels is cheap to upload (an 8000x8000 PNG of one colour is 200 KB)
and expensive to decode: hundreds of MB and a second of CPU each. The server therefore

* reads the pixel count from the file's header first (``image_pixels``), refusing too
  many pixels with one message naming both numbers (``check_pixels``), whatever the format;
* decodes with ``lookalike.model.preprocess.decode_image``, as training and the embed
  pipeline do: a large image is decoded shrunk (a JPEG at a reduced DCT scale, anything
  else reduced by an integer factor right after decoding, before its mode is converted),
  so only one full-size copy ever exists, and an upload of an indexed file gets exactly
  the model input the pipeline embedded;
* lets at most ``DecodeSlots`` (one per CPU) large decodes run at once; others wait.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import struct

from PIL import Image

from lookalike.model.preprocess import ImageDecodeError, simplejpeg, too_many_pixels

# Images of more pixels than this count against the decode slots (and are decoded shrunk).
LARGE_IMAGE_PIXELS = 4_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_VIDEO_SIGNATURES = (b"\x1aE\xdf\xa3",)  # Matroska / WebM; MP4 and MOV: 'ftyp' at offset 4


def image_pixels(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) from ``data``'s header without decoding it; None if it is not an image
    Pillow can open (the decoder then explains why); ImageDecodeError naming the pixels and
    ``max_pixels`` when it has more pixels than that."""
    size = None
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        size = struct.unpack(">II", data[16:24])
    elif simplejpeg is not None and data.startswith(_JPEG_SOI) and (header := _jpeg_header(data)) is not None:
        height, width = header  # (a few microseconds; Pillow's open costs ten times that)
        size = (width, height)
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
        except Image.DecompressionBombError as e:  # over Pillow's own limit: "Image size (N pixels) exceeds ..."
            found = re.search(r"\((\d+) pixels\)", str(e))
            if found and int(found.group(1)) > max_pixels:
                raise ImageDecodeError(f"image of {found.group(1)} pixels exceeds the limit of {max_pixels} pixels "
                                      "(decompression bomb?)") from None
            return None
        except Exception:  # not an image, or a damaged header: the decoder says which
            return None
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(too_many_pixels(width, height, max_pixels))
    return size


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # damaged: Pillow decides
        return None
    return height, width


# ISO base media files ('ftyp' at offset 4) whose major brand is a still image (or image
# sequence), not a video: HEIF (an iPhone's HEIC photos) and AVIF.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def looks_like_video(data: bytes) -> bool:
    if data[4:8] == b"ftyp":  # MP4, MOV, 3GP: a video unless its brand says HEIF or AVIF image
        return data[8:12] not in _HEIF_BRANDS | _AVIF_BRANDS
    return data.startswith(_VIDEO_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")


def looks_like_heif(data: bytes) -> bool:
    """A HEIF image (HEIC photos), which this server's Pillow cannot decode (AVIF it can)."""
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


class DecodeSlots:
    """At most ``count`` large image decodes at once, server-wide (default: one per CPU);
    ``async with slots:`` waits for one."""

    def __init__(self, count: int | None = None):
        self.count = count or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self._semaphore = asyncio.Semaphore(self.count)

    async def __aenter__(self) -> None:
        await self._semaphore.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._semaphore.release()
