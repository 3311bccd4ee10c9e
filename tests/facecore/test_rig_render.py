"""The avatar renderer: determinism, what each parameter does, masks vs landmarks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facecore.face import FaceDetector, mean_face_reference
from facecore.face.landmarks import MIRROR, eye_centres
from facecore.rig import HELEN_CLASSES, REGIONS, Renderer, default_schema, reference_face
from facecore.rig.classes import CLASS_INDEX

SIZE = 128
LANDMARK_REGIONS = {"face": REGIONS["face"], "brows": REGIONS["brows"], "nose": REGIONS["nose"],
                    "eyes": REGIONS["eyes"], "mouth": REGIONS["mouth"]}
REGION_CLASSES = {
    "brows": {"left_brow", "right_brow"}, "eyes": {"left_eye", "right_eye"}, "nose": {"nose"},
    "ears": {"face", "background"}, "hair": {"hair", "face", "background"},
}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


@pytest.fixture(scope="module")
def neutral(renderer):
    return renderer.render({}, SIZE)


def test_same_parameters_same_pixels(renderer):
    values = default_schema().sample(np.random.default_rng(3), 1)[0]
    first = renderer.render(values, SIZE)
    second = Renderer().render(dict(values), SIZE)
    assert np.array_equal(first.image, second.image) and np.array_equal(first.mask, second.mask)
    assert np.array_equal(first.landmarks, second.landmarks)
    vector = default_schema().encode(values)
    assert np.array_equal(Renderer().render(vector, SIZE).image, first.image)


def test_outputs_have_the_promised_form(renderer):
    for size in (64, 256, 512):
        render = renderer.render({}, size)
        assert render.image.shape == (size, size, 3) and render.image.dtype == np.uint8
        assert render.mask.shape == (size, size) and render.mask.max() < len(HELEN_CLASSES)
        assert render.landmarks.shape == (68, 2)
    with pytest.raises(ValueError, match="size must be"):
        renderer.render({}, 8)


def test_reference_face_sits_on_the_alignment_reference(neutral):
    assert np.allclose(neutral.landmarks, mean_face_reference(SIZE).landmarks, atol=1e-3)
    reference = reference_face(SIZE)
    assert np.array_equal(reference.image, neutral.image)
    assert np.allclose(reference.landmarks, mean_face_reference(SIZE).landmarks, atol=1e-3)


def test_reference_face_is_symmetric(neutral):
    flipped_points = neutral.landmarks[MIRROR].copy()
    flipped_points[:, 0] = SIZE - flipped_points[:, 0]
    assert np.abs(flipped_points - neutral.landmarks).max() < 0.05
    swap = np.arange(len(HELEN_CLASSES))
    for left, right in (("left_brow", "right_brow"), ("left_eye", "right_eye")):
        swap[CLASS_INDEX[left]], swap[CLASS_INDEX[right]] = CLASS_INDEX[right], CLASS_INDEX[left]
    # OpenCV puts pixel centres on integer coordinates, so the mirror about
    # x = SIZE / 2 takes column x to column SIZE - x: flip, then shift by one.
    flipped_mask = swap[np.roll(neutral.mask[:, ::-1], 1, axis=1)]
    assert (flipped_mask == neutral.mask)[:, 1:].mean() > 0.99
    flipped_image = np.roll(neutral.image[:, ::-1], 1, axis=1).astype(int)
    assert np.abs(flipped_image - neutral.image)[:, 1:].mean() < 0.5


def _changed(render, other) -> int:
    return int((np.abs(render.image.astype(int) - other.image).max(axis=2) > 12).sum())


@pytest.mark.parametrize("param", default_schema().continuous, ids=lambda p: p.name)
def test_every_parameter_changes_its_own_region(renderer, neutral, param):
    """Table test: each parameter visibly changes the image, and moves its own region most."""
    extremes = [1.0] if param.neutral == 0.0 else [0.0, 1.0]
    for value in extremes:
        moved = renderer.render({param.name: value}, SIZE)
        assert _changed(moved, neutral) >= 10, f"{param.name}={value} barely changes the image"
        shift = np.linalg.norm(moved.landmarks - neutral.landmarks, axis=1)
        changed_mask = moved.mask != neutral.mask
        changed_classes = {HELEN_CLASSES[c] for c in np.unique(np.concatenate(
            [moved.mask[changed_mask], neutral.mask[changed_mask]]))}
        region = "face" if param.region == "jaw" else param.region
        if region == "colour":
            assert shift.max() < 1e-4 and not changed_mask.any()
        elif region == "all":
            assert shift.mean() > 1.0
        elif shift.max() > 1e-4:
            own = shift[LANDMARK_REGIONS[region]].mean()
            others = {name: shift[idx].mean() for name, idx in LANDMARK_REGIONS.items() if name != region}
            assert own > max(others.values()), f"{param.name}={value}: own {own:.2f}, others {others}"
        elif changed_mask.any():
            assert changed_classes <= REGION_CLASSES[region] | {"face"}, (param.name, changed_classes)
            assert changed_classes & REGION_CLASSES[region]
        else:  # pixels only, e.g. the iris: inside the own region's mask
            classes = {CLASS_INDEX[c] for c in REGION_CLASSES[region]}
            changed = np.abs(moved.image.astype(int) - neutral.image).max(axis=2) > 12
            assert np.isin(neutral.mask[changed], list(classes)).mean() > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_agree_with_landmarks(renderer, seed):
    values = default_schema().sample(np.random.default_rng(seed), 1, fixed={"beard": "none"})[0]
    values.update(eye_close_left=0.0, eye_close_right=0.0, mouth_open=0.3)
    render = renderer.render(values, 256)
    mask, points = render.mask, render.landmarks

    def class_at(point) -> str:
        x, y = np.clip(np.round(point).astype(int), 0, 255)
        return HELEN_CLASSES[mask[y, x]]

    assert class_at(points[36:42].mean(axis=0)) == "right_eye"
    assert class_at(points[42:48].mean(axis=0)) == "left_eye"
    # Brow landmarks run along the brow band (the band may hide under a fringe).
    assert sum(class_at(p) in ("right_brow", "hair") for p in points[17:22]) >= 4
    assert sum(class_at(p) in ("left_brow", "hair") for p in points[22:27]) >= 4
    assert class_at((points[30] + points[33]) / 2) == "nose"
    assert class_at((points[50] + points[61]) / 2) == "upper_lip"
    assert class_at((points[57] + points[66]) / 2) == "lower_lip"
    # The jaw line is the edge of the face: face inside, not face just outside.
    centre = points[27:36].mean(axis=0)
    for index in range(3, 14):
        inward = points[index] + (centre - points[index]) / np.linalg.norm(centre - points[index]) * 3.0
        outward = points[index] - (centre - points[index]) / np.linalg.norm(centre - points[index]) * 3.0
        assert class_at(inward) in ("face", "hair"), index
        assert class_at(outward) not in ("face",) or index in (3, 13), index


def test_dlib_finds_frontal_renders_and_agrees_with_their_landmarks(renderer):
    """The photo aligner works on avatars: ≥ 90% found, landmarks within 10% of the eye distance."""
    detector = FaceDetector()
    schema = default_schema()
    rng = np.random.default_rng(2026)
    samples = schema.sample(rng, 100)
    found, errors = 0, []
    for values in samples:
        values.update(yaw=rng.uniform(0.4, 0.6), pitch=rng.uniform(0.4, 0.6), roll=rng.uniform(0.4, 0.6))
        render = renderer.render(values, 256)
        faces = detector(render.image)
        if not faces:
            continue
        found += 1
        eye_distance = np.linalg.norm(np.diff(eye_centres(render.landmarks), axis=0))
        errors.append(np.linalg.norm(faces[0].landmarks - render.landmarks, axis=1).mean() / eye_distance)
    rate, error = found / len(samples), float(np.mean(errors))
    print(f"dlib on renders: found {rate:.1%}, mean landmark error {error:.3f} x eye distance")
    assert rate >= 0.9
    assert error <= 0.10


def test_contact_sheet_tiles(renderer):
    from facecore.images import tile

    cells = [renderer.render({}, 32).image for _ in range(5)]
    sheet = tile(cells, columns=4, pad=2)
    assert sheet.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    assert np.array_equal(sheet[2:34, 2:34], cells[0])
    assert cv2.countNonZero(255 - sheet[36:68, 36:68].max(axis=2)) == 0  # the empty cell stays blank


def test_landmark_masks_agree_with_rig_masks(renderer):
    """Masks drawn from landmarks alone (for real photos) label what the rig labels."""
    from facecore.face.parsing_mask import UNKNOWN, landmark_mask

    agreements = []
    for values in default_schema().sample(np.random.default_rng(8), 10, fixed={"beard": "none"}):
        values.update(yaw=0.5, pitch=0.5, roll=0.5)
        render = renderer.render(values, 128)
        mask = landmark_mask(render.landmarks, 128)
        known = mask != UNKNOWN
        assert known.mean() > 0.2
        agreements.append((mask[known] == render.mask[known]).mean())
    assert np.mean(agreements) > 0.85, agreements
