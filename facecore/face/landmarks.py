"""The iBUG 68-point landmark layout and the 5 points derived from it."""

from __future__ import annotations

import numpy as np

# Index ranges of the iBUG 300-W 68-point scheme (dlib's order). "Right" and
# "left" are the subject's: the subject's right eye is on the image's left.
JAW = range(0, 17)
RIGHT_BROW = range(17, 22)
LEFT_BROW = range(22, 27)
NOSE_BRIDGE = range(27, 31)
NOSE_BASE = range(31, 36)
RIGHT_EYE = range(36, 42)
LEFT_EYE = range(42, 48)
OUTER_LIPS = range(48, 60)
INNER_LIPS = range(60, 68)
NOSE_TIP = 30
MOUTH_RIGHT_CORNER = 48
MOUTH_LEFT_CORNER = 54

# Groups used for multi-channel heatmaps, in channel order.
GROUPS: dict[str, range] = {
    "jaw": JAW,
    "right_brow": RIGHT_BROW,
    "left_brow": LEFT_BROW,
    "nose": range(27, 36),
    "right_eye": RIGHT_EYE,
    "left_eye": LEFT_EYE,
    "mouth": range(48, 68),
}

FIVE_POINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left")

# Weights of the 5 points in the similarity fit. Eye centres anchor the
# alignment: they barely move with expression, while mouth corners travel with a
# smile, so equal weights would shift and scale the crop with the expression
# (bad for expression transfer) and leave the eyes 3-7 px off the reference at
# 256 px on real photos. With these weights the eyes land within 2 px.
FIVE_POINT_WEIGHTS = (1.0, 1.0, 0.1, 0.05, 0.05)


# Index of each landmark's mirror image (left <-> right) in the iBUG scheme.
MIRROR = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 21, -1)) + list(range(21, 16, -1))  # brows
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]  # nose
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)


def mirrored(points68: np.ndarray, axis_x: float = 0.0) -> np.ndarray:
    """The landmarks of the mirror-image face (flipped about x = axis_x, relabelled)."""
    points68 = check_landmarks68(points68)
    flipped = points68[MIRROR].copy()
    flipped[:, 0] = 2.0 * axis_x - flipped[:, 0]
    return flipped


def symmetrised(points68: np.ndarray) -> np.ndarray:
    """The nearest left-right symmetric shape: the mean of a shape and its mirror image."""
    points68 = check_landmarks68(points68)
    axis_x = float(points68[:, 0].min() + points68[:, 0].max()) / 2.0
    return (points68 + mirrored(points68, axis_x)) / 2.0


def check_landmarks68(points: np.ndarray) -> np.ndarray:
    """Return ``points`` as float64 (68, 2), or raise naming the bad shape."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks of shape (68, 2), got {points.shape}")
    return points


def eye_centres(points68: np.ndarray) -> np.ndarray:
    """(2, 2): the subject's right then left eye centre (mean of the 6 eye points)."""
    points68 = check_landmarks68(points68)
    return np.stack([points68[RIGHT_EYE].mean(axis=0), points68[LEFT_EYE].mean(axis=0)])


def five_points(points68: np.ndarray) -> np.ndarray:
    """(5, 2): eye centres, nose tip and mouth corners (SPEC.md §1), from 68 points."""
    points68 = check_landmarks68(points68)
    return np.concatenate(
        [
            eye_centres(points68),
            points68[[NOSE_TIP, MOUTH_RIGHT_CORNER, MOUTH_LEFT_CORNER]],
        ]
    )
