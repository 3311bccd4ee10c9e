"""The 11 face-parsing classes of the Helen dataset (SPEC.md §4), as mask values.

"Left" and "right" are the subject's, as in iBUG's landmark names: the subject's
right eye (landmarks 36-41) is on the image's left.
"""

from __future__ import annotations

import numpy as np

HELEN_CLASSES: tuple[str, ...] = (
    "background",
    "face",
    "hair",
    "left_brow",
    "right_brow",
    "left_eye",
    "right_eye",
    "nose",
    "upper_lip",
    "inner_mouth",  # teeth and the mouth's inside
    "lower_lip",
)
CLASS_INDEX = {name: i for i, name in enumerate(HELEN_CLASSES)}

# A palette for looking at masks (contact sheets, reports).
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 180, 150],
        [110, 70, 40],
        [40, 160, 40],
        [40, 220, 120],
        [40, 90, 220],
        [40, 180, 250],
        [230, 120, 30],
        [220, 40, 60],
        [250, 250, 250],
        [150, 20, 90],
    ],
    dtype=np.uint8,
)


def colourise(mask: np.ndarray) -> np.ndarray:
    """(H, W) class mask → (H, W, 3) uint8 picture."""
    return PALETTE[np.clip(mask, 0, len(PALETTE) - 1)]
