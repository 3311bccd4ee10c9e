"""Sample photos and a bad-input corpus, for the demo, the tests and benchmarks.

No third-party photo is committed to this repository. Real face photos come from
packages on the Python package index: the ``face_recognition`` 1.3.0 source
distribution ships ``tests/test_images/`` (two people, several photos each), and
scikit-image ships ``astronaut.png``. They are fetched with pip into a cache
folder on first use.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SDIST = "face_recognition==1.3.0"
PHOTO_NAMES = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")
ENV_CACHE = "FACEJOBS_SAMPLE_CACHE"


def cache_dir() -> Path:
    """Where fetched sample photos live: ``$FACEJOBS_SAMPLE_CACHE`` or ``./.cache/sample-photos``."""
    return Path(os.environ.get(ENV_CACHE, Path.cwd() / ".cache" / "sample-photos"))


def sample_photos(folder: Path | None = None) -> dict[str, Path]:
    """Real face photos by name, fetched from the package index if not cached.

    Returns the ``face_recognition`` test photos (``obama*.jpg``, ``biden.jpg``)
    and, when scikit-image is installed, ``astronaut.png``.
    """
    folder = Path(folder or cache_dir())
    if not all((folder / name).is_file() for name in PHOTO_NAMES):
        _download_test_images(folder)
    photos = {name: folder / name for name in PHOTO_NAMES}
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        astronaut = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
        if astronaut.is_file():
            photos["astronaut.png"] = astronaut
    return photos


def _download_test_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             "--dest", scratch, SDIST],
            check=True,
        )
        archive = next(Path(scratch).glob("face_recognition-*.tar.gz"))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if "/tests/test_images/" in member.name and member.isfile() and name.endswith((".jpg", ".png")):
                    source = tar.extractfile(member)
                    assert source is not None
                    with open(folder / name, "wb") as target:
                        shutil.copyfileobj(source, target)


def png_with_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header declares ``width x height`` with almost no data.

    Decoding it for real would allocate width*height*3 bytes; a decoder that
    checks the header first refuses it for free.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _jpeg(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, **save_args)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def faceless_image(width: int = 480, height: int = 360, seed: int = 0) -> np.ndarray:
    """A smooth synthetic landscape (sky, hills, blobs) with no face in it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([120 + 80 * y / height, 170 + 40 * y / height, 250 - 30 * y / height], axis=-1)
    hill = (y > height * 0.6 + 30 * np.sin(x / 50.0))[..., None]
    image = np.where(hill, np.array([70, 140, 60], np.float32), sky)
    for _ in range(6):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height * 0.5), rng.uniform(10, 30)
        image[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = (250, 250, 250)
    return image.clip(0, 255).astype(np.uint8)


def bad_input_corpus(photo: Path, second_photo: Path) -> dict[str, tuple[bytes | None, str]]:
    """Files that every job must survive, by file name, with the status each gets.

    ``None`` as the bytes means the file must not exist (a missing object).

    Args:
        photo: a real photo with one face (becomes the RGBA, grey, CMYK, 16-bit,
            GIF87a and EXIF-rotated variants).
        second_photo: another one-face photo, put beside ``photo`` for the
            several-faces case.
    """
    original = Image.open(photo).convert("RGB")
    rgb = np.asarray(original)
    jpeg_bytes = _jpeg(original)

    rgba = original.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full(rgb.shape[:2], 255, np.uint8)))
    alpha = np.asarray(rgba).copy()
    alpha[:40, :40, 3] = 0  # a transparent corner, composited onto white
    rgba = Image.fromarray(alpha, "RGBA")

    grey16 = (np.asarray(original.convert("L")).astype(np.uint16) * 257)
    ok16, png16 = cv2.imencode(".png", grey16)
    assert ok16

    # Stored sideways (rotated 90 degrees counter-clockwise) with EXIF
    # orientation 6, "rotate 90 clockwise to display", so it displays upright.
    sideways = original.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6

    gif = io.BytesIO()
    original.quantize(256).save(gif, format="GIF")
    # One frame, no transparency: nothing in it needs GIF89a, so it is the old GIF87a.
    gif87a = b"GIF87a" + gif.getvalue()[6:]

    # What a phone's HEIC starts with: an ftyp box naming HEIC, then the meta box.
    heic = (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x00\x22meta"
            + b"\x00" * 30)

    other = Image.open(second_photo).convert("RGB")
    height = max(original.height, other.height)
    pair = Image.new("RGB", (original.width + other.width, height), (128, 128, 128))
    pair.paste(original, (0, 0))
    pair.paste(other, (original.width, 0))

    return {
        "empty.jpg": (b"", "decode_error"),
        "truncated.jpg": (jpeg_bytes[: len(jpeg_bytes) * 6 // 10], "decode_error"),
        "text_renamed.jpg": (b"this is a text file, not a photo\n" * 20, "decode_error"),
        "one_pixel.png": (_png(Image.new("RGB", (1, 1), (200, 150, 120))), "too_small"),
        "sixteen_bit.png": (png16.tobytes(), "ok"),
        "rgba.png": (_png(rgba), "ok"),
        "grey.jpg": (_jpeg(original.convert("L")), "ok"),
        "cmyk.jpg": (_jpeg(original.convert("CMYK")), "ok"),
        "exif_rotated.jpg": (_jpeg(sideways, exif=exif.tobytes()), "ok"),
        "gif87a.gif": (gif87a, "ok"),
        "phone.heic": (heic, "unsupported_format"),
        "huge_header.png": (png_with_header_only(40000, 40000), "too_large"),
        "does_not_exist.jpg": (None, "fetch_error"),
        "no_face.png": (_png(Image.fromarray(faceless_image())), "no_face"),
        "several_faces.jpg": (_jpeg(pair), "ok"),
    }


def copy_sample_photos(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Copy the sample photos (but ``exclude``) into a folder; returns their new paths."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for name, path in sorted(sample_photos().items()):
        if name not in exclude:
            (folder / name).write_bytes(path.read_bytes())
            copies.append(folder / name)
    return copies


def write_corpus(folder: Path, corpus: dict[str, tuple[bytes | None, str]]) -> list[Path]:
    """Write a corpus to a folder; returns every path, missing ones included."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (data, _status) in corpus.items():
        path = folder / name
        if data is not None:
            path.write_bytes(data)
        paths.append(path)
    return paths


def tiny_pinch_models(folder: Path) -> dict[str, str]:
    """Small untrained imitator and parser saved under ``folder``: for tests and benches of a job's
    mechanics (placement, faults, exactly-once), not of its quality. Seeded: the same every time."""
    import torch

    from facecore import weights
    from facecore.models.imitator import Imitator, ImitatorConfig
    from facecore.models.parsing import FaceParser, ParsingConfig
    from facecore.rig import default_schema

    torch.manual_seed(0)
    weights.save_model(Imitator(ImitatorConfig(param_dim=default_schema().vector_size, image_size=32,
                                               base_channels=8)), str(folder / "imitator"))
    weights.save_model(FaceParser(ParsingConfig(base_channels=8, stages=3)), str(folder / "parser"))
    return {"imitator": str(folder / "imitator"), "parser": str(folder / "parser")}


def tiny_regressor(folder: Path) -> str:
    """A small untrained regressor (64-px crops) saved in ``folder``; returns the folder. Like
    :func:`tiny_pinch_models`, for a job's mechanics, not its quality. Seeded: the same every time."""
    import torch

    from facecore import weights
    from facecore.models.regressor import regressor_for_rig
    from facecore.rig import default_schema

    torch.manual_seed(0)
    weights.save_model(regressor_for_rig(default_schema(), image_size=64, cnn_channels=4, hidden=32, parser_size=32,
                                         parser_base_channels=8, parser_stages=3), str(folder))
    return str(folder)


def tiny_expression(folder: Path, image_size: int = 64) -> str:
    """A small untrained expression G saved in ``folder``; returns the folder. Untrained, G is the
    piecewise-affine warp to the target landmarks: a job's mechanics, not its quality. Seeded."""
    import torch

    from facecore import weights
    from facecore.models.expression import ExpressionConfig, ExpressionGenerator

    torch.manual_seed(0)
    weights.save_model(ExpressionGenerator(ExpressionConfig(image_size=image_size, base_channels=8,
                                                            residual_blocks=1)), str(folder))
    return str(folder)


def tiny_swap(folder: Path, image_size: int = 64) -> str:
    """A small untrained face-swap E and D saved in ``folder``; returns the folder (a swap job's
    mechanics, not its quality). Seeded."""
    import torch

    from facecore import weights
    from facecore.models.latent import LatentConfig, LatentSwapper

    torch.manual_seed(0)
    weights.save_model(LatentSwapper(LatentConfig(image_size=image_size, latent_dim=32, channels=8,
                                                  max_channels=32)), str(folder))
    return str(folder)


FACE_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png")


def photo_copies(photos: dict[str, Path], folder: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` input files numbered from ``start`` (``photo-00000.jpg``...), copies of the face photos in turn.

    Numbered names are distinct keys: a manifest of copies behaves like one of
    as many photos, and a growing manifest keeps its earlier keys.
    """
    names = [name for name in FACE_PHOTOS if name in photos]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        source = photos[names[index % len(names)]]
        path = folder / f"photo-{index:05d}{source.suffix}"
        if not path.exists():
            shutil.copyfile(source, path)
        paths.append(path)
    return paths


def aligned_renders(count: int, seed: int, size: int):
    """Rig renders at random poses aligned like photos, as the render job makes them (``align: affine68``).

    Returns (images (N, S, S, 3) uint8, landmarks (N, 68, 2) float32 in the crop, vectors (N, D) float32).
    For tests and benches that need known truth without running a job.
    """
    import numpy as np

    from facecore.images import decode_png
    from jobs.kinds.render import RenderOptions, RenderStage

    stage = RenderStage(RenderOptions(size=size, seed=seed, align="affine68"))
    table = stage({"key": [str(i) for i in range(count)], "index": list(range(count)), "params": [None] * count,
                   "status": ["ok"] * count, "error": [None] * count})
    images = np.stack([decode_png(data.as_py()) for data in table.column("image")])
    landmarks = np.array(table.column("landmarks").to_pylist(), np.float32).reshape(count, 68, 2)
    return images, landmarks, np.array(table.column("params").to_pylist(), np.float32)


def aligned_expression_pairs(count: int, seed: int, size: int, pose_jitter: float = 0.05,
                             pair_frame: str = "source"):
    """Rig pairs of one identity with two expressions, aligned as the render job aligns them
    (``pairs: expression``, ``align: affine68``, ``pair_frame``: the target in the source's frame by default).

    Returns (source, target), each (images (N, S, S, 3) uint8, landmarks (N, 68, 2)
    float32 in the crop, vectors (N, D) float32). For tests and benches that need a
    transfer's ground truth without running a job.
    """
    from jobs.kinds.render import RenderOptions

    return _rendered_pairs(RenderOptions(size=size, seed=seed, align="affine68", pairs="expression",
                                         pose_jitter=pose_jitter, pair_frame=pair_frame), count, ("", "target_"))


def aligned_swap_pairs(count: int, seed: int, size: int):
    """Rig pairs of two people, as a ``pairs: swap``, ``align: affine68`` render job makes them.

    Returns (source, target, truth), each (images (N, S, S, 3) uint8, landmarks (N, 68, 2)
    float32 in the crop, vectors (N, D) float32); truth is the target redrawn with the
    source's identity, in the target's frame.
    """
    from jobs.kinds.render import RenderOptions

    return _rendered_pairs(RenderOptions(size=size, seed=seed, align="affine68", pairs="swap"), count,
                           ("", "target_", "truth_"))


def _rendered_pairs(options, count: int, prefixes: tuple[str, ...]):
    import numpy as np

    from facecore.images import decode_png
    from jobs.kinds.render import RenderStage

    table = RenderStage(options)({"key": [str(i) for i in range(count)], "index": list(range(count)),
                                  "params": [None] * count, "status": ["ok"] * count, "error": [None] * count})

    def side(prefix: str):
        return (np.stack([decode_png(data.as_py()) for data in table.column(f"{prefix}image")]),
                np.array(table.column(f"{prefix}landmarks").to_pylist(), np.float32).reshape(count, 68, 2),
                np.array(table.column(f"{prefix}params").to_pylist(), np.float32))

    return tuple(side(prefix) for prefix in prefixes)
