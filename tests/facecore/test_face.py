"""Detection, landmarks and alignment on real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facecore.face import (
    Box,
    DetectedFace,
    DetectorConfig,
    FaceDetector,
    FacePolicy,
    heatmap_channels,
    landmark_heatmap,
    mean_face_reference,
)
from facecore.face import transform
from facecore.face.dlib_models import mean_shape_68
from facecore.face.landmarks import eye_centres
from facecore.images import decode


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _load(path) -> np.ndarray:
    return decode(path.read_bytes()).rgb


def test_mean_shape_is_read_from_the_dlib_model():
    shape = mean_shape_68()
    assert shape.shape == (68, 2)
    # Normalised to the detection box: jaw spans about the box width, eyes above mouth.
    assert 0.9 < shape[:, 0].max() - shape[:, 0].min() < 1.0
    assert eye_centres(shape)[:, 1].mean() < shape[48:68, 1].mean()
    assert shape[36:42, 0].mean() < shape[42:48, 0].mean()  # subject's right eye on image left


def test_reference_face_is_centred_and_sized():
    reference = mean_face_reference(256)
    points = reference.landmarks
    assert abs((points[:, 0].min() + points[:, 0].max()) / 2 - 128) < 1e-6
    assert abs(points[:, 0].max() - points[:, 0].min() - 0.58 * 256) < 1e-6
    assert np.allclose(reference.resized(128).landmarks, points / 2)


@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png"])
def test_one_face_found_with_landmarks_inside_the_box(detector, photos, name):
    rgb = _load(photos[name])
    faces = detector(rgb)
    assert len(faces) == 1, [f.box for f in faces]
    face = faces[0]
    assert face.score > 0.3
    assert face.box.width > 60
    margin = 0.3 * face.box.width  # HOG boxes are tight: the chin often hangs below
    inside = ((face.landmarks[:, 0] > face.box.left - margin) & (face.landmarks[:, 0] < face.box.right + margin)
              & (face.landmarks[:, 1] > face.box.top - margin) & (face.landmarks[:, 1] < face.box.bottom + margin))
    assert inside.all()
    # Brows, eyes and nose are strictly inside the box (an open mouth may not be).
    inner = face.landmarks[17:48]
    assert (inner[:, 0] > face.box.left).all() and (inner[:, 0] < face.box.right).all()
    assert (inner[:, 1] > face.box.top).all() and (inner[:, 1] < face.box.bottom).all()


@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png"])
def test_aligned_eyes_land_on_the_reference_eyes(detector, photos, name):
    """Eye centres re-detected in the aligned crop are within 2 px of the reference's."""
    rgb = _load(photos[name])
    face = detector(rgb)[0]
    aligned = detector.align(rgb, face.landmarks)
    assert aligned.image.shape == (256, 256, 3)
    reference_eyes = detector.reference.eye_centres
    mapped_error = np.linalg.norm(eye_centres(aligned.landmarks) - reference_eyes, axis=1).max()
    assert mapped_error < 2.0
    redetected = detector(aligned.image)
    assert redetected, "the aligned crop must still contain a detectable face"
    redetected_error = np.linalg.norm(eye_centres(redetected[0].landmarks) - reference_eyes, axis=1).max()
    assert redetected_error < 2.0, f"{name}: eyes {redetected_error:.2f} px from the reference"


def test_moved_copy_aligns_to_nearly_the_same_crop(detector, photos):
    """Rotate 25°, scale 0.6 and shift a photo: its aligned crop matches the original's."""
    rgb = _load(photos["obama.jpg"])
    height, width = rgb.shape[:2]
    moved_matrix = cv2.getRotationMatrix2D((width / 2, height / 2), 25.0, 0.6)
    moved_matrix[:, 2] += (140.0, -60.0)
    moved = cv2.warpAffine(rgb, moved_matrix, (width + 200, height), borderMode=cv2.BORDER_REFLECT)
    first = detector.align(rgb, detector(rgb)[0].landmarks)
    second = detector.align(moved, detector(moved)[0].landmarks)
    landmark_gap = np.linalg.norm(first.landmarks - second.landmarks, axis=1).mean()
    centre = slice(48, 208)
    pixel_gap = np.abs(first.image[centre, centre].astype(float) - second.image[centre, centre]).mean()
    eye_gap = np.linalg.norm(eye_centres(first.landmarks) - eye_centres(second.landmarks), axis=1).max()
    print(f"moved copy: eye gap {eye_gap:.2f} px, mean landmark gap {landmark_gap:.2f} px, "
          f"mean pixel gap {pixel_gap:.2f}/255")
    assert eye_gap < 2.0
    assert landmark_gap < 3.5
    assert pixel_gap < 12.0
    # The matrices compose: aligning the moved copy = undoing the move, then aligning.
    composed = first.matrix[:, :2] @ transform.invert(moved_matrix)[:, :2]
    assert np.allclose(second.matrix[:, :2], composed, atol=0.02)


def test_affine68_alignment_fits_all_landmarks(photos):
    rgb = _load(photos["biden.jpg"])
    similarity = FaceDetector(align_method="similarity5")
    affine = FaceDetector(align_method="affine68")
    face = similarity(rgb)[0]
    reference = similarity.reference.landmarks
    error_similarity = np.linalg.norm(similarity.align(rgb, face.landmarks).landmarks - reference, axis=1).mean()
    error_affine = np.linalg.norm(affine.align(rgb, face.landmarks).landmarks - reference, axis=1).mean()
    assert error_affine < error_similarity  # least squares over all 68 points


class _RecordingHog:
    """Stands in for dlib's HOG detector: records the image shape it is run on, then runs it."""

    def __init__(self, hog) -> None:
        self.hog = hog
        self.shapes: list[tuple[int, ...]] = []

    def run(self, image, upsample, threshold):
        self.shapes.append(image.shape)
        return self.hog.run(image, upsample, threshold)


def test_detection_runs_on_a_downscaled_copy_and_boxes_map_back(photos, monkeypatch):
    rgb = _load(photos["obama3.jpg"])
    assert rgb.shape == (2333, 1434, 3)
    fast = FaceDetector(DetectorConfig(detect_max_side=640))
    full = FaceDetector(DetectorConfig(detect_max_side=0))
    fast_hog, full_hog = _RecordingHog(fast._hog), _RecordingHog(full._hog)
    monkeypatch.setattr(fast, "_hog", fast_hog)
    monkeypatch.setattr(full, "_hog", full_hog)
    fast_box = fast.detect(rgb)[0][0]
    full_box = full.detect(rgb)[0][0]
    # The longer side goes to 640 and the aspect ratio is kept: 1434 * 640 / 2333 = 393.4.
    assert fast_hog.shapes == [(640, 393, 3)]
    assert full_hog.shapes == [(2333, 1434, 3)]
    # Boxes come back in full-image coordinates: dlib's whole-pixel box on the
    # copy, scaled by 2333 / 640.
    in_copy = np.array(fast_box.as_list()) * 640 / 2333
    assert np.allclose(in_copy, np.round(in_copy), atol=1e-6) and in_copy[0] > 0
    assert fast_box.left > 393  # to the right of everything the copy holds
    assert abs(fast_box.width - full_box.width) < 0.15 * full_box.width
    assert abs(fast_box.left - full_box.left) < 0.1 * full_box.width
    assert abs(fast_box.top - full_box.top) < 0.1 * full_box.width


def test_face_policy():
    faces = [DetectedFace(Box(0, 0, s, s), 1.0, np.zeros((68, 2))) for s in (300, 200, 100)]
    assert FacePolicy.parse("largest").select(faces) == faces[:1]
    assert FacePolicy.parse("all").select(faces) == faces
    assert FacePolicy.parse("index:2").select(faces) == faces[2:]
    assert FacePolicy.parse("index:3").select(faces) == []
    assert str(FacePolicy.parse(" index:1 ")) == "index:1"
    with pytest.raises(ValueError, match="'largest', 'all' or 'index:N'"):
        FacePolicy.parse("biggest")


def test_heatmap_peaks_at_landmarks():
    points = mean_face_reference(64).landmarks
    single = landmark_heatmap(points, 64, sigma=1.5, mode="single")
    groups = landmark_heatmap(points, 64, sigma=1.5, mode="groups")
    assert single.shape == (1, 64, 64) and groups.shape == (heatmap_channels("groups"), 64, 64)
    x, y = np.round(points[30]).astype(int)  # nose tip
    assert single[0, y, x] > 0.8
    assert groups[3, y, x] > 0.8  # the nose channel
    assert groups[0, y, x] < 0.05  # the jaw channel is dark there
    assert single[0, 0, 0] < 1e-3
    assert np.allclose(groups.max(axis=0), single[0], atol=1e-6)
    with pytest.raises(ValueError, match="68 landmarks"):
        landmark_heatmap(points[:5], 64)
