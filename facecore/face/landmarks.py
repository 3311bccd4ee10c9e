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
