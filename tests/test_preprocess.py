import io

import numpy as np
import pytest
from PIL import Image

from lookalike.model.preprocess import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    decode_plain_jpeg,
    decode_side_px,
    image_to_array,
    open_image,
    original_size,
)

SPEC_RGB = PreprocessSpec(image_size=16, channels=3)
SPEC_GRAY = PreprocessSpec(image_size=16, channels=1)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img, fmt",
    [
        (Image.new("RGB", (40, 20), (255, 0, 0)), "JPEG"),
        (Image.new("L", (8, 8), 128), "PNG"),
        (Image.new("P", (10, 10), 3), "GIF"),
        (Image.new("CMYK", (12, 12), (0, 255, 0, 0)), "JPEG"),
        (Image.new("RGBA", (9, 9), (0, 0, 0, 0)), "PNG"),
        (Image.new("I;16", (10, 10), 40000), "PNG"),
        (Image.new("RGB", (4, 4), (1, 2, 3)), "BMP"),
        (Image.new("RGB", (5, 7), (1, 2, 3)), "TIFF"),
        (Image.new("RGB", (5, 7), (1, 2, 3)), "WEBP"),
    ],
)
@pytest.mark.parametrize("spec", [SPEC_RGB, SPEC_GRAY])
def test_any_mode_and_format_becomes_model_input(img, fmt, spec):
    x = decode_image(encode(img, fmt), spec)
    assert x.shape == spec.shape and x.dtype == np.float32
    assert 0.0 <= x.min() <= x.max() <= 1.0


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("brightest", [255, 40])  # 40: a dark picture, max 40 * 257 as 16-bit
@pytest.mark.parametrize("size", [(24, 20), (600, 520)])  # (600, 520): decoded shrunk
@pytest.mark.parametrize("spec", [SPEC_RGB, SPEC_GRAY])
def test_a_16_bit_copy_of_an_8_bit_picture_gives_the_same_model_input(fmt, brightest, size, spec):
    """16 bits are scaled by bit depth (v * 257 -> v), not stretched to the picture's maximum."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, brightest + 1, size[::-1], dtype=np.uint8)
    eight = decode_image(encode(Image.fromarray(pixels, "L"), fmt), spec)
    sixteen = pixels.astype(np.uint16) * 257
    assert Image.open(io.BytesIO(encode(Image.fromarray(sixteen), fmt))).mode.startswith("I;16")
    np.testing.assert_allclose(decode_image(encode(Image.fromarray(sixteen), fmt), spec), eight, atol=1 / 255)
    # 32-bit integers (mode I, as some TIFFs hold them) are taken as 16-bit samples too
    as_int32 = Image.fromarray(sixteen.astype(np.int32))
    np.testing.assert_allclose(decode_image(encode(as_int32, "TIFF"), spec), eight, atol=1 / 255)


def test_16_bit_samples_scale_by_bit_depth_rounded_and_mode_i_is_clipped():
    from lookalike.model.preprocess import to_mode

    values = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)
    assert np.asarray(to_mode(Image.fromarray(values), 1)).tolist() == [[0, 0, 1, 1, 128, 255]]
    wide = Image.fromarray(np.array([[-5, 0, 65535, 70000]], np.int32))
    assert np.asarray(to_mode(wide, 1)).tolist() == [[0, 0, 255, 255]]


def test_float_tiffs_in_0_1_or_0_255_give_their_pictures_and_others_are_refused():
    """Pillow's own conversion of mode F clips: a [0, 1] float TIFF came out black."""
    gray = np.linspace(0, 255, 8 * 8, dtype=np.float32).reshape(8, 8).round()
    expected = decode_image(encode(Image.fromarray(gray.astype(np.uint8)), "PNG"), SPEC_GRAY)
    for samples in (gray / 255.0, gray):  # [0, 1] and [0, 255]
        tiff = encode(Image.fromarray(samples.astype(np.float32), "F"), "TIFF")
        np.testing.assert_allclose(decode_image(tiff, SPEC_GRAY), expected, atol=1 / 255)
    for bad, reason in ((gray * 2, "values from 0 to 510: expected"), (np.full((8, 8), np.nan, np.float32), "64 NaN")):
        with pytest.raises(ImageDecodeError, match=reason):
            decode_image(encode(Image.fromarray(bad.astype(np.float32), "F"), "TIFF"), SPEC_RGB)


def test_transparent_pixels_become_white():
    x = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0))), SPEC_GRAY)
    np.testing.assert_allclose(x, 1.0)


def test_exif_orientation_is_applied():
    img = Image.new("L", (20, 10), 0)
    img.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    x = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=100), PreprocessSpec(10, 1))
    assert x[:4].mean() > 0.8 and x[-4:].mean() < 0.2  # white half is now on top


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is a text file, not a jpeg", "not a recognised image"),
        (encode(Image.new("RGB", (1, 1))), "1x1 pixels is smaller"),
        (encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200], "corrupt or truncated"),
    ],
)
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, SPEC_RGB)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    data = encode(Image.new("L", (1, 1)))
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


def test_decompression_bomb_refused_before_decoding():
    bomb = png_claiming(50000, 50000)
    with pytest.raises(ImageDecodeError, match="decompression bomb|exceeds"):
        decode_image(bomb, SPEC_RGB)


@pytest.mark.parametrize("width, height", [(10_000, 9_000), (20_000, 10_000)])  # over Pillow's 89 MP, 179 MP
def test_only_our_pixel_limit_is_quoted_and_pillow_prints_no_warning(width, height):
    """Pillow's DecompressionBombWarning (over 89 MP) and its own refusal (over 179 MP, quoting
    178956970 pixels) never reach the user: our limit, our message, before decoding."""
    import warnings

    from lookalike.model.preprocess import DEFAULT_MAX_PIXELS, too_many_pixels

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning fails the test
        with pytest.raises(ImageDecodeError) as refused:
            open_image(png_claiming(width, height))
        assert str(refused.value) == too_many_pixels(width, height, DEFAULT_MAX_PIXELS)
        # within a model's raised limit: no warning either (the header's 90 MP are never decoded: no data)
        with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
            open_image(png_claiming(width, height), max_pixels=width * height)


# --- the libjpeg-turbo fast path for plain JPEGs -------------------------------------

def _jpeg(mode: str, size=(41, 29), seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def _pillow_only(data: bytes, spec):
    return image_to_array(open_image(data, spec.max_pixels), spec)


@pytest.mark.parametrize("mode,save", [("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0}),
                                       ("L", {}), ("RGB", {"quality": 30})])
@pytest.mark.parametrize("size,channels", [(16, 3), (29, 3), (16, 1)])
def test_fast_jpeg_path_gives_pillows_pixels(mode, save, size, channels):
    spec = PreprocessSpec(image_size=size, channels=channels)
    data = _jpeg(mode, **save)
    np.testing.assert_array_equal(decode_image(data, spec), _pillow_only(data, spec))


def test_fast_path_takes_plain_jpegs_and_leaves_the_rest_to_pillow():
    assert decode_plain_jpeg(_jpeg("RGB"), 3).shape == (29, 41, 3)
    assert decode_plain_jpeg(_jpeg("L"), 1).shape == (29, 41, 1)
    assert decode_plain_jpeg(_jpeg("RGB"), 1) is None  # colour -> gray conversion: Pillow's formula
    assert decode_plain_jpeg(_jpeg("L"), 3) is None
    assert decode_plain_jpeg(_jpeg("RGB")[:200], 3) is None  # truncated: Pillow reports it
    assert decode_plain_jpeg(_jpeg("RGB", size=(3, 40)), 3) is None  # below the minimum side
    assert decode_plain_jpeg(_jpeg("RGB"), 3, max_pixels=100) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    assert decode_plain_jpeg(_jpeg("RGB", exif=exif.tobytes()), 3) is None
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    assert decode_plain_jpeg(png.getvalue(), 3) is None


def test_exif_orientation_and_corrupt_jpegs_still_go_through_pillow():
    spec = PreprocessSpec(image_size=16, channels=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(_jpeg("RGB", size=(40, 20), exif=exif.tobytes()), spec)
    assert rotated.shape == (16, 16, 3)
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(_jpeg("RGB")[:300], spec)


def _photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour ramps with some grain: compresses and shrinks like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    grain = np.random.default_rng(0).normal(0, 8, (height, width, 1))
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) % 256], -1) + grain
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 250)
    return img.convert(mode)


@pytest.mark.parametrize("mode, fmt, orientation", [
    ("RGB", "JPEG", None), ("RGB", "JPEG", 6), ("L", "JPEG", None), ("CMYK", "JPEG", None),
    ("RGB", "PNG", None), ("P", "PNG", None), ("I;16", "PNG", None), ("RGBA", "WEBP", None),
])
@pytest.mark.parametrize("channels", [3, 1])
def test_a_large_image_is_decoded_shrunk_to_nearly_a_full_decode(mode, fmt, orientation, channels):
    spec = PreprocessSpec(image_size=16, channels=channels)
    side = decode_side_px(spec)
    assert side == 256  # eight model inputs, but no less than 256 px
    save = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    data = encode(_photo(1200, 700, mode), fmt, **save)
    upright = (700, 1200) if orientation == 6 else (1200, 700)
    full = open_image(data)
    assert full.size == upright and original_size(full) == upright
    shrunk = open_image(data, min_side_px=side)
    assert side <= min(shrunk.size) < 2 * side and original_size(shrunk) == upright
    assert (shrunk.size[0] > shrunk.size[1]) == (upright[0] > upright[1])  # turned upright too
    difference = np.abs(decode_image(data, spec) - image_to_array(full, spec))
    assert float(difference.mean()) < 0.01 and float(difference.max()) <= 0.1
    assert decode_plain_jpeg(data, channels, min_side_px=side) is None  # large: never the unshrunk fast path


def test_an_image_below_twice_the_decode_side_is_decoded_whole():
    spec = PreprocessSpec(image_size=16, channels=3)
    data = _jpeg("RGB", size=(1000, decode_side_px(spec) * 2 - 1))
    assert decode_plain_jpeg(data, 3, min_side_px=decode_side_px(spec)).shape == (511, 1000, 3)
    np.testing.assert_array_equal(decode_image(data, spec), _pillow_only(data, spec))


@pytest.mark.parametrize("stage", ["open", "load", "load_shrunk"])
def test_running_out_of_memory_is_not_called_corrupt_data(monkeypatch, stage):
    """A MemoryError while opening or decoding is raised as it is: calling the bytes corrupt
    would record them as undecodable for good (``pipeline.batches``)."""
    from lookalike.model import preprocess

    out = io.BytesIO()
    Image.new("RGB", (400, 300), (9, 99, 199)).save(out, format="PNG")

    def short_of_memory(*args, **kwargs):
        raise MemoryError()

    if stage == "open":
        monkeypatch.setattr(preprocess.Image, "open", short_of_memory)
    else:
        monkeypatch.setattr(preprocess.Image.Image, "load", short_of_memory)
    with pytest.raises(MemoryError):
        preprocess.open_image(out.getvalue(), min_side_px=100 if stage == "load_shrunk" else None)
