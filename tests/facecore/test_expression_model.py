"""G, D_id and D_e of expression transfer (SPEC.md §1): shapes, the starting point, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facecore.methods.landmark_warp import piecewise_affine_warp
from facecore.models.expression import (ExpressionConfig, ExpressionDiscriminator, ExpressionGenerator,
                                        IdentityDiscriminator, generator_inputs, heatmaps)


@pytest.fixture(scope="module")
def pair():
    from jobs.samples import aligned_expression_pairs

    (source, source_points, _), (target, target_points, _) = aligned_expression_pairs(4, seed=5, size=64)

    def tensor(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

    return tensor(source), torch.from_numpy(source_points), tensor(target), torch.from_numpy(target_points)


def test_generator_starts_as_the_landmark_warp_and_learns_through_every_part(pair):
    source, source_points, target, target_points = pair
    torch.manual_seed(0)
    config = ExpressionConfig(image_size=64, base_channels=8, residual_blocks=1, flow_prior="warp")
    generator = ExpressionGenerator(config)
    inputs = generator_inputs(source_points, target_points, config)
    assert inputs["source_maps"].shape == (4, config.heatmap_channels, 64, 64)
    assert float(inputs["source_maps"].max()) <= 1.0
    result, parts = generator(source, inputs["source_maps"], inputs["target_maps"], inputs["landmark_flow"])
    assert result.shape == source.shape and parts["flow"].shape == (4, 2, 64, 64)
    assert float(parts["flow"].detach().abs().max()) == 0.0
    # Zero correction: the warp is the piecewise-affine baseline's, to interpolation.
    baseline = torch.stack([torch.from_numpy(piecewise_affine_warp(image.permute(1, 2, 0).numpy(), a.numpy(),
                                                                   b.numpy())).permute(2, 0, 1)
                            for image, a, b in zip(source, source_points, target_points)])
    assert float((parts["warped"] - baseline).detach().abs().max()) < 1e-4
    assert float((parts["warped"] - source).detach().abs().mean()) > 0.003  # it does move the face
    assert float((result - baseline).detach().abs().mean()) < 0.02  # the mask favours the warp
    (result - target).abs().mean().backward()
    for head in (generator.flow, generator.mask, generator.refine):
        assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0


def test_discriminators_give_one_logit_per_face(pair):
    source, source_points, target, _ = pair
    for size in (64, 128):
        config = ExpressionConfig(image_size=size, discriminator_channels=8)
        images = torch.nn.functional.interpolate(source, size=size)
        maps = heatmaps(source_points * (size / 64), config)
        assert IdentityDiscriminator(config)(images, images).shape == (4,)
        assert ExpressionDiscriminator(config)(images, maps).shape == (4,)


def test_bad_shapes_and_configs_are_refused(pair):
    source, source_points, _, _ = pair
    config = ExpressionConfig(image_size=64, base_channels=8, residual_blocks=1)
    maps = heatmaps(source_points, config)
    flow = torch.zeros(4, 2, 64, 64)
    with pytest.raises(ValueError, match="target_heatmaps"):
        ExpressionGenerator(config)(source, maps, maps[:, :1], flow)
    with pytest.raises(ValueError, match="landmark_flow"):
        ExpressionGenerator(config)(source, maps, maps, flow[:, :1])
    with pytest.raises(ValueError, match="image_size"):
        ExpressionConfig(image_size=60)
    with pytest.raises(ValueError, match="mode"):
        ExpressionConfig(heatmap_mode="blobs")


def test_the_face_prior_moves_the_face_and_leaves_the_picture_around_it(pair):
    import cv2

    from facecore.methods.landmark_warp import face_warp_maps

    source, source_points, _, target_points = pair
    config = ExpressionConfig(image_size=64, base_channels=8, residual_blocks=1)
    assert config.flow_prior == "face"
    generator = ExpressionGenerator(config)
    inputs = generator_inputs(source_points, target_points, config)
    _, parts = generator(source, inputs["source_maps"], inputs["target_maps"], inputs["landmark_flow"])
    for i in range(len(source)):
        map_x, map_y = face_warp_maps(source_points[i].numpy(), target_points[i].numpy(), 64, 64, 2.5)
        expected = cv2.remap(source[i].permute(1, 2, 0).numpy(), map_x, map_y, cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        assert np.abs(parts["warped"][i].detach().permute(1, 2, 0).numpy() - expected).max() < 1e-4
    with pytest.raises(ValueError, match="flow_prior"):
        ExpressionConfig(flow_prior="tps")
