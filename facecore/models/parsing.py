"""The face-parsing network ``f`` (SPEC.md §4's feature extractor, §3's ``F_seg``).

A small residual encoder-decoder (U-Net-like) trained to label the 11 Helen
classes per pixel. Its encoder features at several depths are what pinch
compares (``||f(g(x)) - f(I)||_1``): they describe a face's parts and shapes while
ignoring much of the colour and lighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from facecore.models.layers import group_norm


@dataclass(frozen=True)
class ParsingConfig:
    """Shape of the parser.

    Attributes:
        num_classes: output classes (11 for Helen).
        base_channels: channels after the stem; doubled per encoder stage.
        stages: encoder stages, each halving the side.
        blocks_per_stage: residual blocks per stage.
    """

    num_classes: int = 11
    base_channels: int = 16
    stages: int = 4
    blocks_per_stage: int = 1


class _Residual(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = group_norm(channels)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == channels else
                         nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                       group_norm(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class FaceParser(nn.Module):
    """(B, 3, S, S) RGB in [0, 1] → (B, num_classes, S, S) logits, plus multi-depth features."""

    def __init__(self, config: ParsingConfig = ParsingConfig()) -> None:
        super().__init__()
        self.config = config
        width = config.base_channels
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), group_norm(width),
                                  nn.ReLU(inplace=True))
        self.encoder = nn.ModuleList()
        widths = [width]
        for _ in range(config.stages):
            blocks = [_Residual(widths[-1], widths[-1] * 2, stride=2)]
            blocks += [_Residual(widths[-1] * 2, widths[-1] * 2, 1) for _ in range(config.blocks_per_stage - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            widths.append(widths[-1] * 2)
        self.decoder = nn.ModuleList(
            _Residual(widths[i + 1] + widths[i], widths[i], 1) for i in reversed(range(config.stages)))
        self.classify = nn.Conv2d(width, config.num_classes, 1)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features from shallow to deep: the stem, then each stage."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        side = 2 ** self.config.stages
        if images.shape[2] % side or images.shape[3] % side:
            raise ValueError(f"image sides must be multiples of {side}, got {tuple(images.shape[2:])}")
        x = self.stem((images - self.mean) / self.std)
        features = [x]
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        return features

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The multi-depth features pinch compares (every stage after the stem)."""
        return self.encode(images)[1:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encode(images)
        x = features[-1]
        for block, skip in zip(self.decoder, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.classify(x)
