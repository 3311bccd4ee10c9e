"""Alignment as math: estimate a 2x3 matrix from point pairs, warp with it.

Matrices map *source image* coordinates to *aligned* coordinates, row-vector
convention ``[x', y'] = M @ [x, y, 1]``, the form OpenCV's ``warpAffine`` takes.
"""

from __future__ import annotations

import cv2
import numpy as np


def _check_pairs(src: np.ndarray, dst: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise ValueError(f"expected two (N, 2) point sets of one shape, got {src.shape} and {dst.shape}")
    if src.shape[0] < minimum:
        raise ValueError(f"need at least {minimum} point pairs, got {src.shape[0]}")
    return src, dst


def similarity_matrix(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares similarity (scale, rotation, shift) taking src onto dst.

    Solves ``min_{s,R,t} sum_i w_i ||s R src_i + t - dst_i||^2`` in closed form
    (Umeyama 1991, weighted), without reflection. This is SPEC.md §1's
    ``s * [[cos, -sin, tx], [sin, cos, ty]]``.

    Args:
        src: (N, 2) points in the source image, N >= 2.
        dst: (N, 2) matching points in the aligned frame.
        weights: (N,) non-negative weights; equal weights when None.

    Returns:
        (2, 3) float64 matrix.
    """
    src, dst = _check_pairs(src, dst, 2)
    if weights is None:
        weights = np.ones(len(src))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(src),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be {len(src)} non-negative numbers with a positive sum, got {weights}")
    weights = weights / weights.sum()
    src_mean = weights @ src
    dst_mean = weights @ dst
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = float(weights @ (src_c**2).sum(axis=1))
    if src_var <= 1e-12:
        raise ValueError("source points are all at one place; no transform is defined")
    covariance = (dst_c * weights[:, None]).T @ src_c
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(singular) @ sign)) / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def affine_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares full affine transform taking src onto dst (SPEC.md §4).

    Args:
        src: (N, 2) points, N >= 3, not all on a line.
        dst: (N, 2) matching points.

    Returns:
        (2, 3) float64 matrix.
    """
    src, dst = _check_pairs(src, dst, 3)
    design = np.hstack([src, np.ones((len(src), 1))])
    solution, _, rank, _ = np.linalg.lstsq(design, dst, rcond=None)
    if rank < 3:
        raise ValueError("source points are collinear; an affine transform is not defined")
    return solution.T


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix, also (2, 3)."""
    matrix = check_matrix(matrix)
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a (2, 3) matrix."""
    matrix = check_matrix(matrix)
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int],
         border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Warp an image into the aligned frame.

    Args:
        image: (H, W, C) or (H, W) array.
        matrix: (2, 3) source → aligned.
        size: output side, or (width, height).
        border: OpenCV border mode for pixels outside the source.

    Returns:
        The aligned image, same dtype and channels.
    """
    width, height = (size, size) if isinstance(size, int) else size
    return cv2.warpAffine(image, check_matrix(matrix).astype(np.float64), (int(width), int(height)),
                          flags=cv2.INTER_LINEAR, borderMode=border)


def paste_back(original: np.ndarray, aligned: np.ndarray, matrix: np.ndarray,
               feather: int = 8, region: np.ndarray | None = None) -> np.ndarray:
    """Paste an aligned-frame image back into the original with a feathered edge.

    Args:
        original: (H, W, 3) uint8 source image.
        aligned: (S, S, 3) uint8 result in the aligned frame.
        matrix: (2, 3) source → aligned, as stored by the align job.
        feather: blur radius of the blending mask, in aligned pixels.
        region: (S, S) mask of what to paste, 1 inside (aligned frame); None:
            the whole crop but a ``feather`` margin.

    Returns:
        (H, W, 3) uint8 composite.
    """
    height, width = original.shape[:2]
    inverse = invert(matrix)
    back = cv2.warpAffine(aligned, inverse, (width, height), flags=cv2.INTER_LINEAR)
    if region is not None:
        mask = np.asarray(region, np.float32)
    else:
        mask = np.zeros(aligned.shape[:2], np.float32)
        mask[feather:-feather or None, feather:-feather or None] = 1.0
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather / 2)
    mask = cv2.warpAffine(mask, inverse, (width, height), flags=cv2.INTER_LINEAR)[..., None]
    return (back * mask + original * (1.0 - mask)).round().clip(0, 255).astype(np.uint8)


def check_matrix(matrix: np.ndarray) -> np.ndarray:
    """Return ``matrix`` as float64 (2, 3), or raise naming the bad shape."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape == (6,):
        matrix = matrix.reshape(2, 3)
    if matrix.shape != (2, 3):
        raise ValueError(f"expected a (2, 3) affine matrix, got shape {matrix.shape}")
    return matrix


def dlib_chip_matrix(landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """(2, 3) source → chip matrix of dlib's face chip for these landmarks.

    The chip geometry is the one ``dlib.get_face_chip(image, shape, size, padding)``
    and dlib's face-recognition model use: dlib places the chip rectangle from the
    5 or 68 landmarks; its rotated corners map to the chip's corners.

    Args:
        landmarks: (68, 2) or (5, 2) points in dlib's order for that count.
        size: chip side in pixels.
        padding: border around the face, as a fraction of its size.
    """
    import dlib

    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape not in ((68, 2), (5, 2)):
        raise ValueError(f"expected (68, 2) or (5, 2) landmarks, got {points.shape}")
    left, top = points.min(axis=0)
    right, bottom = points.max(axis=0)
    shape = dlib.full_object_detection(
        dlib.rectangle(int(left), int(top), int(right), int(bottom)),
        [dlib.point(int(round(x)), int(round(y))) for x, y in points],
    )
    details = dlib.get_face_chip_details(shape, size, padding)
    rect, angle = details.rect, details.angle
    centre = np.array([(rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0])
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    corners = np.array([[rect.left(), rect.top()], [rect.right(), rect.top()], [rect.right(), rect.bottom()]])
    rotated = (corners - centre) @ rotation.T + centre
    targets = np.array([[0.0, 0.0], [details.cols - 1.0, 0.0], [details.cols - 1.0, details.rows - 1.0]])
    return affine_matrix(rotated, targets)
