"""The expression-transfer baseline: a piecewise-affine warp from landmarks to landmarks.

No learning and no new pixels: the face is cut into triangles (a Delaunay
triangulation of the 68 target landmarks plus eight points on the frame's border,
which stay put), and each target triangle takes the pixels of its source
triangle through that pair's affine map. It moves what the source shows (lips,
brows, lids) to where the target landmarks say; it cannot show what the source
hides (teeth behind closed lips, a closed eye's lid). ``bench/transfer_quality.py``
judges the learned model against it (issue 13).
"""

from __future__ import annotations

import cv2
import numpy as np

from facecore.face.landmarks import check_landmarks68


def frame_points(width: int, height: int) -> np.ndarray:
    """(8, 2) corners and edge midpoints of a ``width`` x ``height`` frame, in pixel centres."""
    right, bottom = width - 1.0, height - 1.0
    return np.array([[0, 0], [right / 2, 0], [right, 0], [right, bottom / 2], [right, bottom],
                     [right / 2, bottom], [0, bottom], [0, bottom / 2]], np.float64)


def triangle_areas(corners: np.ndarray) -> np.ndarray:
    """Signed areas of (T, 3, 2) triangles (positive when the corners run counter-clockwise in x-right, y-up)."""
    a, b = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    return (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) / 2.0


def delaunay_triangles(points: np.ndarray) -> np.ndarray:
    """(T, 3) vertex indices of a Delaunay triangulation of (N, 2) ``points`` (duplicates share a vertex)."""
    points = np.asarray(points, np.float64)
    low, high = points.min(axis=0) - 1.0, points.max(axis=0) + 1.0
    subdivision = cv2.Subdiv2D((int(np.floor(low[0])), int(np.floor(low[1])),
                                int(np.ceil(high[0] - low[0])) + 1, int(np.ceil(high[1] - low[1])) + 1))
    for x, y in points:
        subdivision.insert((float(x), float(y)))
    corners = subdivision.getTriangleList().reshape(-1, 3, 2)
    # Subdiv2D returns coordinates; find each corner's point. Triangles touching
    # its three virtual outer vertices match no point and are dropped.
    distance = np.linalg.norm(corners[:, :, None, :] - points[None, None], axis=3)  # (T, 3, N)
    nearest = distance.argmin(axis=2)
    found = np.take_along_axis(distance, nearest[..., None], axis=2)[..., 0] < 1e-3
    triangles = nearest[found.all(axis=1)]
    return triangles[[len(set(t)) == 3 for t in triangles.tolist()]].astype(np.int64)


def _triangle_maps(source: np.ndarray, target: np.ndarray, width: int,
                   height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward maps of the piecewise-affine warp over a Delaunay triangulation of ``target`` points,
    and (H, W) bool: which output pixels a triangle covers (the rest map to themselves)."""
    triangles = delaunay_triangles(target)

    # Which target triangle covers each output pixel, then each pixel through
    # its own triangle's affine map (target -> source).
    owner = np.full((height, width), -1, np.int32)
    maps = [np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])]  # index 0: the identity, for pixels no triangle covers
    for corners in triangles:
        there, here = target[corners], source[corners]
        area = abs(triangle_areas(there[None])[0])
        if area < 1e-6:
            continue
        maps.append(cv2.getAffineTransform(there.astype(np.float32), here.astype(np.float32)))
        cv2.fillConvexPoly(owner, np.round(there * 16).astype(np.int32), len(maps) - 2, lineType=cv2.LINE_8,
                           shift=4)
    matrices = np.stack(maps)[owner + 1]  # (H, W, 2, 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    map_x = matrices[..., 0, 0] * xs + matrices[..., 0, 1] * ys + matrices[..., 0, 2]
    map_y = matrices[..., 1, 0] * xs + matrices[..., 1, 1] * ys + matrices[..., 1, 2]
    return map_x.astype(np.float32), map_y.astype(np.float32), owner >= 0


def piecewise_affine_maps(source_landmarks: np.ndarray, target_landmarks: np.ndarray, width: int,
                          height: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of the result comes from: (H, W) float32 ``map_x``, ``map_y`` in source pixels.

    The backward map of the piecewise-affine warp from ``source_landmarks`` to
    ``target_landmarks`` (both (68, 2), pixels of a ``width`` x ``height`` frame),
    as ``cv2.remap`` takes it.
    """
    border = frame_points(width, height)
    source = np.concatenate([check_landmarks68(source_landmarks).astype(np.float64), border])
    target = np.concatenate([check_landmarks68(target_landmarks).astype(np.float64), border])
    map_x, map_y, _ = _triangle_maps(source, target, width, height)
    return map_x, map_y


def face_warp_maps(source_landmarks: np.ndarray, target_landmarks: np.ndarray, width: int, height: int,
                   falloff: float) -> tuple[np.ndarray, np.ndarray]:
    """Backward maps of a warp that moves the face and leaves the rest of the picture be.

    Inside the target landmarks' hull, the piecewise-affine warp of the landmarks
    alone; outside it, each pixel moves as the nearest face pixel does, by a share
    ``exp(-distance / falloff)`` (``falloff`` in pixels). Where an expression
    changes and the pose does not, hair, neck and background stay put, which the
    frame-anchored :func:`piecewise_affine_maps` does not give: its triangles from
    the jaw to the frame's corners stretch everything between, and every stretched
    edge blurs. The expression model starts its flow from these maps.
    """
    source = check_landmarks68(source_landmarks).astype(np.float64)
    target = check_landmarks68(target_landmarks).astype(np.float64)
    map_x, map_y, inside = _triangle_maps(source, target, width, height)
    if not inside.any() or inside.all():
        return map_x, map_y
    # For every pixel outside, the nearest covered pixel (labels number the zero
    # pixels of the input in raster order) and its distance.
    distance, label = cv2.distanceTransformWithLabels((~inside).astype(np.uint8), cv2.DIST_L2,
                                                      cv2.DIST_MASK_PRECISE, labelType=cv2.DIST_LABEL_PIXEL)
    ys, xs = np.nonzero(inside)
    near_y, near_x = ys[label - 1], xs[label - 1]
    pixels_y, pixels_x = np.mgrid[0:height, 0:width].astype(np.float32)
    share = np.exp(-distance / max(falloff, 1e-6)).astype(np.float32)
    shift_x = (map_x - pixels_x)[near_y, near_x] * share
    shift_y = (map_y - pixels_y)[near_y, near_x] * share
    return (np.where(inside, map_x, pixels_x + shift_x).astype(np.float32),
            np.where(inside, map_y, pixels_y + shift_y).astype(np.float32))


def piecewise_affine_warp(image: np.ndarray, source_landmarks: np.ndarray,
                          target_landmarks: np.ndarray) -> np.ndarray:
    """``image`` with its face moved from ``source_landmarks`` to ``target_landmarks``.

    Args:
        image: (H, W) or (H, W, C) array, any dtype OpenCV remaps (uint8, float32).
        source_landmarks: (68, 2) where the face's landmarks are in ``image``, pixels.
        target_landmarks: (68, 2) where they should be in the result, same frame.

    Returns:
        An array of the shape and dtype of ``image``. Pixels outside the
        triangulated area (none, as the frame's border is part of it) keep their place.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    height, width = image.shape[:2]
    map_x, map_y = piecewise_affine_maps(source_landmarks, target_landmarks, width, height)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
