import io

import numpy as np
import pytest
from PIL import Image

from facecore.images import (
    DecodeError,
    DecodeLimits,
    TooLargeError,
    TooSmallError,
    decode,
    decode_png,
    encode_jpeg,
    encode_png,
)
from jobs.samples import png_with_header_only


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width=64, height=48) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4 % 256, y * 5 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def test_png_round_trip_is_exact():
    rgb = _gradient()
    assert np.array_equal(decode(encode_png(rgb)).rgb, rgb)
    assert np.array_equal(decode_png(encode_png(rgb)), rgb)


def test_jpeg_round_trip_is_close():
    rgb = _gradient()
    decoded = decode(encode_jpeg(rgb, quality=95))
    assert decoded.format == "JPEG"
    assert np.abs(decoded.rgb.astype(int) - rgb).mean() < 4


def test_huge_header_is_refused_before_decoding():
    data = png_with_header_only(40000, 40000)
    assert len(data) < 200
    with pytest.raises(TooLargeError, match="40000x40000"):
        decode(data)


def test_pixel_cap_is_configurable():
    data = encode_png(_gradient(64, 48))
    with pytest.raises(TooLargeError):
        decode(data, DecodeLimits(max_pixels=64 * 48 - 1))
    assert decode(data, DecodeLimits(max_pixels=64 * 48)).width == 64


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, this is text" * 10, "not a readable image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "not a readable image"),
    ],
)
def test_garbage_raises_decode_error(data, message):
    with pytest.raises(DecodeError, match=message):
        decode(data)


def test_truncated_jpeg_raises_decode_error():
    data = encode_jpeg(_gradient(256, 256))
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode(data[: len(data) // 2])


def test_tiny_image_is_too_small():
    with pytest.raises(TooSmallError):
        decode(_encode(Image.new("RGB", (1, 1)), "PNG"))


def test_refused_format():
    data = _encode(Image.fromarray(_gradient()), "GIF")
    with pytest.raises(DecodeError, match="GIF not accepted"):
        decode(data)


def test_grey_16bit_png_is_rescaled_not_clipped():
    grey = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    decoded = decode(_encode(Image.fromarray(grey), "PNG"))
    assert decoded.rgb.shape == (48, 64, 3)
    expected = np.round(grey / 257.0)
    assert np.abs(decoded.rgb[..., 0].astype(int) - expected).max() <= 1
    assert decoded.rgb[..., 0].max() == 255 and decoded.rgb[..., 0].min() == 0


def test_rgba_composites_on_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top half opaque red-ish, bottom transparent
    decoded = decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG")).rgb
    assert tuple(decoded[0, 0]) == (200, 0, 0)
    assert tuple(decoded[31, 0]) == (255, 255, 255)


def test_grey_and_cmyk_become_rgb():
    rgb = _gradient()
    grey = decode(_encode(Image.fromarray(rgb).convert("L"), "JPEG", quality=95))
    assert grey.rgb.shape == (48, 64, 3) and grey.source_mode == "L"
    assert np.array_equal(grey.rgb[..., 0], grey.rgb[..., 2])
    cmyk = decode(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.source_mode == "CMYK"
    assert np.abs(cmyk.rgb.astype(int) - rgb).mean() < 10


def test_exif_orientation_is_applied():
    upright = _gradient(64, 48)
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode(_encode(sideways, "JPEG", quality=98, exif=exif.tobytes()))
    assert decoded.exif_transposed
    assert decoded.rgb.shape == upright.shape
    assert np.abs(decoded.rgb.astype(int) - upright).mean() < 6
