import io
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, features

from facecore import images
from facecore.images import (
    DecodeError,
    DecodeLimits,
    TooLargeError,
    TooSmallError,
    UnsupportedFormatError,
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


ROOT = Path(__file__).resolve().parents[2]
PILLOW_DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # 89478485, as PIL/Image.py sets it


def test_huge_header_is_refused_before_decoding():
    data = png_with_header_only(40000, 40000)
    assert len(data) < 200
    # 1.6 GP is over twice Pillow's limit: its guard refuses it inside Image.open.
    with pytest.raises(TooLargeError, match="1600000000 pixels") as caught:
        decode(data)
    assert caught.value.status == "too_large"


def test_pillows_guard_refuses_even_a_higher_cap():
    with pytest.raises(TooLargeError, match="decompression-bomb guard"):
        decode(png_with_header_only(40000, 40000), DecodeLimits(max_pixels=10**10))


def test_our_cap_refuses_without_pillows_warning():
    """100 MP is over Pillow's warning limit (89 MP): our cap answers, and nothing is warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TooLargeError, match="10000x10000 = 100000000 pixels exceeds the cap of 50000000"):
            decode(png_with_header_only(10000, 10000))
    assert [str(w.message) for w in caught] == []
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS


def test_importing_leaves_pillows_pixel_limit_alone():
    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import facecore.images; "
            "print(before, Image.MAX_IMAGE_PIXELS)")
    printed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert printed == [str(PILLOW_DEFAULT_MAX_PIXELS)] * 2


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
    data = _encode(Image.fromarray(_gradient()), "JPEG")
    with pytest.raises(UnsupportedFormatError, match="JPEG not accepted") as caught:
        decode(data, DecodeLimits(formats=frozenset({"PNG"})))
    assert caught.value.status == "unsupported_format"


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


RED, GREEN, BLUE = (200, 30, 40), (20, 160, 90), (0, 0, 255)


def _two_halves(width=64, height=48, left=RED, right=GREEN) -> np.ndarray:
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:, : width // 2] = left
    rgb[:, width // 2:] = right
    return rgb


def test_gif87a_decodes_to_its_palette_colours():
    palette_image = Image.fromarray(_gradient(512, 512)).quantize(256)
    data = _encode(palette_image, "GIF")
    # One frame, no transparency, no comment: nothing needs GIF89a's extensions.
    data = b"GIF87a" + data[6:]
    assert Image.open(io.BytesIO(data)).size == (512, 512)
    decoded = decode(data)
    assert decoded.format == "GIF" and decoded.source_mode == "P"
    assert decoded.rgb.shape == (512, 512, 3)
    assert np.array_equal(decoded.rgb, np.asarray(palette_image.convert("RGB")))


@pytest.mark.parametrize("fmt, save_args", [
    ("GIF", {}),
    ("WEBP", {"lossless": True}),
    ("TIFF", {}),
])
def test_animation_or_pages_give_the_first_frame(fmt, save_args):
    first = Image.fromarray(_two_halves())
    later = Image.new("RGB", first.size, BLUE)
    data = _encode(first, fmt, save_all=True, append_images=[later], **save_args)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    decoded = decode(data).rgb
    assert np.array_equal(decoded, _two_halves())


def test_mpo_gives_the_first_picture():
    first = Image.fromarray(_two_halves())
    data = _encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", first.size, BLUE)], quality=95)
    decoded = decode(data)
    assert decoded.format == "MPO"
    assert np.abs(decoded.rgb.astype(int) - _two_halves()).mean() < 3


def test_bmp_and_8bit_tiff_are_exact():
    rgb = _gradient()
    for fmt in ("BMP", "TIFF"):
        decoded = decode(_encode(Image.fromarray(rgb), fmt))
        assert decoded.format == fmt
        assert np.array_equal(decoded.rgb, rgb), fmt


def test_16bit_tiffs_keep_their_high_byte():
    rgb = _gradient()
    ok, colour = cv2.imencode(".tiff", rgb[..., ::-1].astype(np.uint16) * 257)  # OpenCV writes 16-bit RGB
    assert ok
    decoded = decode(colour.tobytes())
    assert decoded.format == "TIFF"
    assert np.array_equal(decoded.rgb, rgb)
    grey = decode(_encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "TIFF"))
    assert grey.source_mode.startswith("I;16")
    assert np.array_equal(grey.rgb[..., 0], rgb[..., 0]) and np.array_equal(grey.rgb[..., 2], rgb[..., 0])


def test_cmyk_tiff_inks_become_rgb():
    cmyk = np.zeros((32, 32, 4), np.uint8)  # no ink: white
    cmyk[:, 8:16, 0] = 255  # cyan ink only
    cmyk[:, 16:24, 3] = 255  # black ink only
    cmyk[:, 24:, 3] = 128  # half black
    decoded = decode(_encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    assert decoded.source_mode == "CMYK"
    assert [tuple(decoded.rgb[0, x]) for x in (0, 8, 16, 24)] == [(255, 255, 255), (0, 255, 255), (0, 0, 0),
                                                                   (127, 127, 127)]


def test_lossy_webp_is_close():
    rgb = _gradient()
    decoded = decode(_encode(Image.fromarray(rgb), "WEBP", quality=95))
    assert decoded.format == "WEBP"
    assert np.abs(decoded.rgb.astype(int) - rgb).mean() < 4


def test_lossless_webp_alpha_composites_on_white():
    rgb = _gradient()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, 32:] = 0
    decoded = decode(_encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "WEBP", lossless=True))
    assert decoded.source_mode == "RGBA"
    assert np.array_equal(decoded.rgb[:, :32], rgb[:, :32])
    assert (decoded.rgb[:, 32:] == 255).all()


def test_palette_png_transparent_index_becomes_white():
    indices = np.zeros((32, 32), np.uint8)
    indices[:, 16:] = 1
    indices[16:, 16:] = 2
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette([0, 0, 0, *RED, *GREEN])
    decoded = decode(_encode(palette_image, "PNG", transparency=0))
    assert decoded.source_mode == "P"
    assert tuple(decoded.rgb[0, 0]) == (255, 255, 255)  # index 0: transparent, not black
    assert tuple(decoded.rgb[0, 31]) == RED and tuple(decoded.rgb[31, 31]) == GREEN


def test_colour_keyed_rgb_png_becomes_white_where_keyed():
    rgb = _two_halves(left=(0, 0, 0), right=GREEN)
    decoded = decode(_encode(Image.fromarray(rgb), "PNG", transparency=(0, 0, 0)))
    assert tuple(decoded.rgb[0, 0]) == (255, 255, 255) and tuple(decoded.rgb[0, -1]) == GREEN


def test_grey_with_alpha_composites_on_white():
    grey_alpha = np.zeros((32, 32, 2), np.uint8)
    grey_alpha[..., 0] = 100
    grey_alpha[:, :16, 1] = 255
    grey_alpha[:, 16:, 1] = 128
    decoded = decode(_encode(Image.fromarray(grey_alpha, "LA"), "PNG"))
    assert decoded.source_mode == "LA"
    assert tuple(decoded.rgb[0, 0]) == (100, 100, 100)
    half = round((100 * 128 + 255 * 127) / 255)  # 177
    assert np.abs(decoded.rgb[0, 20].astype(int) - half).max() <= 1


def test_one_bit_image_is_black_and_white():
    checker = (np.indices((32, 32)).sum(axis=0) % 2).astype(bool)
    decoded = decode(_encode(Image.fromarray(checker), "PNG"))
    assert decoded.source_mode == "1"
    assert np.array_equal(decoded.rgb[..., 1], np.where(checker, 255, 0))


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF support")
def test_avif_decodes_when_pillow_has_it():
    rgb = _gradient()
    decoded = decode(_encode(Image.fromarray(rgb), "AVIF", quality=95))
    assert decoded.format == "AVIF"
    assert np.abs(decoded.rgb.astype(int) - rgb).mean() < 4


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    # A meta box follows in a real file; a few bytes stand in for it.
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x10meta" + b"\x00" * 8


def test_avif_without_pillow_support_is_unsupported(monkeypatch):
    monkeypatch.setattr(images, "_pillow_decodes_avif", lambda: False)
    with pytest.raises(UnsupportedFormatError, match="AVIF images are not supported.*convert to JPEG or PNG"):
        decode(_ftyp(b"avif", b"mif1", b"miaf", b"avif"))


@pytest.mark.parametrize("brands", [
    (b"heic", b"mif1", b"heic"),
    (b"heix", b"mif1", b"heix"),
    (b"mif1", b"mif1", b"heic", b"miaf"),
    (b"msf1", b"msf1", b"hevc"),
])
def test_heic_is_unsupported_not_undecodable(brands):
    with pytest.raises(UnsupportedFormatError, match="HEIC/HEIF images are not supported.*convert to JPEG or PNG") \
            as caught:
        decode(_ftyp(*brands))
    assert caught.value.status == "unsupported_format"


def test_other_iso_media_stays_a_decode_error():
    with pytest.raises(DecodeError, match="not a readable image") as caught:
        decode(_ftyp(b"isom", b"isom", b"mp41"))  # an MP4 video
    assert caught.value.status == "decode_error"
