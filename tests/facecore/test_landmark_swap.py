"""The face-swap baseline: the classic landmark swap (warp, colour match, Poisson blend)."""

from __future__ import annotations

import numpy as np
import pytest

from facecore.methods.landmark_swap import face_mask, landmark_swap, match_colours
from facecore.rig import default_schema
from facecore.rig.pairs import swap_pairs
from facecore.rig.render import Renderer


@pytest.fixture(scope="module")
def swaps():
    schema, renderer = default_schema(), Renderer()
    sources, targets, truths = swap_pairs(schema, np.random.default_rng(11), 8, fixed={"yaw": 0.5, "pitch": 0.5,
                                                                                         "roll": 0.5})
    return [tuple(renderer.render(values, 128) for values in trio) for trio in zip(sources, targets, truths)]


def test_a_face_swapped_with_itself_is_left_as_it_was(swaps):
    _, target, _ = swaps[0]
    same = landmark_swap(target.image, target.landmarks, target.image, target.landmarks)
    assert same.shape == target.image.shape and same.dtype == np.uint8
    assert np.abs(same.astype(int) - target.image.astype(int)).mean() < 1.5


def test_the_swap_draws_the_sources_features_in_the_targets_place_and_keeps_the_rest(swaps):
    """Inside the face the result's detail (edges: brows, lids, lips, beard) is the warped source's
    rather than the target's; away from the face the picture is the target's, pixel for pixel.
    (On the rig's ground truth this baseline does badly, by design: its geometry is the
    target's, and the rig's identity is mostly geometry.)"""
    import cv2

    from facecore.methods.landmark_warp import piecewise_affine_warp

    def detail(image):
        return cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32), cv2.CV_32F)

    for source, target, _ in swaps:
        result = landmark_swap(source.image, source.landmarks, target.image, target.landmarks)
        warped = piecewise_affine_warp(source.image, source.landmarks, target.landmarks)
        inside = face_mask(target.landmarks, 128, 128, shrink=0.2) > 0
        to_source = np.abs(detail(result) - detail(warped))[inside].mean()
        to_target = np.abs(detail(result) - detail(target.image))[inside].mean()
        assert to_source < 0.7 * to_target, (to_source, to_target)
        far = np.ones_like(inside)
        far[max(0, int(target.landmarks[:, 1].min()) - 12):int(target.landmarks[:, 1].max()) + 12,
            max(0, int(target.landmarks[:, 0].min()) - 12):int(target.landmarks[:, 0].max()) + 12] = False
        assert np.array_equal(result[far], target.image[far])


def test_colours_are_matched_inside_the_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 90, (32, 32, 3), dtype=np.uint8)
    reference = rng.integers(150, 220, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    matched = match_colours(image, reference, mask)
    inside = mask > 0
    assert abs(matched[inside].mean() - reference[inside].mean()) < 5
    with pytest.raises(ValueError, match="images"):
        landmark_swap(image[..., 0], np.zeros((68, 2)), image, np.zeros((68, 2)))
