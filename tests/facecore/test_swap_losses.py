"""The face-swap losses (SPEC.md §2): each term, what it sees, and that E and D learn from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facecore.models.latent import LatentConfig, LayeredEncoder, StyledDecoder
from facecore.models.mobilenet import MobileNetV2Features
from facecore.training.swap import SwapCritics, SwapLossConfig, swap_losses


@pytest.fixture(scope="module")
def critics():
    from facecore.models.identity import IdentityScorer

    return SwapCritics(MobileNetV2Features.pretrained(), IdentityScorer(device="cpu"))


@pytest.fixture(scope="module")
def batch():
    from facecore.rig import default_schema
    from facecore.rig.pairs import swap_pairs
    from facecore.rig.render import Renderer

    renderer = Renderer()
    trios = zip(*swap_pairs(default_schema(), np.random.default_rng(2), 4))
    renders = [[renderer.render(values, 64) for values in trio] for trio in trios]

    def images(index):
        return torch.from_numpy(np.stack([r[index].image for r in renders])).permute(0, 3, 1, 2).float() / 255.0

    def points(index):
        return torch.from_numpy(np.stack([r[index].landmarks for r in renders])).float()

    return {"source": images(0), "target": images(1), "truth": images(2), "source_landmarks": points(0),
            "target_landmarks": points(1), "has_truth": torch.tensor([1.0, 1.0, 0.0, 1.0])}


def _models(seed: int = 0):
    torch.manual_seed(seed)
    config = LatentConfig(image_size=64, latent_dim=32, channels=8, max_channels=32, identity_layers=(4, 5))
    return LayeredEncoder(config), StyledDecoder(config)


def test_every_term_is_finite_and_reaches_e_and_d_but_not_the_critics(batch, critics):
    encoder, decoder = _models()
    losses = swap_losses(encoder, decoder, batch, critics, SwapLossConfig())
    assert set(losses) == {"mse", "perceptual", "attribute", "identity", "truth", "total", "swap"}
    for name in ("mse", "perceptual", "attribute", "identity", "truth"):
        value = float(losses[name].detach())
        assert losses[name].ndim == 0 and value > 0 and np.isfinite(value), name
    assert 0.0 < float(losses["identity"].detach()) < 2.0
    assert losses["swap"].shape == batch["target"].shape
    losses["total"].backward()
    assert all(p.grad is not None for p in encoder.parameters())
    assert all(p.grad is not None for p in decoder.parameters())
    assert all(p.grad is None for p in critics.features.parameters())
    assert all(p.grad is None for p in critics.identity.model.parameters())


def test_the_truth_term_counts_only_rows_that_have_a_truth(batch, critics):
    encoder, decoder = _models()
    config = SwapLossConfig(perceptual=0, attribute=0, identity=0)
    with torch.no_grad():
        losses = swap_losses(encoder, decoder, batch, critics, config)
        per_image = (losses["swap"] - batch["truth"]).abs().flatten(1).mean(dim=1)
    expected = float(per_image[batch["has_truth"] > 0].mean())
    assert abs(float(losses["truth"]) - expected) < 1e-6
    assert "perceptual" not in losses and "identity" not in losses
    with pytest.raises(ValueError, match="identity"):
        SwapLossConfig(identity=-1.0)


def test_a_few_steps_lower_reconstruction_and_the_swap_s_distance_to_the_truth(batch, critics):
    encoder, decoder = _models(1)
    config = SwapLossConfig(identity=0.0)  # the dlib network is slow on CPU; it has its own test above
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    history = []
    for _ in range(25):
        losses = swap_losses(encoder, decoder, batch, critics, config)
        optimiser.zero_grad()
        losses["total"].backward()
        optimiser.step()
        history.append({name: float(losses[name].detach()) for name in ("mse", "perceptual", "truth")})
    for name in ("mse", "perceptual"):
        assert history[-1][name] < 0.7 * history[0][name], (name, history[0][name], history[-1][name])
    # The swap starts as the target itself (D's mask near 0), already close to the truth: it gains less.
    assert history[-1]["truth"] < 0.97 * history[0]["truth"], (history[0]["truth"], history[-1]["truth"])
