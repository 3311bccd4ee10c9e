"""Photos aligned as the pinch job aligns them, for the pinch benchmarks.

68-point affine onto the rig's reference face at the imitator's size, largest
face only (SPEC.md §4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facecore.face import DetectorConfig, FaceDetector
from facecore.images import decode
from facecore.rig import reference_face


def pinch_aligner(size: int) -> FaceDetector:
    return FaceDetector(DetectorConfig(), reference=reference_face(size), align_method="affine68")


def align_largest_face(detector: FaceDetector, path: Path):
    """The photo's largest face, aligned: ``.image`` (S, S, 3) uint8 and ``.landmarks`` (68, 2)."""
    image = decode(path.read_bytes()).rgb
    return detector.align(image, detector(image)[0].landmarks)


def as_batch(crops: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, S, S) floats in [0, 1], what ``pinch`` takes."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
