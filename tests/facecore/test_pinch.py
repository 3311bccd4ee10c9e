"""The batched pinch optimiser, on small untrained models (its mechanics, not its quality)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from facecore.methods.pinch import PinchConfig, feature_loss, pinch
from facecore.models.imitator import Imitator, ImitatorConfig
from facecore.models.parsing import FaceParser, ParsingConfig
from facecore.rig import Renderer, default_schema


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    schema = default_schema()
    imitator = Imitator(ImitatorConfig(param_dim=schema.vector_size, image_size=32, base_channels=8)).eval()
    parser = FaceParser(ParsingConfig(base_channels=8, stages=3)).eval()
    return schema, imitator, parser


@pytest.fixture(scope="module")
def targets():
    schema, renderer = default_schema(), Renderer()
    samples = schema.sample(np.random.default_rng(4), 4, fixed={"yaw": 0.5, "pitch": 0.5, "roll": 0.5})
    images = np.stack([renderer.render(v, 32).image for v in samples])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def test_every_image_improves_and_stays_in_range(models, targets):
    schema, imitator, parser = models
    result = pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=30))
    assert (result.loss_end < result.loss_start).all(), (result.loss_start, result.loss_end)
    assert result.params.min() >= 0.0 and result.params.max() <= 1.0
    assert result.params.shape == (4, schema.vector_size)
    for group in schema.discrete:
        block = result.params[:, schema.group_slice(group.name)]
        assert (block.sum(axis=1) == 1.0).all() and set(np.unique(block)) <= {0.0, 1.0}
    assert ((result.iterations >= 1) & (result.iterations <= 30)).all()
    assert {"hair_style", "yaw", "smile"} <= set(result.values[0])


def test_result_does_not_depend_on_the_batch(models, targets):
    schema, imitator, parser = models
    # In float64: in float32 the summation order of a batched convolution differs
    # from a single image's, and Adam's normalised steps amplify that rounding.
    imitator64, parser64 = copy.deepcopy(imitator).double(), copy.deepcopy(parser).double()
    config = PinchConfig(max_iterations=15)
    together = pinch(imitator64, parser64, targets.double(), schema, config)
    alone = pinch(imitator64, parser64, targets[2:3].double(), schema, config)
    assert np.abs(together.params[2] - alone.params[0]).max() < 1e-6
    assert together.iterations[2] == alone.iterations[0]


def test_stopping_rules(models, targets):
    schema, imitator, parser = models
    start = pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=0, try_styles=False))
    assert (start.iterations == 0).all() and np.allclose(start.loss_start, start.loss_end)
    assert np.allclose(start.params, schema.reference_vector())
    reached = pinch(imitator, parser, targets, schema,
                    PinchConfig(max_iterations=50, target_loss=float(start.loss_start.max()) * 0.999))
    assert (reached.iterations <= 50).all() and (reached.iterations < 50).any()
    impatient = pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=200, patience=2,
                                                                     min_improvement=0.5))
    assert (impatient.iterations <= 3).all()


def test_feature_loss_is_per_image():
    a = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    b = [torch.ones(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    b[0][1] = 0.0
    assert torch.allclose(feature_loss(a, b), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="depth"):
        feature_loss(a, b[:1])


def test_held_parameters_stay_at_the_reference(models, targets):
    schema, imitator, parser = models
    result = pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=10, hold=("yaw", "smile")))
    for name in ("yaw", "smile"):
        index = schema.continuous_names.index(name)
        assert (result.params[:, index] == schema.reference_vector()[index]).all()
    with pytest.raises(ValueError, match=r"hold: \['nose_size'\]"):
        pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=1, hold=("nose_size",)))


def test_trying_styles_recovers_the_styles_of_an_imitated_target(models):
    schema, imitator, parser = models
    truth = np.tile(schema.reference_vector(), (3, 1))
    for row, choice in enumerate((1, 2, 3)):  # a non-default choice in every group
        for group in schema.discrete:
            block = schema.group_slice(group.name)
            truth[row, block] = np.eye(group.size)[choice % group.size]
    with torch.no_grad():
        targets = imitator(torch.from_numpy(truth).float())
    tried = pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=0, try_styles=True))
    assert np.array_equal(tried.params, truth.astype(np.float32))
    assert np.allclose(tried.loss_end, 0.0, atol=1e-6)
    default = pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=0, try_styles=False))
    assert (default.loss_end > tried.loss_end + 1e-4).all()


def test_prior_keeps_parameters_nearer_the_reference(models, targets):
    schema, imitator, parser = models
    reference = schema.reference_vector()[: schema.continuous_size]

    def drift(weight: float) -> float:
        result = pinch(imitator, parser, targets, schema, PinchConfig(max_iterations=20, prior_weight=weight))
        return float(np.abs(result.params[:, : schema.continuous_size] - reference).mean())

    free, pulled = drift(0.0), drift(1.0)
    assert pulled < 0.5 * free, (free, pulled)


def test_landmark_term_pulls_shape_and_pose_to_the_photo_geometry(models):
    # Exact rig geometry: with the landmark term the search lands closer to the
    # target's landmarks (after the photo's affine alignment) than without, from
    # the same start, and the pose moves although the imitator is frontal-only.
    from facecore.losses import landmark_error
    from facecore.rig import geometry, reference_face

    schema, imitator, parser = models
    rng = np.random.default_rng(3)
    truth = np.stack([schema.encode(v) for v in schema.sample(rng, 4)])
    size = imitator.config.image_size
    points = geometry.landmarks(geometry.values_from_vector(torch.from_numpy(truth), schema), size)
    reference = torch.from_numpy(reference_face(size).landmarks).float()
    from facecore.losses import affine_aligned

    targets_landmarks = affine_aligned(points.float(), reference)
    targets = torch.rand(4, 3, size, size)
    errors = {}
    for weight in (0.0, 5.0):
        config = PinchConfig(max_iterations=40, landmark_weight=weight, frontal_imitator=True, try_styles=False)
        result = pinch(imitator, parser, targets, schema, config, landmarks=targets_landmarks)
        found = geometry.landmarks(geometry.values_from_vector(torch.from_numpy(result.params), schema), size)
        errors[weight] = float(landmark_error(found.float(), targets_landmarks, reference).mean())
        yaw = result.params[:, schema.continuous_names.index("yaw")]
    assert errors[5.0] < 0.6 * errors[0.0], errors
    assert np.abs(yaw - 0.5).max() > 0.01  # the pose was searched, not held
