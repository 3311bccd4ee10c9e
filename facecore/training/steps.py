"""Training steps for the imitator and the face parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from facecore.face.parsing_mask import UNKNOWN as IGNORE  # pixels of unknown class (real photos)


@dataclass(frozen=True)
class StepConfig:
    """Loss weights shared by the steps.

    Attributes:
        grad_clip: clip the gradient norm at this value (0 = off).
        colour_jitter: parser only: per-image channel gain spread (±half of it) and
            brightness shift spread, so the parser keys on shapes rather than on
            the rig's palette, which real photos do not share (0 = off).
    """

    grad_clip: float = 5.0
    colour_jitter: float = 0.3


def _optimise(model: nn.Module, optimiser: torch.optim.Optimizer, loss: torch.Tensor, cfg: StepConfig) -> None:
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimiser.step()


def imitator_step(models: Mapping[str, nn.Module], opts: Mapping[str, torch.optim.Optimizer],
                  batch: Mapping[str, torch.Tensor], cfg: StepConfig = StepConfig()) -> dict[str, float]:
    """One update of ``g`` with SPEC.md §4's L1 loss ``||g(x) - render(x)||_1``.

    Batch: ``params`` (B, D) in [0, 1], ``image`` (B, 3, S, S) in [0, 1].
    """
    imitator = models["imitator"]
    imitator.train()
    loss = F.l1_loss(imitator(batch["params"]), batch["image"])
    _optimise(imitator, opts["imitator"], loss, cfg)
    return {"l1": float(loss.detach())}


def parser_step(models: Mapping[str, nn.Module], opts: Mapping[str, torch.optim.Optimizer],
                batch: Mapping[str, torch.Tensor], cfg: StepConfig = StepConfig()) -> dict[str, float]:
    """One update of ``f`` with per-pixel cross-entropy; mask value 255 is ignored.

    Batch: ``image`` (B, 3, S, S) in [0, 1], ``mask`` (B, S, S) int64 class indices.
    """
    parser = models["parser"]
    parser.train()
    images = jitter_colours(batch["image"], cfg.colour_jitter) if cfg.colour_jitter > 0 else batch["image"]
    loss = F.cross_entropy(parser(images), batch["mask"], ignore_index=IGNORE)
    _optimise(parser, opts["parser"], loss, cfg)
    return {"cross_entropy": float(loss.detach())}


def jitter_colours(images: torch.Tensor, spread: float) -> torch.Tensor:
    """Random per-image channel gains in 1 ± spread/2 and a brightness shift in ±spread/3."""
    batch = images.shape[0]
    gains = 1.0 + spread * (torch.rand(batch, 3, 1, 1, device=images.device) - 0.5)
    shifts = (2.0 * spread / 3.0) * (torch.rand(batch, 1, 1, 1, device=images.device) - 0.5)
    return (images * gains + shifts).clamp(0.0, 1.0)


@torch.no_grad()
def imitator_eval(imitator: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    imitator.eval()
    return {"l1": float(F.l1_loss(imitator(batch["params"]), batch["image"]))}


@torch.no_grad()
def parser_eval(parser: nn.Module, batch: Mapping[str, torch.Tensor], num_classes: int) -> dict[str, float]:
    """Mean IoU over classes present in the batch, ignoring pixels marked 255."""
    parser.eval()
    predicted = parser(batch["image"]).argmax(dim=1)
    mask = batch["mask"]
    known = mask != IGNORE
    ious = []
    for cls in range(num_classes):
        truth, guess = (mask == cls) & known, (predicted == cls) & known
        union = (truth | guess).sum()
        if truth.any():
            ious.append(float((truth & guess).sum()) / float(union))
    return {"miou": sum(ious) / max(len(ious), 1)}
