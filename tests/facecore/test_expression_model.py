"""G, D_id and D_e of expression transfer (SPEC.md §1): shapes, the starting point, gradients."""

from __future__ import annotations

import pytest
import torch

from facecore.models.expression import (ExpressionConfig, ExpressionDiscriminator, ExpressionGenerator,
                                        IdentityDiscriminator, heatmaps)


@pytest.fixture(scope="module")
def pair():
    from jobs.samples import aligned_expression_pairs

    (source, source_points, _), (target, target_points, _) = aligned_expression_pairs(4, seed=5, size=64)

    def tensor(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

    return tensor(source), torch.from_numpy(source_points), tensor(target), torch.from_numpy(target_points)


def test_generator_starts_as_a_copy_of_the_source_and_learns_through_every_part(pair):
    source, source_points, target, target_points = pair
    torch.manual_seed(0)
    config = ExpressionConfig(image_size=64, base_channels=8, residual_blocks=1)
    generator = ExpressionGenerator(config)
    source_maps, target_maps = heatmaps(source_points, config), heatmaps(target_points, config)
    assert source_maps.shape == (4, config.heatmap_channels, 64, 64) and float(source_maps.max()) <= 1.0
    result, parts = generator(source, source_maps, target_maps)
    assert result.shape == source.shape and parts["flow"].shape == (4, 2, 64, 64)
    assert float((result - source).detach().abs().mean()) < 0.02  # zero flow, the mask favouring the warp
    assert float(parts["flow"].detach().abs().max()) == 0.0
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
    with pytest.raises(ValueError, match="target_heatmaps"):
        ExpressionGenerator(config)(source, maps, maps[:, :1])
    with pytest.raises(ValueError, match="image_size"):
        ExpressionConfig(image_size=60)
    with pytest.raises(ValueError, match="mode"):
        ExpressionConfig(heatmap_mode="blobs")
