"""Parsing masks from 68 landmarks, for real photos that have no hand-made labels.

Brows, eyes, nose, lips, the mouth's inside and the face inside the jaw line are
drawn as polygons of their landmarks; every other pixel (hair, background, ears,
the forehead above the brows) is left unknown, so a parser trained on these masks
learns the parts it is told about and nothing false about the rest.
"""

from __future__ import annotations

import cv2
import numpy as np

from facecore.face.landmarks import check_landmarks68
from facecore.rig.classes import CLASS_INDEX as C

UNKNOWN = 255  # also the ignore index of the parser's cross-entropy
_BITS = 4


def landmark_mask(points68: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 mask of Helen classes, 255 where the landmarks say nothing.

    Args:
        points68: (68, 2) iBUG landmarks in pixels.
        size: side, or (width, height), of the image the landmarks belong to.
    """
    points = check_landmarks68(points68)
    width, height = (size, size) if isinstance(size, int) else size
    mask = np.full((height, width), UNKNOWN, np.uint8)
    face_width = float(np.linalg.norm(points[16] - points[0]))

    def fill(polygon: np.ndarray, cls: int) -> None:
        pts = np.round(np.asarray(polygon) * (1 << _BITS)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [pts], cls, cv2.LINE_8, _BITS)

    # The face: inside the jaw line, up to just above the brows.
    lift = np.array([0.0, 0.06 * face_width])
    fill(np.concatenate([points[0:17], points[26:16:-1] - lift]), C["face"])
    half = 0.02 * face_width
    for brow, cls in ((points[17:22], C["right_brow"]), (points[22:27], C["left_brow"])):
        fill(np.concatenate([brow - [0, half], (brow + [0, half])[::-1]]), cls)
    fill(points[36:42], C["right_eye"])
    fill(points[42:48], C["left_eye"])
    bridge = np.array([0.04 * face_width, 0.0])
    fill(np.concatenate([points[[27]] - bridge, points[31:36], points[[27]] + bridge]), C["nose"])
    fill(points[60:68], C["inner_mouth"])
    fill(np.concatenate([points[48:55], points[[64, 63, 62, 61, 60]]]), C["upper_lip"])
    fill(np.concatenate([points[54:60], points[[48, 60, 67, 66, 65, 64]]]), C["lower_lip"])
    return mask
