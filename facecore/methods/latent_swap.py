"""Face swap in latent space (SPEC.md §2, seed 002): swap, then tune a decoder copy per pair.

:func:`swap_faces` encodes both faces, takes the identity layers from the source
and the rest from the target, and decodes the mix. With tuning on, each pair
then gets its own copy of the decoder, trained on ``L_id + L_att`` (its swap
against its source's dlib descriptor and its target's MobileNetV2 levels) until
both pass their thresholds or the step cap is reached: the seed's per-image
refinement, which keeps the encoder's code and moves the decoder to fit. The
mask D draws is kept as the trained decoder draws it: tuning changes what D
paints and how it moves the target, not where it pastes.

The copies are tuned together: the decoder's parameters are stacked along a
leading pair axis and run through ``torch.func.vmap(functional_call(...))``, so
one batched forward and backward serves every pair still tuning (a GPU actor
tunes its whole batch at once). Each pair has its own Adam state and step
count; a pair that passes leaves the batch and keeps the weights it passed
with, so a pair's result does not depend on which others share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from facecore.models.latent import LatentSwapper, composite, mix_layers
from facecore.training.swap import SwapCritics, attribute_distance, identity_distance


@dataclass(frozen=True)
class TuneConfig:
    """Per-pair decoder tuning (``options.tune`` of a swap job).

    Attributes:
        max_steps: Adam steps at most per pair; 0 turns tuning off.
        id_threshold: a pair passes once its ``L_id = 1 − cos`` is at most this...
        att_threshold: ...and its ``L_att`` at most this.
        learning_rate: Adam's step size on the decoder copy.
    """

    max_steps: int = 30
    id_threshold: float = 0.05
    att_threshold: float = 0.5
    learning_rate: float = 2e-3

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.learning_rate <= 0:
            raise ValueError(f"max_steps must be >= 0 and learning_rate > 0, got {self.max_steps}, "
                             f"{self.learning_rate}")


@dataclass
class SwapResult:
    """What :func:`swap_faces` gives for B pairs.

    Attributes:
        images: (B, 3, S, S) swaps in [0, 1], in the target's frame.
        tune_steps: (B,) Adam steps each pair's decoder copy took (0: untuned).
        identity_loss: (B,) the final ``L_id`` (NaN without an identity critic).
        attribute_loss: (B,) the final ``L_att``.
    """

    images: torch.Tensor
    tune_steps: torch.Tensor
    identity_loss: torch.Tensor
    attribute_loss: torch.Tensor


_BETAS, _EPS = (0.9, 0.999), 1e-8


def _pair_losses(decoder: nn.Module, params: dict[str, torch.Tensor], codes: torch.Tensor, masks: torch.Tensor,
                 targets: torch.Tensor, prior: torch.Tensor | None, source: torch.Tensor | None,
                 target_features: list[torch.Tensor], target_landmarks: torch.Tensor,
                 source_embeddings: torch.Tensor | None,
                 critics: SwapCritics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each pair's swap through its own decoder copy, and its L_id and L_att: (A, 3, S, S), (A,), (A,).
    ``masks``: (A, 1, S, S) the untuned decoder's masks, which the copies paint through."""

    def one(pair_params: dict[str, torch.Tensor], code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, placement = functional_call(decoder, pair_params, (code[None],), {"placed": True})
        return image[0], placement[0]

    painted, placement = vmap(one)(params, codes)
    # The mask stays where the trained D put it. A copy's own mask moves with every weight
    # its levels share, and a few steps spread the painting over the face (dark blots on
    # photos). Tuning refines what D paints inside the mask, the flow, and how much of
    # the source layer shows (L_id opens that gate, L_att holds it back).
    images = composite(painted, torch.cat([masks, placement[:, 1:]], dim=1), targets, prior, source)
    attribute = attribute_distance(critics.features(images), target_features)
    if source_embeddings is None:
        identity = torch.full_like(attribute, float("nan"))
    else:
        identity = identity_distance(critics, images, target_landmarks, source_embeddings)
    return images, identity, attribute


def tune_decoders(decoder: nn.Module, codes: torch.Tensor, targets: torch.Tensor, target_landmarks: torch.Tensor,
                  source_embeddings: torch.Tensor | None, critics: SwapCritics, config: TuneConfig,
                  prior: torch.Tensor | None = None, source: torch.Tensor | None = None,
                  rendered: torch.Tensor | None = None) -> SwapResult:
    """Tune one decoder copy per pair on ``L_id + L_att`` until both pass or ``config.max_steps``.

    A pair's objective is how far each loss still is above its threshold
    (``max(0, L_id − id_threshold) + max(0, L_att − att_threshold)``): a loss that
    passes stops pulling, so L_att, which always prefers the target itself, does not
    undo the identity once it is within its threshold, and the reverse.

    Args:
        decoder: the trained D (left unchanged).
        codes: (B, n, L) the pairs' mixed codes.
        targets: (B, 3, S, S) the target crops in [0, 1] (L_att's reference).
        target_landmarks: (B, 68, 2) in crop pixels (where L_id cuts its chips).
        source_embeddings: (B, 128) the sources' dlib descriptors; None: L_att alone decides.
        critics: the frozen measuring networks.
        config: steps, thresholds, learning rate.
        prior: (B, 2, S, S) the landmark warps the swaps' flows start from (None: none).
        source: (B, 4, S, S) the source layers (:func:`source_layers`; None: none).
        rendered: (B,) bool, the targets that are rig renders: their L_id is reported and not
            tuned on (dlib tells the rig's faces apart no better than 1 − cos ≈ 0.06, and an
            avatar's identity is its rig parameters, which the prior warp already carries).

    Returns:
        The swaps of the final copies and, per pair, its steps and final losses.
    """
    count = len(codes)
    base = {name: value.detach() for name, value in decoder.named_parameters()}
    params = {name: value[None].repeat(count, *[1] * value.ndim).clone() for name, value in base.items()}
    first = {name: torch.zeros_like(value) for name, value in params.items()}
    second = {name: torch.zeros_like(value) for name, value in params.items()}
    steps = torch.zeros(count, dtype=torch.int64)
    images = torch.empty_like(targets)
    identity_loss = torch.full((count,), float("nan"), dtype=targets.dtype)
    attribute_loss = torch.full((count,), float("nan"), dtype=targets.dtype)
    with torch.no_grad():
        target_features = [level.detach() for level in critics.features(targets)]
        masks = decoder(codes, placed=True)[1][:, :1]
    active = torch.arange(count)
    # Step 0 measures the untuned swap; after step k's update comes step k+1's measurement.
    for step in range(config.max_steps + 1):
        rows = active.to(codes.device)
        current = {name: value[rows].requires_grad_(True) for name, value in params.items()}
        grad_enabled = step < config.max_steps
        with torch.set_grad_enabled(grad_enabled):
            swaps, identity, attribute = _pair_losses(
                decoder, current, codes[rows], masks[rows], targets[rows], None if prior is None else prior[rows],
                None if source is None else source[rows], [level[rows] for level in target_features],
                target_landmarks[rows], None if source_embeddings is None else source_embeddings[rows], critics)
        images[rows] = swaps.detach()
        identity_loss[active] = identity.detach().cpu()
        attribute_loss[active] = attribute.detach().cpu()
        excess = (attribute - config.att_threshold).clamp_min(0.0)
        if source_embeddings is not None:
            judged = (~rendered.cpu()[active]).to(identity.device, identity.dtype) if rendered is not None \
                else torch.ones_like(identity)  # indexed on the CPU: `rendered` may not be on D's device
            excess = excess + (identity - config.id_threshold).clamp_min(0.0) * judged
        passed = excess.detach() <= 0.0
        if not grad_enabled:
            break
        tuning = ~passed.cpu()
        if not bool(tuning.any()):
            break
        # Only the pairs still tuning take this step; their losses are independent sums, so
        # one backward gives each copy its own gradient.
        objective = excess[tuning.to(excess.device)].sum()
        gradients = torch.autograd.grad(objective, list(current.values()))
        active, keep = active[tuning], tuning.nonzero().flatten()
        rows = active.to(codes.device)
        steps[active] += 1
        count_t = steps[active].to(codes.device, torch.float32)
        correction1 = 1.0 - _BETAS[0] ** count_t
        correction2 = 1.0 - _BETAS[1] ** count_t
        with torch.no_grad():
            for (name, value), gradient in zip(params.items(), gradients):
                gradient = gradient[keep.to(gradient.device)]
                shape = (-1,) + (1,) * (value.ndim - 1)
                m = first[name][rows].mul_(_BETAS[0]).add_(gradient, alpha=1.0 - _BETAS[0])
                v = second[name][rows].mul_(_BETAS[1]).addcmul_(gradient, gradient, value=1.0 - _BETAS[1])
                first[name][rows], second[name][rows] = m, v
                update = (m / correction1.view(shape)) / ((v / correction2.view(shape)).sqrt() + _EPS)
                value[rows] = value[rows] - config.learning_rate * update
    return SwapResult(images, steps, identity_loss, attribute_loss)


def swap_faces(swapper: LatentSwapper, sources: torch.Tensor, source_landmarks: torch.Tensor,
               targets: torch.Tensor, target_landmarks: torch.Tensor, critics: SwapCritics | None,
               tune: TuneConfig = TuneConfig(), identity_layers: tuple[int, ...] | None = None,
               prior: torch.Tensor | None = None, source: torch.Tensor | None = None,
               rendered: torch.Tensor | None = None) -> SwapResult:
    """The swap of B pairs of aligned crops, tuned per pair when ``tune.max_steps > 0``.

    Args:
        swapper: the trained E and D.
        sources, targets: (B, 3, S, S) crops in [0, 1] at the model's side.
        source_landmarks, target_landmarks: (B, 68, 2) in those crops' pixels.
        critics: the measuring networks (needed to tune and to report the losses; None: neither).
        tune: the tuning's step cap, thresholds and learning rate.
        identity_layers: overrides the model's identity layers.
        prior: (B, 2, S, S) the landmark warps of the targets to the sources' face shapes
            (:func:`prior_flows`); None: none.
        source: (B, 4, S, S) the source layers (:func:`source_layers`); None: none.
        rendered: (B,) bool, the targets that are rig renders (:func:`tune_decoders`); None: none.
    """
    layers = swapper.config.identity_layers if identity_layers is None else tuple(identity_layers)
    with torch.no_grad():
        codes = swapper.encoder(torch.cat([sources, targets]))
        source_codes, target_codes = codes.chunk(2)
        mixed = mix_layers(source_codes, target_codes, layers)
        source_embeddings = None
        if critics is not None and critics.identity is not None:
            source_embeddings = critics.identity.embed(sources * 255.0, source_landmarks.cpu().numpy())
    if critics is None:
        with torch.no_grad():
            images = composite(*swapper.decoder(mixed, placed=True), targets, prior, source)
        nan = torch.full((len(images),), math.nan)
        return SwapResult(images, torch.zeros(len(images), dtype=torch.int64), nan, nan.clone())
    return tune_decoders(swapper.decoder, mixed, targets, target_landmarks, source_embeddings, critics, tune, prior,
                         source, rendered)


def prior_flows(target_landmarks: np.ndarray, swapped_landmarks: np.ndarray, size: int) -> torch.Tensor:
    """(B, 2, S, S) warps, in grid units, that move each target's face onto ``swapped_landmarks``
    (its landmarks with the source's face shape, :func:`swapped_landmarks`) and leave the rest be
    (:func:`facecore.methods.landmark_warp.face_warp_maps`, fading over 4 % of the side)."""
    from facecore.methods.landmark_warp import face_warp_maps

    pixels_y, pixels_x = np.mgrid[0:size, 0:size].astype(np.float32)
    flows = []
    for before, after in zip(np.asarray(target_landmarks), np.asarray(swapped_landmarks)):
        map_x, map_y = face_warp_maps(before, after, size, size, 0.04 * size)
        flows.append(np.stack([map_x - pixels_x, map_y - pixels_y]) * (2.0 / (size - 1)))
    return torch.from_numpy(np.stack(flows).astype(np.float32))


def swapped_landmarks(target_landmarks: np.ndarray, target_vectors: torch.Tensor, source_vectors: torch.Tensor,
                      schema, size: int) -> np.ndarray:
    """Each target's landmarks moved as the rig moves them when its identity becomes the source's:
    (B, 68, 2) in the target crop's pixels. ``*_vectors``: the regressor's rig vectors."""
    from facecore.methods.expression_transfer import moved_landmarks

    identity = torch.from_numpy(schema.indices("identity"))
    return moved_landmarks(target_landmarks, target_vectors, "identity", source_vectors[:, identity], schema, size)


def source_layers(sources: torch.Tensor, source_landmarks: np.ndarray, targets: torch.Tensor,
                  swapped: np.ndarray, feather: float = 0.03) -> torch.Tensor:
    """The source layers :func:`facecore.models.latent.composite` shows under D's gate: (B, 4, S, S).

    Each source's face is warped piecewise-affinely onto the swap's landmarks in its
    target's frame (its own features in the source's face shape and the target's
    pose), its colours matched to the target's skin there (Lab, as the landmark swap
    does), with an alpha of the face's hull, shrunk and feathered by ``feather`` of
    the side so that the gate never shows the source's hair, background or crop edge.

    Args:
        sources, targets: (B, 3, S, S) crops in [0, 1].
        source_landmarks: (B, 68, 2) the sources' landmarks in their crops' pixels.
        swapped: (B, 68, 2) the swaps' landmarks in the targets' crops (:func:`swapped_landmarks`).
    """
    import cv2

    from facecore.methods.landmark_swap import face_mask, match_colours
    from facecore.methods.landmark_warp import piecewise_affine_maps

    size = targets.shape[-1]
    as_pixels = lambda images: (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
    layers = []
    for source, points, target, place in zip(as_pixels(sources), np.asarray(source_landmarks, np.float64),
                                             as_pixels(targets), np.asarray(swapped, np.float64)):
        map_x, map_y = piecewise_affine_maps(points, place, size, size)
        moved = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        hull = face_mask(place, size, size, shrink=0.08)
        moved = match_colours(moved, target, hull)
        alpha = cv2.GaussianBlur(hull.astype(np.float32) / 255.0, (0, 0), feather * size)
        layers.append(np.concatenate([moved.astype(np.float32) / 255.0, alpha[..., None]], axis=2))
    return torch.from_numpy(np.stack(layers)).permute(0, 3, 1, 2).contiguous().to(targets.device)


def regressed_guides(regressor, schema, sources: torch.Tensor, source_landmarks: torch.Tensor,
                     targets: torch.Tensor, target_landmarks: torch.Tensor,
                     rendered: list[np.ndarray | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a swap is composited with, from the face shapes the regressor finds: the prior warp
    (:func:`prior_flows`, (B, 2, S, S)) and the source layers (:func:`source_layers`, (B, 4, S, S)).

    A target that is a rig render (a game avatar) comes with the rig vector it was drawn
    with (``rendered[i]``), used instead of the regressor's estimate. Its source layer is
    empty (alpha 0): an avatar's identity is its rig's identity parameters, its face
    shape, and its skin and style stay the avatar's; a photo's skin on it would not be a
    swap but a pasted photo.

    Args:
        regressor: the recognize job's regressor (rig vectors from aligned crops).
        schema: its rig.
        sources, targets: (B, 3, S, S) aligned crops in [0, 1].
        source_landmarks, target_landmarks: (B, 68, 2) in those crops' pixels.
        rendered: per pair, the target's rig vector when it is a render, else None.
    """
    import torch.nn.functional as F

    size, side = sources.shape[-1], regressor.config.image_size

    def vectors(images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        if side != size:
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                                   antialias=side < size)
        return regressor.vectors(images, points * (side / size))[0]

    with torch.inference_mode():
        source_vectors, target_vectors = vectors(sources, source_landmarks), vectors(targets, target_landmarks)
    target_vectors = target_vectors.detach().float().cpu().clone()
    known = [i for i, vector in enumerate(rendered or []) if vector is not None]
    for i in known:
        target_vectors[i] = torch.as_tensor(np.asarray(rendered[i], np.float32)[:target_vectors.shape[1]])
    points = target_landmarks.detach().cpu().numpy()
    moved = swapped_landmarks(points, target_vectors, source_vectors, schema, size)
    prior = prior_flows(points, moved, size).to(sources.device)
    layers = source_layers(sources, source_landmarks.detach().cpu().numpy(), targets, moved)
    layers[known, 3] = 0.0
    return prior, layers
