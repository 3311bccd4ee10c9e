"""Decode untrusted image bytes into RGB uint8 arrays, and encode results.

Every image that enters facejobs goes through :func:`decode`. It reads the header
first and refuses images whose declared size exceeds the pixel cap before any pixel
is decoded (a 40000x40000 PNG costs a few hundred bytes on disk and 4.8 GB in
memory). It applies EXIF orientation and normalises the modes a photo collection
really contains (grey, palette, RGBA, 16-bit, CMYK) to RGB uint8. Animated GIF and
WebP and multi-page TIFF give their first frame. HEIC is refused with its own
status, as is AVIF when the installed Pillow was built without it.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, features

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MIN_SIDE = 16
# MPO is how Pillow names a camera JPEG that carries a second picture (stereo or
# depth); its first picture is the photo.
DEFAULT_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF"})

# ISO-BMFF ``ftyp`` brands (major or compatible) that name an AVIF or a HEIF image.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                          b"mif1", b"msf1", b"mif2", b"avci", b"avcs"})


class ImageError(ValueError):
    """An image could not be used. ``status`` is the row status a job records."""

    status = "decode_error"


class DecodeError(ImageError):
    """The bytes are not a readable image of an accepted format."""

    status = "decode_error"


class UnsupportedFormatError(ImageError):
    """A recognised image format that this build or these limits do not decode."""

    status = "unsupported_format"


class TooLargeError(ImageError):
    """The header declares more pixels than the cap (or Pillow's own guard) allows."""

    status = "too_large"


class TooSmallError(ImageError):
    """The image is too small to hold a face."""

    status = "too_small"


@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied while decoding.

    Attributes:
        max_pixels: largest width*height accepted, checked on the header. A cap
            above twice ``PIL.Image.MAX_IMAGE_PIXELS`` (179 MP by default) does
            not reach that far: Pillow's decompression-bomb guard refuses larger
            images first, and that becomes a :class:`TooLargeError` too.
        min_side: smallest accepted width or height, in pixels.
        formats: Pillow format names accepted.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    formats: frozenset[str] = DEFAULT_FORMATS


@dataclass(frozen=True)
class DecodedImage:
    """An RGB uint8 image and where it came from.

    Attributes:
        rgb: (H, W, 3) uint8, EXIF orientation applied.
        format: the container format, e.g. "JPEG".
        source_mode: the Pillow mode before conversion, e.g. "CMYK", "I;16".
        exif_transposed: True when an EXIF orientation tag rotated or flipped it.
    """

    rgb: np.ndarray
    format: str
    source_mode: str
    exif_transposed: bool

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def decode(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Decode image bytes to RGB uint8.

    Animated GIF and WebP and multi-page TIFF give their first frame. Pillow's
    global settings are left as they are: its decompression-bomb warning (from
    89 MP by default) is silenced inside this call only, since
    ``limits.max_pixels`` is the cap that counts, but its error (above 179 MP by
    default) still stands, so a cap set above that is refused by Pillow's guard.

    Args:
        data: the encoded file.
        limits: pixel cap, minimum side and accepted formats.

    Returns:
        The decoded image, EXIF orientation applied.

    Raises:
        DecodeError: empty, truncated, corrupt or unknown bytes.
        UnsupportedFormatError: HEIC; AVIF when Pillow has no AVIF support; a
            format not in ``limits.formats``.
        TooLargeError: header declares more than ``limits.max_pixels`` pixels, or
            more than Pillow's decompression-bomb guard allows.
        TooSmallError: a side is shorter than ``limits.min_side``.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    _refuse_undecodable_container(data)
    try:
        # Image.open reads only the header: the size check below happens before
        # the pixel data is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise TooLargeError(f"refused by Pillow's decompression-bomb guard: {exc}") from exc
    except Exception as exc:  # Pillow raises several unrelated types here
        raise DecodeError(f"not a readable image: {exc}") from exc
    fmt = image.format or "unknown"
    if fmt not in limits.formats:
        raise UnsupportedFormatError(f"format {fmt} not accepted (accepted: {sorted(limits.formats)})")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise TooLargeError(
            f"{width}x{height} = {width * height} pixels exceeds the cap of {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise TooSmallError(f"{width}x{height} is smaller than {limits.min_side} px on a side")
    source_mode = image.mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()  # the first frame of an animation or a multi-page file
            orientation = image.getexif().get(0x0112, 1)
            transposed = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise DecodeError(f"corrupt {fmt} data: {exc}") from exc
    exif_transposed = orientation not in (None, 1)
    try:
        rgb = _to_rgb_uint8(transposed)
    except ValueError as exc:  # a mode Pillow cannot convert; a bad input, not a crash
        raise DecodeError(f"{fmt} image in mode {transposed.mode} cannot become RGB: {exc}") from exc
    return DecodedImage(rgb=rgb, format=fmt, source_mode=source_mode, exif_transposed=exif_transposed)


def _refuse_undecodable_container(data: bytes) -> None:
    """Raise UnsupportedFormatError for HEIC, and for AVIF without Pillow's AVIF support.

    Both are ISO-BMFF files named by their ``ftyp`` box. Without this check they
    would end as an unhelpful "cannot identify image file" decode error.
    """
    brands = _ftyp_brands(data)
    if brands & _AVIF_BRANDS:
        if not _pillow_decodes_avif():
            raise UnsupportedFormatError(
                "AVIF images are not supported by this Pillow build (its wheels include AVIF from "
                "11.3 on); convert to JPEG or PNG"
            )
    elif brands & _HEIF_BRANDS:
        found = ", ".join(sorted(b.decode("latin-1") for b in brands & _HEIF_BRANDS))
        raise UnsupportedFormatError(
            f"HEIC/HEIF images are not supported (ftyp brands: {found}); convert to JPEG or PNG"
        )


def _ftyp_brands(data: bytes) -> frozenset[bytes]:
    """The major and compatible brands of a leading ISO-BMFF ``ftyp`` box; empty if none."""
    if len(data) < 12 or data[4:8] != b"ftyp":
        return frozenset()
    # Box: size (4), "ftyp" (4), major brand (4), minor version (4), compatible brands (4 each).
    declared = int.from_bytes(data[:4], "big")
    end = min(len(data), declared if declared >= 16 else 16, 1024)
    return frozenset([data[8:12]] + [data[i:i + 4] for i in range(16, end - 3, 4)])


@functools.cache
def _pillow_decodes_avif() -> bool:
    return bool(features.check("avif"))


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        if grey.max(initial=0.0) <= 1.0:  # float images are usually 0..1
            grey = grey * 255.0
        return _grey_to_rgb(grey)
    if mode.startswith("I"):
        # Pillow's convert("RGB") clips 16-bit values at 255 (a white image);
        # rescale from the range the data was stored in instead.
        grey = np.asarray(image, dtype=np.float64)
        wide = mode.startswith("I;16") or grey.max(initial=0.0) > 255
        return _grey_to_rgb(grey * (255.0 / 65535.0) if wide else grey)
    # A transparent colour key (PNG tRNS, GIF) makes grey and RGB images transparent too.
    keyed = mode in ("L", "RGB") and "transparency" in image.info
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or keyed:
        # Transparent pixels become white: cut-out portraits usually sit on white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB")).copy()
    if mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(image).copy()


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    grey8 = grey.round().clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))


def encode_png(rgb: np.ndarray, compression: int = 3) -> bytes:
    """Encode an (H, W, 3) RGB or (H, W) grey uint8 array as PNG bytes."""
    _check_uint8_image(rgb)
    array = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """Encode an (H, W, 3) RGB uint8 array as JPEG bytes."""
    _check_uint8_image(rgb)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes written by :func:`encode_png` (trusted, our own output)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DecodeError("not a PNG")
    return array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _check_uint8_image(array: np.ndarray) -> None:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected (H, W, 3) or (H, W) uint8, got {array.shape} {array.dtype}")


def tile(images: list[np.ndarray], columns: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Lay equally sized (H, W, 3) uint8 images out in a grid (a contact sheet)."""
    if not images:
        raise ValueError("tile needs at least one image")
    height, width = images[0].shape[:2]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError("tile needs images of one shape")
    rows = -(-len(images) // columns)
    sheet = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), fill, np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        sheet[top:top + height, left:left + width] = image
    return sheet
