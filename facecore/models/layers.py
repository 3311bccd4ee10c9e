"""Small building blocks shared by the model families."""

from __future__ import annotations

from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """The normalisation every facejobs generator and parser uses.

    Group norm, not batch norm: training and evaluation compute the same thing (no
    running statistics lagging behind a short CPU preset), DDP workers need no
    syncing, and one image's output never depends on the rest of its batch (which
    the batched pinch optimiser relies on).
    """
    return nn.GroupNorm(min(8, channels), channels)
