"""The face-swap baseline: the classic landmark swap, no learning (issue 14).

The source face is warped onto the target's landmarks (piecewise-affine over a
Delaunay triangulation, ``facecore.methods.landmark_warp``), its colours are
matched to the target's skin (mean and spread per channel in Lab, inside the
face), and it is blended into the target with Poisson editing
(``cv2.seamlessClone``) over the hull of the target's face, shrunk a little so
the seam lands on the target's own skin. Everything outside that hull (hair,
ears, background) stays the target's; inside it, the source's features in the
target's place and pose, but only as far as a warp of the source can show them
(a closed mouth stays closed).
"""

from __future__ import annotations

import cv2
import numpy as np

from facecore.face.landmarks import check_landmarks68
from facecore.methods.landmark_warp import piecewise_affine_maps

# The face's outline for the blend: jaw (0-16), then the brows from right to left,
# so the hull covers the forehead only as far as the brows do.
_OUTLINE = list(range(17)) + list(range(26, 16, -1))


def face_mask(landmarks: np.ndarray, height: int, width: int, shrink: float = 0.05) -> np.ndarray:
    """(H, W) uint8 0/255: the hull of the face's outline, pulled towards its centre by ``shrink``
    of its size so that a blend's seam falls inside the face."""
    points = check_landmarks68(landmarks).astype(np.float64)[_OUTLINE]
    centre = points.mean(axis=0)
    points = centre + (points - centre) * (1.0 - shrink)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(points.round().astype(np.int32)), 255)
    return mask


def match_colours(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with each Lab channel's mean and spread inside ``mask`` made the ``reference``'s there."""
    inside = mask > 0
    if inside.sum() < 2:
        return image
    lab, ref = (cv2.cvtColor(x, cv2.COLOR_RGB2LAB).astype(np.float32) for x in (image, reference))
    for channel in range(3):
        values, target = lab[..., channel][inside], ref[..., channel][inside]
        scale = target.std() / max(float(values.std()), 1e-3)
        lab[..., channel] = (lab[..., channel] - values.mean()) * min(scale, 3.0) + target.mean()
    return cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def landmark_swap(source: np.ndarray, source_landmarks: np.ndarray, target: np.ndarray,
                  target_landmarks: np.ndarray) -> np.ndarray:
    """The source's face on the target: (H, W, 3) uint8 RGB, the target's size.

    Args:
        source: (h, w, 3) uint8 RGB, the face that gives its identity.
        source_landmarks: its 68 landmarks in pixels.
        target: (H, W, 3) uint8 RGB, the picture the face goes into (pose, expression, lighting).
        target_landmarks: its 68 landmarks in pixels.
    """
    if source.ndim != 3 or target.ndim != 3 or source.shape[2] != 3 or target.shape[2] != 3:
        raise ValueError(f"expected two (H, W, 3) images, got {source.shape} and {target.shape}")
    height, width = target.shape[:2]
    map_x, map_y = piecewise_affine_maps(check_landmarks68(source_landmarks), check_landmarks68(target_landmarks),
                                         width, height)
    warped = cv2.remap(np.ascontiguousarray(source), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = face_mask(target_landmarks, height, width)
    if np.count_nonzero(mask) < 9:  # no face to speak of: nothing to swap
        return target.copy()
    warped = match_colours(warped, target, mask)
    # seamlessClone wants the mask's box inside the picture with a margin: pad (the
    # mask with zeros), clone, crop.
    pad = 4
    padded = [cv2.copyMakeBorder(np.ascontiguousarray(x), pad, pad, pad, pad, cv2.BORDER_REFLECT)
              for x in (warped, target)]
    padded_mask = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    ys, xs = np.nonzero(padded_mask)
    left, right, top, bottom = xs.min(), xs.max(), ys.min(), ys.max()
    centre = ((left + right + 1) // 2, (top + bottom + 1) // 2)
    cloned = cv2.seamlessClone(padded[0], padded[1], padded_mask, centre, cv2.NORMAL_CLONE)
    return cloned[pad:pad + height, pad:pad + width]
