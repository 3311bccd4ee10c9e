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


def test_face_warp_moves_the_face_like_the_baseline_and_fades_to_still_around_it(face):
    from facecore.methods.landmark_warp import face_warp_maps, piecewise_affine_maps

    _, points = face
    pixels_y, pixels_x = np.mgrid[0:128, 0:128].astype(np.float32)
    still = face_warp_maps(points, points, 128, 128, 5.0)
    assert np.abs(still[0] - pixels_x).max() < 1e-3 and np.abs(still[1] - pixels_y).max() < 1e-3
    opened = points.copy()
    opened[5:12, 1] += 6.0  # the jaw drops
    opened[55:60, 1] += 6.0
    face_x, face_y = face_warp_maps(points, opened, 128, 128, 2.0)
    base_x, base_y = piecewise_affine_maps(points, opened, 128, 128)
    # On the face (the nose, between the eyes) both move alike...
    for x, y in np.round(opened[[27, 30, 33, 51]]).astype(int):
        assert abs(face_y[y, x] - base_y[y, x]) < 0.5 and abs(face_x[y, x] - base_x[y, x]) < 0.5
    # ...just below the chin the face warp still follows the jaw; 12 px below,
    # where the baseline's triangles to the frame still stretch the neck, it is still.
    chin_x, chin_y = np.round(opened[8]).astype(int)
    assert face_y[chin_y + 1, chin_x] - (chin_y + 1) < -3.0
    assert abs(face_y[chin_y + 12, chin_x] - (chin_y + 12)) < 0.1 < abs(base_y[chin_y + 12, chin_x] - (chin_y + 12))
    assert abs(face_y[2, 2] - 2) < 1e-3 and abs(face_x[125, 125] - 125) < 1e-3
