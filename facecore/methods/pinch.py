"""Pinch (捏脸): photo → game-face parameters by optimisation (SPEC.md §4).

``min_x ||f(g(x)) - f(I)||_1  s.t. x in [0, 1]`` for a whole batch at once: every
image has its own x, its own optimiser state and its own stop. Continuous
parameters start at the reference face, or where the regressor put them (the
``start`` argument), and are projected back into [0, 1] after each step. An
optional landmark term compares the rig's own landmarks of x (exact geometry,
aligned like the photo) with the photo's, so shape and pose are pulled by
geometry as well as by the imitator's pixels; each discrete style group is a relaxed one-hot (a softmax over
learnable logits) during the search and snapped to its argmax at the end.

Nothing couples the images of a batch (per-image loss sums, element-wise Adam,
the models in eval mode), so an image's result does not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from facecore.rig.schema import RigSchema


@dataclass(frozen=True)
class PinchConfig:
    """The optimiser and its stopping rule.

    Attributes:
        max_iterations: hard cap per image.
        learning_rate: Adam step size on the parameters and the style logits.
        patience: stop an image after this many steps without a relative
            improvement of at least ``min_improvement`` over its best loss.
        min_improvement: relative improvement that resets the patience counter.
        target_loss: stop an image once its loss is at or below this.
        temperature: softmax temperature of the relaxed one-hot groups.
        initial_logit: logit of each group's starting choice (others 0).
        decay: anneal the step size along a half cosine from ``learning_rate`` at
            the first step to 5% of it at ``max_iterations``.
        try_styles: pick each discrete group's choice by trying every one, per
            image, once at the reference face (the starting choice) and once
            after the search (the snap), instead of taking the default and the
            relaxed one-hot's argmax. Costs one forward pass per choice.
        prior_weight: weight of a pull towards the start (the reference face, or
            the regressor's answer; mean absolute distance of the continuous
            parameters from it) added to the loss: parameters the image says
            little about stay where the better-informed start put them instead
            of drifting with the imitator's errors (0 = the seed's plain loss).
        hold: continuous parameters kept at their start values.
        landmark_weight: weight of the landmark term (mean distance between the
            rig's landmarks of x, affine-aligned onto the reference face, and the
            photo's aligned landmarks, over the reference's eye distance); used
            when landmarks are passed (0 = off).
        search_styles: False keeps each discrete group at the start's choice
            (e.g. the regressor's); ``try_styles`` is then ignored.
        feature_weight: weight of the seed's term, the parser-feature L1 between
            the imitator's render of x and the photo (0 leaves only the
            landmark term and the prior).
        frontal_imitator: the imitator learned frontal renders only: it is shown x
            with the pose at the reference, and only the landmark term and the
            prior move the pose.
    """

    max_iterations: int = 100
    learning_rate: float = 0.1
    patience: int = 12
    min_improvement: float = 2e-3
    target_loss: float = 0.0
    temperature: float = 0.5
    initial_logit: float = 2.0
    decay: bool = True
    try_styles: bool = True
    prior_weight: float = 0.0
    hold: tuple[str, ...] = ()
    landmark_weight: float = 0.0
    frontal_imitator: bool = False
    feature_weight: float = 1.0
    search_styles: bool = True


@dataclass(frozen=True, eq=False)
class PinchResult:
    """Per-image outcome. Arrays are indexed like the input batch.

    Attributes:
        params: (B, D) float32 flat rig vectors, one-hots snapped.
        values: named parameters per image (``RigSchema.decode``).
        loss_start: (B,) loss at the start (the reference face or the given start).
        loss_end: (B,) loss of the snapped result.
        iterations: (B,) steps taken.
    """

    params: np.ndarray
    values: list[dict]
    loss_start: np.ndarray
    loss_end: np.ndarray
    iterations: np.ndarray


def feature_loss(features_a: list[torch.Tensor], features_b: list[torch.Tensor]) -> torch.Tensor:
    """Per-image L1 distance between two feature pyramids, averaged over levels: (B,)."""
    if len(features_a) != len(features_b):
        raise ValueError(f"feature pyramids differ in depth: {len(features_a)} vs {len(features_b)}")
    per_level = [(a - b).abs().flatten(1).mean(dim=1) for a, b in zip(features_a, features_b)]
    return torch.stack(per_level, dim=0).mean(dim=0)


class _Parameters(nn.Module):
    """The optimised variables: continuous values and per-group style logits."""

    def __init__(self, schema: RigSchema, start: torch.Tensor, config: PinchConfig) -> None:
        """``start``: (B, D) snapped vectors the search begins at."""
        super().__init__()
        self.schema = schema
        self.temperature = config.temperature
        self.continuous = nn.Parameter(start[:, : schema.continuous_size].clone())
        self.logits = nn.ParameterList()
        for group in schema.discrete:
            self.logits.append(nn.Parameter(start[:, schema.group_slice(group.name)] * config.initial_logit))

    def vector(self, snapped: bool = False) -> torch.Tensor:
        blocks = [self.continuous]
        for logits in self.logits:
            if snapped:
                blocks.append(nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype))
            else:
                blocks.append(torch.softmax(logits / self.temperature, dim=1))
        return torch.cat(blocks, dim=1)


def pinch(imitator: nn.Module, parser: nn.Module, targets: torch.Tensor, schema: RigSchema,
          config: PinchConfig = PinchConfig(), start: torch.Tensor | None = None,
          landmarks: torch.Tensor | None = None) -> PinchResult:
    """Find rig parameters whose imitated render has the targets' parsing features.

    Args:
        imitator: ``g``, (B, D) → (B, 3, S, S) in [0, 1].
        parser: ``f`` with a ``features(images) -> list[Tensor]`` method.
        targets: (B, 3, S, S) photos in [0, 1], aligned to the rig's reference face.
        schema: the rig (layout of the flat vector).
        config: optimiser and stopping rule.
        start: (B, D) flat vectors to start from (one-hots snapped), e.g. the
            regressor's; None: the reference face.
        landmarks: (B, 68, 2) the targets' landmarks in their frame (pixels at
            side S), for the landmark term.
    """
    if targets.ndim != 4 or targets.shape[1] != 3:
        raise ValueError(f"expected targets of shape (B, 3, S, S), got {tuple(targets.shape)}")
    if start is not None and start.shape != (targets.shape[0], schema.vector_size):
        raise ValueError(f"expected start of shape ({targets.shape[0]}, {schema.vector_size}), "
                         f"got {tuple(start.shape)}")
    if landmarks is not None and landmarks.shape != (targets.shape[0], 68, 2):
        raise ValueError(f"expected landmarks of shape ({targets.shape[0]}, 68, 2), got {tuple(landmarks.shape)}")
    imitator.eval()
    parser.eval()
    # Gradients are for x only; the models' own flags are restored afterwards.
    weights = [w for module in (imitator, parser) for w in module.parameters()]
    flags = [w.requires_grad for w in weights]
    for weight in weights:
        weight.requires_grad_(False)
    try:
        return _optimise(imitator, parser, targets, schema, config, start, landmarks)
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)


def _optimise(imitator: nn.Module, parser: nn.Module, targets: torch.Tensor, schema: RigSchema,
              config: PinchConfig, start: torch.Tensor | None, landmarks: torch.Tensor | None) -> PinchResult:
    from facecore.losses import landmark_error
    from facecore.rig import geometry, reference_face

    unknown = sorted(set(config.hold) - set(schema.continuous_names))
    if unknown:
        raise ValueError(f"hold: {unknown} are not continuous parameters of rig {schema.name}")
    held = [schema.continuous_names.index(name) for name in config.hold]
    device = targets.device
    batch = targets.shape[0]
    with torch.no_grad():
        target_features = [t.detach() for t in parser.features(targets)]
    reference = torch.from_numpy(schema.reference_vector()).to(device=device, dtype=targets.dtype)
    pose = [schema.continuous_names.index(name) for name in geometry.POSE_NAMES if name in schema.continuous_names]
    use_landmarks = landmarks is not None and config.landmark_weight > 0
    if use_landmarks:
        side = targets.shape[-1]
        reference_points = torch.from_numpy(reference_face(side).landmarks).to(device=device, dtype=targets.dtype)
        landmarks = landmarks.to(device=device, dtype=targets.dtype)

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        shown = vector
        if config.frontal_imitator and pose:
            shown = vector.clone()
            shown[:, pose] = reference[pose]
        loss = config.feature_weight * feature_loss(parser.features(imitator(shown)), target_features)
        if config.prior_weight > 0:
            loss = loss + config.prior_weight * (vector[:, : schema.continuous_size] - centre).abs().mean(dim=1)
        if use_landmarks:
            points = geometry.landmarks(geometry.values_from_vector(vector, schema), side)
            loss = loss + config.landmark_weight * landmark_error(points, landmarks, reference_points)
        return loss

    start = reference.repeat(batch, 1) if start is None else start.to(device=device, dtype=targets.dtype).clone()
    fixed = start[:, held].clone()  # held parameters stay where they start
    centre = start[:, : schema.continuous_size].clone()  # where the prior pulls
    with torch.no_grad():
        loss_start = loss_of(start)
        if config.try_styles and config.search_styles:
            start, _ = _try_styles(loss_of, start, loss_start, schema)
    variables = _Parameters(schema, start, config)
    searched = [variables.continuous] + (list(variables.logits) if config.search_styles else [])
    optimiser = torch.optim.Adam(searched, lr=config.learning_rate)
    best = loss_start.clone()
    # The lowest loss each image reached and the variables that reached it: the
    # result is the best point of the search, not where the stop rule caught it.
    lowest = loss_start.clone()
    kept = [p.detach().clone() for p in variables.parameters()]
    stale = torch.zeros(batch, dtype=torch.long, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    active = loss_start > config.target_loss
    for step in range(config.max_iterations):
        if not bool(active.any()):
            break
        if config.decay:
            progress = step / max(config.max_iterations - 1, 1)
            for group in optimiser.param_groups:
                group["lr"] = config.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))
        frozen = [p.detach().clone() for p in variables.parameters()]
        optimiser.zero_grad(set_to_none=True)
        # Kept styles stay exact one-hots; searched ones are relaxed.
        losses = loss_of(variables.vector(snapped=not config.search_styles))
        losses.sum().backward()  # a sum, so each image's gradient is its own
        optimiser.step()
        with torch.no_grad():
            variables.continuous.clamp_(0.0, 1.0)  # the projection onto [0, 1]
            variables.continuous[:, held] = fixed
            for parameter, before in zip(variables.parameters(), frozen):
                parameter[~active] = before[~active]  # finished images stay put
            iterations += active.long()
            lower = (losses.detach() < lowest) & active  # measured at the variables before this step
            lowest = torch.where(lower, losses.detach(), lowest)
            for keep, before in zip(kept, frozen):
                keep[lower] = before[lower]
            improved = losses < best * (1.0 - config.min_improvement)
            best = torch.where(improved & active, losses.detach(), best)
            stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
            active &= (stale < config.patience) & (losses.detach() > config.target_loss)
    with torch.no_grad():
        for parameter, keep in zip(variables.parameters(), kept):
            parameter.copy_(keep)
        final = variables.vector(snapped=True)
        loss_end = loss_of(final)
        if config.try_styles and config.search_styles:
            final, loss_end = _try_styles(loss_of, final, loss_end, schema)
        # Snapping the styles can undo a gain: never return worse than the start.
        worse = loss_end > loss_start
        final = torch.where(worse[:, None], start, final)
        loss_end = torch.where(worse, loss_start, loss_end)
    params = final.detach().cpu().numpy().astype(np.float32)
    return PinchResult(
        params=params,
        values=[schema.decode(row) for row in params],
        loss_start=loss_start.cpu().numpy(),
        loss_end=loss_end.cpu().numpy(),
        iterations=iterations.cpu().numpy(),
    )


def _try_styles(loss_of: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor, losses: torch.Tensor,
                schema: RigSchema) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and group in turn, keep the choice with the lowest loss.

    A group's choice changes the render as a whole (a hair style, a beard), where
    gradients through a relaxed one-hot are a poor guide; trying each choice is
    exact and costs one batched forward pass per choice.
    """
    vectors, losses = vectors.clone(), losses.clone()
    for group in schema.discrete:
        block = schema.group_slice(group.name)
        for choice in range(group.size):
            candidate = vectors.clone()
            candidate[:, block] = 0.0
            candidate[:, block.start + choice] = 1.0
            candidate_losses = loss_of(candidate)
            better = candidate_losses < losses
            vectors[better] = candidate[better]
            losses = torch.where(better, candidate_losses, losses)
    return vectors, losses
