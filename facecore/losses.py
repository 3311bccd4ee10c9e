"""Losses as pure functions (an ``nn.Module`` only where there is state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` per row: 0 for the same direction, 2 for opposite (SPEC.md §2, §3).

    Args:
        a: (B, D) embeddings, e.g. ``DlibResNet`` descriptors.
        b: (B, D) embeddings, or (D,) broadcast to every row.

    Returns:
        (B,) losses.
    """
    if a.ndim != 2 or b.shape[-1] != a.shape[-1]:
        raise ValueError(f"expected (B, D) and (B, D) or (D,) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    return 1.0 - F.cosine_similarity(a, b.expand_as(a), dim=1)


def affine_aligned(points: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each point set moved by its own least-squares affine fit onto ``reference``.

    The differentiable twin of the 68-point affine alignment photos go through
    (``alignment_matrix(..., "affine68")``): rig landmarks of predicted parameters,
    passed through it, land in the same frame as a photo's aligned landmarks.

    Args:
        points: (B, N, 2).
        reference: (N, 2) target points.

    Returns:
        (B, N, 2) aligned points.
    """
    design = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, N, 3)
    normal = design.transpose(1, 2) @ design  # (B, 3, 3)
    # A tiny ridge keeps degenerate (collinear) sets solvable; invisible otherwise.
    normal = normal + 1e-6 * torch.eye(3, dtype=points.dtype, device=points.device)
    solution = torch.linalg.solve(normal, design.transpose(1, 2) @ reference.to(points.dtype).expand_as(points))
    return design @ solution


def landmark_error(predicted: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-face mean landmark distance after affine alignment, over the reference's eye distance: (B,).

    ``predicted`` (B, 68, 2) is aligned onto ``reference`` (68, 2) first (see
    :func:`affine_aligned`); ``target`` (B, 68, 2) is already in the reference frame.
    """
    aligned = affine_aligned(predicted, reference)
    eyes = reference[36:42].mean(dim=0) - reference[42:48].mean(dim=0)
    return (aligned - target.to(aligned.dtype)).norm(dim=-1).mean(dim=-1) / eyes.norm()
