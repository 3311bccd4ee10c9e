"""The expression-transfer baseline: piecewise-affine warps between landmark sets."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facecore.methods.landmark_warp import delaunay_triangles, frame_points, piecewise_affine_warp, triangle_areas
from facecore.rig import Renderer, default_schema, reference_face


@pytest.fixture(scope="module")
def face():
    render = Renderer().render(default_schema().reference_vector().astype(np.float32), 128)
    return render.image, reference_face(128).landmarks.astype(np.float64)


def test_same_landmarks_leave_the_image_unchanged(face):
    image, points = face
    assert np.array_equal(piecewise_affine_warp(image, points, points), image)


def test_triangulation_covers_the_frame_with_every_point():
    points = np.concatenate([reference_face(128).landmarks, frame_points(128, 128)])
    triangles = delaunay_triangles(points)
    assert set(np.unique(triangles)) == set(range(len(points)))
    area = np.abs(triangle_areas(points[triangles])).sum()
    assert area == pytest.approx(127.0 * 127.0, rel=1e-6)  # the frame, tiled without overlap


def test_moved_mouth_carries_its_pixels_and_leaves_the_eyes(face):
    image, points = face
    marked = image.copy()
    centre = points[[62, 66]].mean(axis=0)
    cv2.circle(marked, tuple(int(round(v)) for v in centre), 2, (255, 0, 255), -1)
    target = points.copy()
    target[48:68] += [0.0, 5.0]  # the mouth 5 px lower
    moved = piecewise_affine_warp(marked, points, target)
    x, y = (int(round(v)) for v in centre + [0.0, 5.0])
    assert moved[y, x].tolist() == [255, 0, 255]
    top = int(points[17:27, 1].min()) - 2
    bottom = int(points[36:48, 1].max()) + 2
    assert np.array_equal(moved[top:bottom], marked[top:bottom])  # brows and eyes stay
    assert moved.shape == image.shape and moved.dtype == image.dtype


def test_float_and_grey_images_and_bad_shapes(face):
    image, points = face
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    target = points + [1.5, -0.5]
    out = piecewise_affine_warp(grey, points, target)
    assert out.shape == grey.shape and out.dtype == np.float32
    with pytest.raises(ValueError, match="68"):
        piecewise_affine_warp(image, points[:5], target)
    with pytest.raises(ValueError, match="image"):
        piecewise_affine_warp(np.zeros(5), points, target)
