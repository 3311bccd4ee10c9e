"""Where dlib's pretrained model files are, and what the landmark model knows.

The files come from the ``face-recognition-models`` package. That package's
``__init__`` imports ``pkg_resources``, which is missing from modern environments,
so the files are located through the import system without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np

SHAPE_68 = "shape_predictor_68_face_landmarks.dat"
SHAPE_5 = "shape_predictor_5_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"
RESNET_RECOGNITION = "dlib_face_recognition_resnet_model_v1.dat"

ENV_MODEL_DIR = "FACEJOBS_DLIB_MODELS"


class ModelFileError(FileNotFoundError):
    """A pretrained model file is not installed."""


@functools.cache
def model_dir() -> Path:
    """The folder holding dlib's ``.dat`` files.

    ``$FACEJOBS_DLIB_MODELS`` wins when set (clusters that bake models into an
    image elsewhere); otherwise the installed ``face_recognition_models`` package.
    """
    override = os.environ.get(ENV_MODEL_DIR)
    if override:
        return Path(override)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "package face-recognition-models is not installed; "
            f"install it or set ${ENV_MODEL_DIR} to a folder with the dlib .dat files"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_path(name: str) -> Path:
    """Full path of one dlib model file, checked to exist."""
    path = model_dir() / name
    if not path.is_file():
        raise ModelFileError(f"dlib model file {name} not found in {path.parent}")
    return path


def _read_dlib_int(data: bytes, pos: int) -> tuple[int, int]:
    # dlib serialises an integer as a control byte (low nibble: byte count,
    # bit 0x80: negative) followed by that many little-endian magnitude bytes.
    control = data[pos]
    size = control & 0x0F
    value = int.from_bytes(data[pos + 1 : pos + 1 + size], "little")
    return (-value if control & 0x80 else value), pos + 1 + size


def _read_dlib_float(data: bytes, pos: int) -> tuple[float, int]:
    # A float is an int64 mantissa and an int16 exponent: mantissa * 2**exponent.
    mantissa, pos = _read_dlib_int(data, pos)
    exponent, pos = _read_dlib_int(data, pos)
    return float(mantissa) * 2.0**exponent, pos


@functools.cache
def mean_shape_68() -> np.ndarray:
    """The 68-point mean shape of dlib's landmark model, (68, 2) float64.

    It is the model's ``initial_shape``: the mean of the iBUG 300-W training
    shapes, in coordinates normalised to the detection box (x, y in roughly
    [0, 1]). Read from the head of the ``.dat`` file: version, then the
    (136 x 1) matrix with negated dimensions, then 136 floats.
    """
    with open(model_path(SHAPE_68), "rb") as handle:
        head = handle.read(4096)
    version, pos = _read_dlib_int(head, 0)
    rows, pos = _read_dlib_int(head, pos)
    cols, pos = _read_dlib_int(head, pos)
    if version != 1 or abs(rows) != 136 or abs(cols) != 1:
        raise ModelFileError(
            f"unexpected header in {SHAPE_68}: version={version} shape=({rows}, {cols})"
        )
    values = []
    for _ in range(136):
        value, pos = _read_dlib_float(head, pos)
        values.append(value)
    return np.asarray(values, dtype=np.float64).reshape(68, 2)
