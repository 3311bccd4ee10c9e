"""Landmark heatmaps: landmarks drawn as Gaussian blobs, the image form of "L_s, L_t"."""

from __future__ import annotations

from typing import Literal

import numpy as np

from facecore.face import landmarks as lm

HeatmapMode = Literal["single", "groups", "points"]


def heatmap_channels(mode: HeatmapMode) -> int:
    """Number of channels :func:`landmark_heatmap` returns for a mode."""
    return {"single": 1, "groups": len(lm.GROUPS), "points": 68}[mode]


def landmark_heatmap(points: np.ndarray, size: int, sigma: float = 2.0,
                     mode: HeatmapMode = "groups") -> np.ndarray:
    """Render landmarks as Gaussian blobs.

    Args:
        points: (68, 2) landmarks in the frame's pixel coordinates.
        size: frame side in pixels.
        sigma: blob standard deviation in pixels.
        mode: "single" (all points in one channel), "groups" (one channel per
            facial part of ``landmarks.GROUPS``) or "points" (one per landmark).

    Returns:
        (C, size, size) float32 in [0, 1]; a channel is the maximum of its blobs.
    """
    points = lm.check_landmarks68(points)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    axis = np.arange(size, dtype=np.float32)
    # Separable Gaussians: each point's blob is an outer product of two 1-D profiles.
    gx = np.exp(-((axis[None, :] - points[:, 0:1].astype(np.float32)) ** 2) / (2 * sigma**2))
    gy = np.exp(-((axis[None, :] - points[:, 1:2].astype(np.float32)) ** 2) / (2 * sigma**2))
    blobs = gy[:, :, None] * gx[:, None, :]  # (68, size, size)
    if mode == "points":
        return blobs.astype(np.float32)
    if mode == "single":
        return blobs.max(axis=0, keepdims=True).astype(np.float32)
    if mode == "groups":
        return np.stack([blobs[list(group)].max(axis=0) for group in lm.GROUPS.values()]).astype(np.float32)
    raise ValueError(f"mode must be 'single', 'groups' or 'points', got {mode!r}")
