"""Training the regressor ``R`` (SPEC.md §3, seed 003), one step at a time.

Two kinds of data meet in a step:

- rig renders aligned like photos, at every pose, with their true parameters:
  the **supervised** loss (L1 on the continuous parameters, cross-entropy on the
  styles) and the **landmark** loss;
- real photos (aligned crops and their dlib landmarks), no labels: the seed's
  self-supervised losses, and the landmark loss.

The seed's losses, for an aligned photo ``I`` and ``y' = R(I)``, with the imitator
``G`` and ``I₂ = G(y')``, ``I₃ = G(reference identity, predicted expression)``,
``I₄ = G(predicted identity, reference expression and pose)``:

- content ``||F_seg(I₂) - F_seg(I)||₁`` (the pinch feature loss);
- identity ``1 - cos(F_reg(I₄), F_reg(I))`` (dlib's ResNet on dlib chips);
- prior ``||y' - reference||²`` over the continuous parameters;
- cycle ``||R(I₄) - y_gbe||₁ + γ ||R(I₃) - y_gbi||₁`` (targets held fixed);
- mouth: a discriminator on mouth crops tells ``I₄``'s mouth from neutral mouths
  (the imitator's renders of random identities with the reference expression),
  ``R`` is trained to fool it; or the seed's L1 form against the reference face's
  mouth features.

We add the landmark loss: the rig's own landmarks of ``y'`` (exact geometry),
affine-aligned like the photo, against the photo's aligned landmarks.

An imitator that learned frontal renders only is, with ``frontal_imitator``, always
shown the reference pose (the photo's alignment removes most of the pose's effect
anyway; what is left, the landmark loss sees). The shipped one learned aligned
renders at every pose and is shown the predicted pose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facecore.losses import identity_loss, landmark_error
from facecore.methods.pinch import feature_loss
from facecore.models.identity import IdentityScorer
from facecore.models.regressor import Regressor
from facecore.rig import geometry
from facecore.rig.schema import RigSchema
from facecore.training.state import no_sync

LOSSES = ("supervised", "landmark", "content", "identity", "prior", "cycle", "mouth")


@dataclass(frozen=True)
class RegressorLossConfig:
    """Loss weights (0 turns a loss off) and the knobs of the self-supervised part.

    Defaults: the supervised and landmark losses carry the learning (they have
    ground truth and exact geometry); the seed's losses shape what renders cannot
    teach (real skin, hair and lighting) at weights that keep them from pulling
    against the truth. See README "Training the regressor".
    """

    supervised: float = 1.0
    landmark: float = 1.0
    content: float = 0.5
    identity: float = 0.1
    prior: float = 0.01
    cycle: float = 0.1
    mouth: float = 0.02
    cycle_gamma: float = 1.0  # γ_le of the seed, weight of the reference-identity cycle
    mouth_form: str = "adversarial"  # "adversarial" (a discriminator) or "l1" (the seed's feature form)
    landmark_noise: float = 0.005  # std of the noise added to renders' input landmarks, as a fraction of the side
    frontal_imitator: bool = False
    grad_clip: float = 5.0

    def __post_init__(self) -> None:
        for name in LOSSES:
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.mouth_form not in ("adversarial", "l1"):
            raise ValueError(f"mouth_form must be 'adversarial' or 'l1', got {self.mouth_form!r}")


@dataclass(frozen=True)
class MouthDiscriminatorConfig:
    channels: int = 16


class MouthDiscriminator(nn.Module):
    """Neutral mouth or not: (B, 3, h, w) crops → (B,) logits. Small, spectral-normed."""

    def __init__(self, config: MouthDiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        width = config.channels
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(3, width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
        )
        self.out = sn(nn.Linear(4 * width, 1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(crops).mean(dim=(2, 3))).squeeze(1)


class RegressorObjective:
    """The frozen parts of the losses (imitator, identity network, rig tables) and the losses themselves."""

    def __init__(self, schema: RigSchema, imitator: nn.Module, identity: nn.Module | None,
                 config: RegressorLossConfig, image_size: int) -> None:
        from facecore.rig import reference_face

        self.schema, self.imitator, self.identity, self.config = schema, imitator.eval(), identity, config
        for module in (imitator, identity):
            if module is not None:
                module.eval()
                for weight in module.parameters():
                    weight.requires_grad_(False)
        self.identity_scorer = IdentityScorer(identity, "cpu") if identity is not None else None
        self.size = image_size
        self.g_size = imitator.config.image_size
        reference = torch.from_numpy(schema.reference_vector()).float()
        self.reference = reference
        self.neutral = reference[: schema.continuous_size]
        index = {g: torch.from_numpy(schema.indices(g)) for g in ("identity", "expression", "pose", "appearance")}
        self.identity_index, self.expression_index, self.pose_index = index["identity"], index["expression"], \
            index["pose"]
        self.reference_points = torch.from_numpy(reference_face(image_size).landmarks).float()
        self.g_reference_points = torch.from_numpy(reference_face(self.g_size).landmarks).float()
        # The mouth box in the imitator's frame: around the reference mouth, with a margin.
        mouth = self.g_reference_points[48:68]
        low, high = mouth.min(dim=0).values, mouth.max(dim=0).values
        margin = 0.35 * (high - low)
        self.mouth_box = [int(v) for v in (low[1] - margin[1], high[1] + margin[1], low[0] - margin[0],
                                           high[0] + margin[0])]
        self.mouth_box = [max(0, min(self.g_size, v)) for v in self.mouth_box]

    def to(self, device: torch.device) -> "RegressorObjective":
        for name in ("reference", "neutral", "reference_points", "g_reference_points", "identity_index",
                     "expression_index", "pose_index"):
            setattr(self, name, getattr(self, name).to(device))
        self.imitator.to(device)
        if self.identity is not None:
            self.identity.to(device)
            self.identity_scorer = IdentityScorer(self.identity, device)
        return self

    # -- pieces ------------------------------------------------------------------

    @staticmethod
    def plain_parser(regressor: nn.Module) -> nn.Module:
        """``F_seg``: the regressor's own (frozen) parser, unwrapped from DDP."""
        return (regressor.module if hasattr(regressor, "module") else regressor).parser

    def with_reference(self, vectors: torch.Tensor, groups: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Vectors with the continuous parameters of ``groups`` set to the reference face's."""
        out = vectors.clone()
        for index in groups:
            out[:, index] = self.reference[index]
        return out

    def imitate(self, vectors: torch.Tensor) -> torch.Tensor:
        shown = self.with_reference(vectors, (self.pose_index,)) if self.config.frontal_imitator else vectors
        return self.imitator(shown)

    def rig_landmarks(self, vectors: torch.Tensor, size: int) -> torch.Tensor:
        return geometry.landmarks(geometry.values_from_vector(vectors, self.schema), size)

    def mouth(self, images: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.mouth_box
        return images[:, :, top:bottom, left:right]

    def upsample(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.size:
            return images
        return F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)

    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.g_size:
            return images
        return F.interpolate(images, size=self.g_size, mode="bilinear", antialias=True, align_corners=False)

    # -- losses ------------------------------------------------------------------

    def supervised(self, continuous, logits, truth: torch.Tensor) -> torch.Tensor:
        loss = (continuous - truth[:, : self.schema.continuous_size]).abs().mean()
        for group, block in zip(self.schema.discrete, logits):
            loss = loss + F.cross_entropy(block, truth[:, self.schema.group_slice(group.name)].argmax(dim=1)) \
                / max(len(self.schema.discrete), 1)
        return loss

    def landmark(self, vectors: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return landmark_error(self.rig_landmarks(vectors, self.size), landmarks, self.reference_points).mean()

    def prior(self, continuous: torch.Tensor) -> torch.Tensor:
        return (continuous - self.neutral).pow(2).mean()

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """F_reg descriptors of (B, 3, S, S) images in [0, 1] at their (B, 68, 2) landmarks."""
        return self.identity_scorer.embed(images * 255.0, landmarks.detach().cpu().numpy())


def regressor_step(state, objective: RegressorObjective, renders: Mapping[str, torch.Tensor] | None,
                   photos: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
    """One update of the regressor (and of the mouth discriminator, when it is used).

    Args:
        state: a :class:`~facecore.training.state.TrainState` with module
            ``regressor`` (and ``discriminator`` for the adversarial mouth loss).
        renders: ``image`` (B, 3, S, S) in [0, 1], ``landmarks`` (B, 68, 2) in
            pixels, ``params`` (B, D) true vectors; or None.
        photos: ``image`` and ``landmarks`` of aligned real photos; or None.

    Returns:
        Each weighted-in loss's value (before weighting), and ``total``.
    """
    cfg = objective.config
    regressor = state.modules["regressor"]
    regressor.train()
    terms: dict[str, torch.Tensor] = {}
    if renders is not None:
        noisy = renders["landmarks"]
        if cfg.landmark_noise > 0:
            noise = torch.randn(noisy.shape, generator=state.generator).to(noisy.device)
            noisy = noisy + cfg.landmark_noise * objective.size * noise
        continuous, logits = regressor(renders["image"], noisy)
        vectors = Regressor.soft_vectors(continuous, logits)
        if cfg.supervised > 0:
            terms["supervised"] = objective.supervised(continuous, logits, renders["params"])
        if cfg.landmark > 0:
            terms["landmark"] = objective.landmark(vectors, renders["landmarks"])
    fake_mouths = None
    if photos is not None:
        continuous, logits = regressor(photos["image"], photos["landmarks"])
        vectors = Regressor.soft_vectors(continuous, logits)
        if cfg.landmark > 0:
            terms["landmark"] = terms.get("landmark", 0.0) + objective.landmark(vectors, photos["landmarks"])
        if cfg.content > 0:
            with torch.no_grad():
                target = objective.plain_parser(regressor).features(objective.downsample(photos["image"]))
            terms["content"] = feature_loss(objective.plain_parser(regressor).features(objective.imitate(vectors)),
                                            target).mean()
        if cfg.prior > 0:
            terms["prior"] = objective.prior(continuous)
        needs_neutral = cfg.identity > 0 or cfg.cycle > 0 or cfg.mouth > 0
        if needs_neutral:
            # I₄: predicted identity (and appearance), reference expression and pose.
            neutral_vectors = objective.with_reference(vectors, (objective.expression_index, objective.pose_index))
            neutral_images = objective.imitate(neutral_vectors)
        if cfg.identity > 0 and objective.identity is not None:
            g_points = objective.rig_landmarks(neutral_vectors.detach(), objective.g_size)
            photo_points = photos["landmarks"]
            terms["identity"] = identity_loss(objective.embed(neutral_images, g_points),
                                              objective.embed(photos["image"], photo_points)).mean()
        if cfg.cycle > 0:
            # I₃: reference identity, predicted expression (and pose).
            expression_vectors = objective.with_reference(vectors, (objective.identity_index,))
            expression_images = objective.imitate(expression_vectors)
            cycle = 0.0
            for images, wanted, weight in ((neutral_images, neutral_vectors, 1.0),
                                           (expression_images, expression_vectors, cfg.cycle_gamma)):
                points = objective.rig_landmarks(wanted.detach(), objective.size)
                again, _ = regressor(objective.upsample(images), points)
                cycle = cycle + weight * (again - wanted[:, : objective.schema.continuous_size].detach()).abs().mean()
            terms["cycle"] = cycle
        if cfg.mouth > 0:
            fake_mouths = objective.mouth(neutral_images)
            if cfg.mouth_form == "l1":
                with torch.no_grad():
                    reference_mouth = objective.mouth(objective.imitate(objective.reference[None]))
                parser = objective.plain_parser(regressor)
                terms["mouth"] = feature_loss(parser.features(_pad16(fake_mouths)),
                                              parser.features(_pad16(reference_mouth))).mean()
            else:
                discriminator = state.modules["discriminator"]
                discriminator.eval()
                terms["mouth"] = F.softplus(-discriminator(fake_mouths)).mean()
    total = sum(getattr(cfg, name) * value for name, value in terms.items())
    if not isinstance(total, torch.Tensor):
        return {}
    optimiser = state.optimisers["regressor"]
    optimiser.zero_grad(set_to_none=True)
    discriminator = state.modules.get("discriminator")
    # The discriminator is not updated in this phase: its gradients are neither
    # kept nor synchronised across workers.
    with no_sync(discriminator):
        total.backward()
    if discriminator is not None:
        discriminator.zero_grad(set_to_none=True)
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(regressor.parameters(), cfg.grad_clip)
    optimiser.step()
    state.steps["regressor"] += 1
    metrics = {name: float(value.detach()) for name, value in terms.items()}
    if fake_mouths is not None and cfg.mouth_form == "adversarial":
        metrics["discriminator"] = discriminator_step(state, objective, fake_mouths.detach(),
                                                      photos["image"].shape[0])
    metrics["total"] = float(total.detach())
    return metrics


def discriminator_step(state, objective: RegressorObjective, fake_mouths: torch.Tensor, count: int) -> float:
    """One update of the mouth discriminator: neutral mouths are real, the regressor's ``I₄`` mouths fake."""
    discriminator = state.modules["discriminator"]
    discriminator.train()
    with torch.no_grad():
        identities = torch.rand((count, objective.schema.vector_size), generator=state.generator)
        real_vectors = objective.with_reference(identities.to(fake_mouths.device),
                                                (objective.expression_index, objective.pose_index))
        real_vectors[:, objective.schema.continuous_size:] = objective.reference[objective.schema.continuous_size:]
        real_mouths = objective.mouth(objective.imitate(real_vectors))
    loss = F.softplus(-discriminator(real_mouths)).mean() + F.softplus(discriminator(fake_mouths)).mean()
    optimiser = state.optimisers["discriminator"]
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    state.steps["discriminator"] += 1
    return float(loss.detach())


def _pad16(images: torch.Tensor) -> torch.Tensor:
    """Resize crops to a parser-friendly square (sides a multiple of 16)."""
    return F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)



@torch.no_grad()
def regressor_eval(regressor: nn.Module, schema: RigSchema, renders: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Held-out renders: MAE of the continuous parameters (all and visible ones), over
    the reference face's MAE, and style accuracy."""
    regressor.eval()
    vectors, _ = regressor.vectors(renders["image"], renders["landmarks"])
    truth = renders["params"]
    reference = torch.from_numpy(schema.reference_vector()).to(truth)
    c = schema.continuous_size
    visible = torch.from_numpy(schema.visible_indices).to(truth.device)
    mae = (vectors[:, :c] - truth[:, :c]).abs()
    init = (reference[:c] - truth[:, :c]).abs()
    correct = [float((vectors[:, schema.group_slice(g.name)].argmax(1) == truth[:, schema.group_slice(g.name)]
                      .argmax(1)).float().mean()) for g in schema.discrete]
    return {"mae": float(mae.mean()), "mae_ratio": float(mae.mean() / init.mean()),
            "mae_ratio_visible": float(mae[:, visible].mean() / init[:, visible].mean()),
            "discrete_acc": float(np.mean(correct)) if correct else 1.0}
