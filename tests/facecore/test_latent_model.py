"""E and D of face swap (SPEC.md §2): shapes, layer mixing, per-image modulation, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facecore.models.latent import LatentConfig, LayeredEncoder, ModulatedConv, StyledDecoder, mix_layers


@pytest.mark.parametrize("size, layers", [(64, 10), (128, 12), (1024, 18)])
def test_a_code_has_two_layers_per_side_of_the_decoder(size, layers):
    assert LatentConfig(image_size=size).num_layers == layers


def test_encoder_and_decoder_shapes_and_every_parameter_learns():
    torch.manual_seed(0)
    config = LatentConfig(image_size=64, latent_dim=32, channels=8, max_channels=32)
    encoder, decoder = LayeredEncoder(config), StyledDecoder(config)
    images = torch.rand(3, 3, 64, 64)
    codes = encoder(images)
    assert codes.shape == (3, config.num_layers, 32)
    result, placement = decoder(codes, placed=True)
    assert result.shape == images.shape and 0.0 <= float(result.detach().min()) and float(result.detach().max()) <= 1.0
    assert placement.shape == (3, 4, 64, 64)  # mask, flow (x, y), source gate
    (F.mse_loss(result, images) + placement.mean()).backward()
    for name, parameter in [*encoder.named_parameters(), *decoder.named_parameters()]:
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name


def test_mixing_takes_the_identity_layers_from_the_source_and_the_rest_from_the_target():
    source, target = torch.zeros(2, 10, 4), torch.ones(2, 10, 4)
    mixed = mix_layers(source, target, (4, 5))
    assert mixed[:, [4, 5]].eq(0).all() and mixed[:, [0, 1, 2, 3, 6, 7, 8, 9]].eq(1).all()
    with pytest.raises(ValueError, match="shape"):
        mix_layers(source, target[:, :9], (4,))


def test_modulated_convolution_gives_each_image_its_own_weights():
    torch.manual_seed(2)
    conv = ModulatedConv(4, 5, latent_dim=6)
    x, latent = torch.randn(3, 4, 9, 9), torch.randn(3, 6)
    together = conv(x, latent)
    one_by_one = torch.cat([conv(x[i:i + 1], latent[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    # Demodulated: scaling every style leaves the output as it was.
    with torch.no_grad():
        conv.style.weight.mul_(3.0)
        conv.style.bias.mul_(3.0)
    assert torch.allclose(conv(x, latent), together, atol=1e-5)


def test_bad_configs_and_shapes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        LatentConfig(image_size=96)
    with pytest.raises(ValueError, match="identity_layers"):
        LatentConfig(image_size=64, identity_layers=(10,))
    with pytest.raises(ValueError, match="identity_layers"):
        LatentConfig(image_size=64, identity_layers=(4, 4))
    config = LatentConfig(image_size=32, latent_dim=8, channels=4, max_channels=8)
    with pytest.raises(ValueError, match="codes"):
        StyledDecoder(config)(torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="images"):
        LayeredEncoder(config)(torch.zeros(1, 3, 64, 64))


def test_the_gate_shows_the_source_layer_where_its_alpha_is_and_the_warped_target_elsewhere():
    from facecore.models.latent import composite

    torch.manual_seed(0)
    painted, targets, layer = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.rand(2, 4, 16, 16)
    layer[:, 3] = 0.0
    layer[:, 3, 4:12, 4:12] = 1.0  # the face
    placement = torch.zeros(2, 4, 16, 16)  # mask 0, no flow, gate shut
    assert torch.allclose(composite(painted, placement, targets, None, layer), targets, atol=1e-5)
    placement[:, 3] = 1.0  # gate open
    shown = composite(painted, placement, targets, None, layer)
    assert torch.allclose(shown[..., 4:12, 4:12], layer[:, :3, 4:12, 4:12], atol=1e-5)
    assert torch.allclose(shown[..., :4, :], targets[..., :4, :], atol=1e-5)
    placement[:, 0] = 1.0  # D's picture over everything
    assert torch.allclose(composite(painted, placement, targets, None, layer), painted)


def test_a_new_decoder_starts_with_the_gate_nearly_shut():
    config = LatentConfig(image_size=32, latent_dim=16, channels=8, max_channels=16)
    _, placement = StyledDecoder(config)(torch.randn(2, config.num_layers, 16), placed=True)
    assert float(placement[:, 3].max()) < 0.1
