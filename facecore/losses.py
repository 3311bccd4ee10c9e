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
