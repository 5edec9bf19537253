"""Query images of many pixels cost bounded memory: a large image is decoded shrunk (JPEG
draft, reduce before converting: ``model.preprocess.decode_image``), large decodes take one of a few server-wide slots, a batch
request's images have a pixel budget (413 naming it), and every too-many-pixels image gets
one message naming its pixels and the limit. Real server on 127.0.0.1 (conftest's tiny store)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lookalike.model.preprocess import PreprocessSpec, decode_image, image_to_array, open_image
from lookalike.serving.decode import DecodeSlots
from lookalike.serving.queries import MAX_BATCH_PIXELS


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    g = ((x + y) / 2).astype(np.uint8)
    return Image.fromarray(np.stack([g, 255 - g, g // 2], -1) if mode == "RGB" else g, mode)


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P")])
def test_a_large_image_decodes_shrunk_to_nearly_the_same_input(fmt: str, mode: str) -> None:
    img = gradient(3000, 2000)
    if mode == "P":
        img = img.convert("P")
    data = encoded(img, fmt)
    spec = PreprocessSpec(image_size=32, channels=3)
    full, shrunk = image_to_array(open_image(data), spec), decode_image(data, spec)
    assert shrunk.shape == full.shape == spec.shape
    assert float(np.abs(shrunk - full).mean()) < 0.02
    small = encoded(gradient(300, 200), fmt)  # not shrunk
    assert np.array_equal(decode_image(small, spec), image_to_array(open_image(small), spec))


def test_decoding_an_8k_jpeg_stays_small_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(encoded(gradient(8000, 8000), "JPEG", quality=50))
    script = (
        "import resource, sys\n"
        "from lookalike.model.preprocess import PreprocessSpec\n"
        "from lookalike.model.preprocess import decode_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "decode_image(data, PreprocessSpec(image_size=32, channels=3))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    grown_kb = int(subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                                  check=True).stdout)
    assert grown_kb < 60_000, f"decoding grew the process by {grown_kb} kB (a full decode is ~190 MB)"


def test_large_uploads_search_and_share_the_decode_slots(http: httpx.Client) -> None:
    data = encoded(gradient(4000, 3000), "PNG")
    response = http.post("/v1/search/image?k=2", content=data)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


def test_decode_slots_bound_concurrency() -> None:
    async def run() -> int:
        slots, running, peak = DecodeSlots(2), [0], [0]

        async def decode() -> None:
            async with slots:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                await asyncio.sleep(0.01)
                running[0] -= 1

        await asyncio.gather(*(decode() for _ in range(8)))
        return peak[0]

    assert asyncio.run(run()) == 2
    assert DecodeSlots().count >= 1


def test_a_batch_has_a_pixel_budget(http: httpx.Client) -> None:
    side = int((MAX_BATCH_PIXELS // 2) ** 0.5) + 10  # two of these are over the budget
    image = base64.b64encode(encoded(Image.new("L", (side, side), 128), "PNG")).decode()
    response = http.post("/v1/search/batch", json={"queries": [{"image_base64": image}] * 2})
    assert response.status_code == 413, response.text
    assert f"over the limit of {MAX_BATCH_PIXELS} pixels per request" in response.json()["detail"]


@pytest.mark.parametrize("width, height", [(13_000, 13_000), (20_000, 20_000)])  # under and over Pillow's own limit
def test_too_many_pixels_is_one_message(http: httpx.Client, width: int, height: int) -> None:
    for payload in (png_header_only(width, height), jpeg_header_only(width, height)):
        response = http.post("/v1/search/image", content=payload)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert f"{width * height} pixels exceeds the limit of 64000000 pixels" in detail, detail


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` (a tiny real PNG's IHDR rewritten)."""
    data = bytearray(encoded(Image.new("L", (16, 16)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


def jpeg_header_only(width: int, height: int) -> bytes:
    """A JPEG whose SOF marker declares ``width`` x ``height`` (the rest is a tiny real JPEG's)."""
    data = bytearray(encoded(Image.new("L", (16, 16)), "JPEG"))
    at = data.index(b"\xff\xc0") + 5
    data[at:at + 4] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_video_is_not_a_query(http: httpx.Client, tmp_path: Path, make_video) -> None:
    video = make_video(tmp_path / "clip.mp4").read_bytes()
    response = http.post("/v1/search/image", content=video, headers={"content-type": "video/mp4"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "a video is not accepted as a query" in detail and "#t=<seconds>" in detail and "lookalike query --id" in detail
    assert json.dumps(response.json())


def test_heic_and_avif_photos_are_images_not_videos(http: httpx.Client) -> None:
    """HEIF and AVIF files are ISO media files like MP4 ('ftyp' box), but photos: a HEIC one is
    refused as such (Pillow here cannot decode it), a damaged AVIF one with the decoder's reason."""
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    response = http.post("/v1/search/image", content=heic, headers={"content-type": "image/heic"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "HEIF/HEIC image" in detail and "convert it to JPEG" in detail and "video" not in detail, detail
    avif = encoded(Image.new("RGB", (64, 48), "red"), "AVIF")
    assert avif[4:12] == b"ftypavif"
    assert http.post("/v1/search/image", content=avif).status_code == 200  # whole, it is a usable image
    damaged = http.post("/v1/search/image", content=avif[: len(avif) // 2])
    assert damaged.status_code == 422 and "video" not in damaged.json()["detail"], damaged.text
