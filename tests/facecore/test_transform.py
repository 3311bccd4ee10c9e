import numpy as np
import pytest

from facecore.face import transform


def _similarity(scale, angle_deg, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, size=(5, 2))
    truth = _similarity(0.37, 23.0, 12.5, -40.0)
    dst = transform.apply(truth, src)
    assert np.allclose(transform.similarity_matrix(src, dst), truth, atol=1e-9)


def test_similarity_weights_pull_the_fit_towards_heavy_points():
    src = np.array([[0, 0], [10, 0], [5, 8]], float)
    dst = src.copy()
    dst[2] += [3, 3]  # one point disagrees with the others
    heavy_first_two = transform.similarity_matrix(src, dst, [1, 1, 0.01])
    equal = transform.similarity_matrix(src, dst)
    error_heavy = np.abs(transform.apply(heavy_first_two, src[:2]) - dst[:2]).max()
    error_equal = np.abs(transform.apply(equal, src[:2]) - dst[:2]).max()
    assert error_heavy < 0.05 < error_equal


def test_similarity_never_reflects():
    src = np.array([[0, 0], [1, 0], [0, 1]], float)
    mirrored = src * [-1, 1]
    matrix = transform.similarity_matrix(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_affine_recovers_a_known_transform():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 300, size=(68, 2))
    truth = np.array([[1.1, 0.2, 5.0], [-0.1, 0.9, 7.0]])
    assert np.allclose(transform.affine_matrix(src, transform.apply(truth, src)), truth, atol=1e-9)


def test_invert_round_trips_points():
    matrix = _similarity(2.0, -31.0, 100.0, 3.0)
    points = np.array([[1.0, 2.0], [300.0, -4.0]])
    back = transform.apply(transform.invert(matrix), transform.apply(matrix, points))
    assert np.allclose(back, points)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        transform.check_matrix(np.eye(3))
    with pytest.raises(ValueError, match="at least 3"):
        transform.affine_matrix(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="collinear"):
        line = np.stack([np.arange(5.0), np.arange(5.0)], axis=1)
        transform.affine_matrix(line, line)
    with pytest.raises(ValueError, match="one place"):
        transform.similarity_matrix(np.ones((5, 2)), np.zeros((5, 2)))


def test_warp_and_paste_back_restore_the_original_inside_the_crop():
    rng = np.random.default_rng(2)
    original = rng.integers(0, 255, size=(200, 240, 3), dtype=np.uint8)
    original = np.asarray(original, np.uint8)
    matrix = _similarity(1.0, 0.0, -40.0, -30.0)  # a plain 128x128 crop at (40, 30)
    crop = transform.warp(original, matrix, 128)
    assert np.array_equal(crop, original[30:158, 40:168])
    pasted = transform.paste_back(original, crop, matrix, feather=4)
    assert np.array_equal(pasted, original)
