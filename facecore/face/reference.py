"""The reference face every input is aligned to (SPEC.md: 基准脸)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facecore.face import landmarks as lm
from facecore.face.dlib_models import mean_shape_68


@dataclass(frozen=True, eq=False)
class ReferenceFace:
    """A square frame with known 68 landmarks, and optionally its image.

    Attributes:
        size: side of the aligned frame in pixels.
        landmarks: (68, 2) float64 landmark positions in that frame.
        image: optional (size, size, 3) uint8 picture of the reference face
            (the avatar rig's neutral render, when one exists).
    """

    size: int
    landmarks: np.ndarray
    image: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"reference size must be at least 16 px, got {self.size}")
        object.__setattr__(self, "landmarks", lm.check_landmarks68(self.landmarks))
        if self.image is not None and self.image.shape[:2] != (self.size, self.size):
            raise ValueError(f"reference image is {self.image.shape[:2]}, expected {self.size}x{self.size}")

    @property
    def five_points(self) -> np.ndarray:
        return lm.five_points(self.landmarks)

    @property
    def eye_centres(self) -> np.ndarray:
        return lm.eye_centres(self.landmarks)

    def resized(self, size: int) -> "ReferenceFace":
        """The same face in a frame of another size (image dropped)."""
        return ReferenceFace(size=size, landmarks=self.landmarks * (size / self.size))


def mean_face_reference(size: int = 256, face_width: float = 0.58, centre_y: float = 0.56) -> ReferenceFace:
    """Reference built from dlib's mean 68-point shape.

    The mean shape, made exactly left-right symmetric, is centred horizontally, scaled so its landmarks span
    ``face_width`` of the frame, and its landmark box centred at ``centre_y``
    (a little below the middle, leaving room for forehead and hair).

    Args:
        size: frame side in pixels.
        face_width: jaw-to-jaw landmark width as a fraction of ``size``.
        centre_y: vertical centre of the landmark box as a fraction of ``size``.
    """
    if not 0.1 <= face_width <= 1.0:
        raise ValueError(f"face_width must be in [0.1, 1.0], got {face_width}")
    shape = lm.symmetrised(mean_shape_68())
    low, high = shape.min(axis=0), shape.max(axis=0)
    scale = face_width * size / (high[0] - low[0])
    centre = (low + high) / 2.0
    points = (shape - centre) * scale + np.array([0.5 * size, centre_y * size])
    return ReferenceFace(size=size, landmarks=points)
