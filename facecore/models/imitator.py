"""The imitator ``g(x)``: rig parameters → rendered face (SPEC.md §3, §4).

A deep deconvolution network (DCGAN-style generator): a linear map to a 4x4 grid,
then transposed convolutions doubling the side up to ``image_size``. It learns the
game renderer from (random parameters, render) pairs so that gradients can flow
from an image loss back to the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from facecore.models.layers import group_norm


@dataclass(frozen=True)
class ImitatorConfig:
    """Shape of the imitator.

    Attributes:
        param_dim: length of the rig's flat vector (``RigSchema.vector_size``).
        image_size: output side, a power of two from 16 to 512.
        base_channels: channels at the output resolution; doubled per level up to
            ``max_channels`` towards the 4x4 start.
        max_channels: cap on channels per layer.
    """

    param_dim: int
    image_size: int = 64
    base_channels: int = 32
    max_channels: int = 256

    def __post_init__(self) -> None:
        levels = math.log2(self.image_size / 4)
        if self.image_size < 16 or self.image_size > 512 or levels != int(levels):
            raise ValueError(f"image_size must be a power of two in [16, 512], got {self.image_size}")
        if self.param_dim < 1:
            raise ValueError(f"param_dim must be positive, got {self.param_dim}")


class Imitator(nn.Module):
    """``g``: (B, param_dim) in [0, 1] → (B, 3, S, S) RGB in [0, 1]."""

    def __init__(self, config: ImitatorConfig) -> None:
        super().__init__()
        self.config = config
        levels = int(math.log2(config.image_size / 4))
        widths = [min(config.max_channels, config.base_channels * 2 ** (levels - i)) for i in range(levels + 1)]
        self.project = nn.Sequential(nn.Linear(config.param_dim, widths[0] * 16), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for i in range(levels):
            layers += [
                nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1, bias=False),
                group_norm(widths[i + 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(widths[i + 1], widths[i + 1], 3, padding=1, bias=False),
                group_norm(widths[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.upsample = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)
        self._start = widths[0]

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        """Args:
            params: (B, param_dim) rig vectors in [0, 1].

        Returns:
            (B, 3, image_size, image_size) images in [0, 1].
        """
        if params.ndim != 2 or params.shape[1] != self.config.param_dim:
            raise ValueError(f"expected params of shape (B, {self.config.param_dim}), got {tuple(params.shape)}")
        x = self.project(params).view(-1, self._start, 4, 4)
        return torch.sigmoid(self.to_rgb(self.upsample(x)))
