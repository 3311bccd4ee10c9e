"""Training face swap (SPEC.md §2, seed 002): the losses of E and D on a batch of pairs.

A batch holds pairs of two people: ``source`` and ``target`` crops (B, 3, S, S) in
[0, 1] and their 68 landmarks (``source_landmarks``, ``target_landmarks``, (B, 68, 2)
in crop pixels); rig pairs also hold the swap's ground truth ``truth`` (B, 3, S, S)
and ``has_truth`` (B,) says which rows do (photos have none). ``prior`` (B, 2, S, S),
optional, is the landmark warp of the target to the source's face shape that the
swap's flow starts from (:func:`facecore.methods.latent_swap.prior_flows`); ``source_layer``
(B, 4, S, S), optional, the source's face moved onto the swap's landmarks that D's gate
shows (:func:`facecore.methods.latent_swap.source_layers`; alpha 0 on rig pairs).

With ``w_s = E(source)``, ``w_t = E(target)`` and the swap ``Y = D(mix(w_s, w_t))``:

- ``mse``: ``||x − D(E(x))||² / (C·H·W)`` for both faces (the seed's L_MSE);
- ``perceptual``: ``Σ_levels ||F(x) − F(D(E(x)))||² / (C'·H'·W')``, F the ImageNet
  MobileNetV2 features (the seed's L_perc);
- ``identity``: ``1 − cos(z_id(Y), z_id(source))``, z_id the dlib ResNet port on chips
  cut at the target's landmarks (Y keeps the target's pose and expression);
- ``attribute``: ``½ Σ_k ||z_att^k(Y) − z_att^k(target)||²``, each level's squared
  distance averaged over its elements, z_att the same MobileNetV2 levels;
- ``truth`` (ours): the per-pixel L1 between Y and the rig's ground truth, on the
  rows that have one.

The measuring networks (F, z_id) are frozen: the gradients go through them into
E and D only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from facecore.models.latent import composite, mix_layers
from facecore.models.mobilenet import MobileNetV2Features
from facecore.training.state import TrainState

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SwapLossConfig:
    """Weights of the swap's losses (0 turns a term off)."""

    mse: float = 1.0
    perceptual: float = 1.0
    identity: float = 1.0
    attribute: float = 1.0
    truth: float = 1.0

    def __post_init__(self) -> None:
        weights = {name: getattr(self, name) for name in ("mse", "perceptual", "identity", "attribute", "truth")}
        negative = {name: value for name, value in weights.items() if value < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")


class SwapCritics:
    """The frozen networks the losses measure with: ``features`` (F and z_att) and ``identity``
    (an :class:`facecore.models.identity.IdentityScorer`, z_id; None: no identity term)."""

    def __init__(self, features: MobileNetV2Features, identity=None) -> None:
        self.features = features.eval().requires_grad_(False)
        self.identity = identity
        if identity is not None:
            identity.model.requires_grad_(False)


def _squared(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per image, the sum over levels of each level's mean squared difference: (B,)."""
    return sum(F.mse_loss(x, y, reduction="none").flatten(1).mean(dim=1) for x, y in zip(a, b))


def attribute_distance(swap_features: list[torch.Tensor], target_features: list[torch.Tensor]) -> torch.Tensor:
    """L_att per image, (B,): ``½ Σ_k`` of level k's mean squared difference."""
    return 0.5 * _squared(swap_features, target_features)


def identity_distance(critics: SwapCritics, images: torch.Tensor, landmarks: torch.Tensor,
                      reference: torch.Tensor) -> torch.Tensor:
    """L_id per image, (B,): ``1 − cos`` of the dlib descriptors of ``images`` ([0, 1], faces at
    ``landmarks``) and the ``reference`` descriptors (the sources', (B, 128))."""
    embedded = critics.identity.embed(images * 255.0, landmarks.detach().cpu().numpy())
    return 1.0 - F.cosine_similarity(embedded, reference.detach(), dim=1)


def swap_losses(encoder: nn.Module, decoder: nn.Module, batch: Batch, critics: SwapCritics,
                config: SwapLossConfig) -> dict[str, torch.Tensor]:
    """Each loss averaged over the batch, their weighted ``total``, and the ``swap`` images."""
    source, target = batch["source"], batch["target"]
    codes = encoder(torch.cat([source, target]))
    source_codes, target_codes = codes.chunk(2)
    identity_layers = getattr(decoder, "module", decoder).config.identity_layers  # DDP wraps the decoder
    # One pass of D: the reconstructions are D's own pictures (composited over the input
    # they would be trivial), the swap is composited over the target.
    images, placement = decoder(torch.cat([codes, mix_layers(source_codes, target_codes, identity_layers)]),
                                placed=True)
    reconstructed = images[:2 * len(source)]
    swap = composite(images[2 * len(source):], placement[2 * len(source):], target, batch.get("prior"),
                     batch.get("source_layer"))
    inputs = torch.cat([source, target])
    losses: dict[str, torch.Tensor] = {}
    losses["mse"] = (reconstructed - inputs).pow(2).flatten(1).mean(dim=1).mean()
    need_features = config.perceptual > 0 or config.attribute > 0
    if need_features:
        measured = critics.features(torch.cat([reconstructed, inputs, swap]))
        parts = [level.split([len(inputs), len(inputs), len(swap)]) for level in measured]
        recon_f, input_f, swap_f = ([part[i] for part in parts] for i in range(3))
        losses["perceptual"] = _squared(recon_f, input_f).mean()
        target_f = [level[len(source):] for level in input_f]
        losses["attribute"] = attribute_distance(swap_f, [level.detach() for level in target_f]).mean()
    if critics.identity is not None and config.identity > 0:
        with torch.no_grad():
            source_id = critics.identity.embed(source * 255.0, batch["source_landmarks"].cpu().numpy())
        losses["identity"] = identity_distance(critics, swap, batch["target_landmarks"], source_id).mean()
    if "truth" in batch and config.truth > 0:
        rows = batch["has_truth"].to(swap.dtype)
        per_image = (swap - batch["truth"]).abs().flatten(1).mean(dim=1)
        losses["truth"] = (per_image * rows).sum() / rows.sum().clamp_min(1.0)
    losses["total"] = sum(getattr(config, name) * value for name, value in losses.items())
    losses["swap"] = swap
    return losses


NETWORKS = ("encoder", "decoder")


def swap_step(state: TrainState, batch: Batch, critics: SwapCritics, config: SwapLossConfig,
              grad_clip: float = 5.0) -> dict[str, float]:
    """One update of E and D on ``total``; returns each loss's value."""
    encoder, decoder = state.modules["encoder"], state.modules["decoder"]
    encoder.train()
    decoder.train()
    for name in NETWORKS:
        state.optimisers[name].zero_grad(set_to_none=True)
    losses = swap_losses(encoder, decoder, batch, critics, config)
    losses["total"].backward()
    for name in NETWORKS:
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(state.modules[name].parameters(), grad_clip)
        state.optimisers[name].step()
        state.steps[name] += 1
    return {name: float(value.detach()) for name, value in losses.items() if name != "swap"}
