"""The regressor ``R``: an aligned face → game-face parameters in one pass (SPEC.md §3).

Inputs are what the align stage produces for every photo: the crop aligned onto
the rig's reference face (``image_size``, 128 px by default) and the face's 68
landmarks in that crop. Three sets of features feed one MLP head:

- ``F_seg``, the face parser (the seed's feature extractor), run at the size it
  was trained at: each encoder stage averaged over space, plus, per parsing class,
  its area and mean colour under the parser's soft labels (the geometry and
  per-region colour SPEC.md §3.6 found carry most parameters);
- a small strided CNN on the full-resolution crop, for what 64 px cannot show
  (bench/rig_visibility.py: seven parameters are invisible at 64, three at 128);
- the landmarks, as offsets from the reference face's, which pin down the shape
  parameters directly whatever the lighting or colours.

Outputs: continuous parameters in [0, 1] (sigmoid) and one logit vector per
discrete style group; :meth:`Regressor.vectors` turns them into flat rig vectors
with each group snapped to its most likely choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from facecore.models.layers import group_norm
from facecore.models.parsing import FaceParser, ParsingConfig


@dataclass(frozen=True)
class RegressorConfig:
    """Shape of the regressor.

    Attributes:
        continuous_size: continuous parameters of the rig.
        style_sizes: choices per discrete style group, in schema order.
        image_size: side of the aligned crops it takes.
        reference_landmarks: the rig's reference face's 68 points in a frame of
            ``image_size`` (flattened x0, y0, x1, ...); landmarks enter as offsets from them.
        parser_size: side the parser runs at (what it was trained at).
        parser_base_channels, parser_stages, parser_blocks, parser_classes: the parser's shape.
        cnn_channels: channels of the full-resolution CNN's first stage (doubled per
            stage up to 8x); 0 leaves the CNN out.
        hidden: width of the head's hidden layers.
    """

    continuous_size: int
    style_sizes: tuple[int, ...]
    reference_landmarks: tuple[float, ...]
    image_size: int = 128
    parser_size: int = 64
    parser_base_channels: int = 16
    parser_stages: int = 4
    parser_blocks: int = 1
    parser_classes: int = 11
    cnn_channels: int = 16
    hidden: int = 512

    def __post_init__(self) -> None:
        if len(self.reference_landmarks) != 136:
            raise ValueError(f"reference_landmarks must hold 68 (x, y) pairs, got {len(self.reference_landmarks)}")
        if self.image_size % 32 or self.parser_size % 2 ** self.parser_stages:
            raise ValueError(f"image_size must be a multiple of 32 and parser_size of {2 ** self.parser_stages}")

    @property
    def parsing(self) -> ParsingConfig:
        return ParsingConfig(num_classes=self.parser_classes, base_channels=self.parser_base_channels,
                             stages=self.parser_stages, blocks_per_stage=self.parser_blocks)


def _down(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False), group_norm(channels),
                         nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         group_norm(channels), nn.ReLU(inplace=True))


class Regressor(nn.Module):
    """(B, 3, S, S) aligned crops in [0, 1] + (B, 68, 2) landmarks in pixels → parameters."""

    def __init__(self, config: RegressorConfig) -> None:
        super().__init__()
        self.config = config
        self.parser = FaceParser(config.parsing)
        self.register_buffer("reference", torch.tensor(config.reference_landmarks, dtype=torch.float32).view(68, 2))
        widths = [config.parser_base_channels * 2 ** (i + 1) for i in range(config.parser_stages)]
        features = sum(widths) + 4 * config.parser_classes + 136
        if config.cnn_channels > 0:
            channels = [config.cnn_channels * min(2 ** i, 8) for i in range(5)]
            self.cnn = nn.Sequential(_down(3, channels[0]), *[_down(a, b) for a, b in zip(channels, channels[1:])])
            features += channels[-1] * 5  # global average + a 2x2 grid
        else:
            self.cnn = None
        # Features of very different kinds and scales, standardised with fixed
        # statistics of the training data (see calibrate). Each output is an MLP
        # of them plus a linear map of them: the linear path learns the
        # near-linear landmark → shape relations in few steps.
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_std", torch.ones(features))
        self.head = nn.Sequential(nn.Linear(features, config.hidden), nn.ReLU(inplace=True),
                                  nn.Linear(config.hidden, config.hidden), nn.ReLU(inplace=True))
        outputs = config.continuous_size + sum(config.style_sizes)
        self.out = nn.Linear(config.hidden, outputs)
        self.linear = nn.Linear(features, outputs)

    def load_parser(self, parser: FaceParser) -> None:
        """Start ``F_seg`` from a trained parser (the shipped preset, usually)."""
        if parser.config != self.config.parsing:
            raise ValueError(f"parser shape {parser.config} differs from the regressor's {self.config.parsing}")
        self.parser.load_state_dict(parser.state_dict())

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, landmarks: torch.Tensor) -> None:
        """Set the feature standardisation from a sample of training inputs (a few hundred faces)."""
        features = self.features(images, landmarks)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(1e-3))

    def features(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if landmarks.shape != (images.shape[0], 68, 2):
            raise ValueError(f"expected landmarks of shape ({images.shape[0]}, 68, 2), got {tuple(landmarks.shape)}")
        small = images if self.config.parser_size == size else F.interpolate(
            images, size=self.config.parser_size, mode="bilinear", antialias=True, align_corners=False)
        stages = self.parser.encode(small)
        pooled = [stage.mean(dim=(2, 3)) for stage in stages[1:]]
        probabilities = torch.softmax(self._parse(stages), dim=1)  # (B, K, s, s)
        area = probabilities.mean(dim=(2, 3))  # (B, K)
        colour = torch.einsum("bkhw,bchw->bkc", probabilities, small) / (area[..., None] * small.shape[2] ** 2 + 1e-4)
        offsets = (landmarks.to(images.dtype) - self.reference) / size * 8.0  # about unit scale
        parts = pooled + [area, colour.flatten(1), offsets.flatten(1)]
        if self.cnn is not None:
            grid = self.cnn(images)
            parts += [grid.mean(dim=(2, 3)), F.adaptive_avg_pool2d(grid, 2).flatten(1)]
        return torch.cat(parts, dim=1)

    def _parse(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """The parser's decoder on features already encoded (the same as ``parser(small)``)."""
        x = stages[-1]
        for block, skip in zip(self.parser.decoder, reversed(stages[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.parser.classify(x)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (continuous (B, C) in [0, 1], [style logits (B, n_g) per group])."""
        features = (self.features(images, landmarks) - self.feature_mean) / self.feature_std
        outputs = self.out(self.head(features)) + self.linear(features)
        continuous, styles = outputs.split([self.config.continuous_size, sum(self.config.style_sizes)], dim=1)
        return torch.sigmoid(continuous), list(styles.split(list(self.config.style_sizes), dim=1))

    @staticmethod
    def soft_vectors(continuous: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """Flat rig vectors with each style group as its softmax (differentiable)."""
        return torch.cat([continuous] + [torch.softmax(block, dim=1) for block in logits], dim=1)

    @torch.no_grad()
    def vectors(self, images: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat rig vectors, styles snapped to their argmax, and (B, groups) style confidences."""
        continuous, logits = self(images, landmarks)
        blocks, confidence = [continuous], []
        for block in logits:
            probabilities = torch.softmax(block, dim=1)
            blocks.append(F.one_hot(block.argmax(dim=1), block.shape[1]).to(continuous.dtype))
            confidence.append(probabilities.max(dim=1).values)
        stacked = torch.stack(confidence, dim=1) if confidence else continuous.new_zeros(len(continuous), 0)
        return torch.cat(blocks, dim=1), stacked


def regressor_for_rig(schema, parser: FaceParser | None = None, **shape) -> Regressor:
    """A regressor sized for ``schema``, ``F_seg`` taken from ``parser`` when given."""
    from facecore.rig import reference_face

    size = shape.get("image_size", 128)
    config = RegressorConfig(
        continuous_size=schema.continuous_size, style_sizes=tuple(g.size for g in schema.discrete),
        reference_landmarks=tuple(float(v) for v in reference_face(size).landmarks.ravel()),
        **({} if parser is None else {"parser_base_channels": parser.config.base_channels,
                                      "parser_stages": parser.config.stages,
                                      "parser_blocks": parser.config.blocks_per_stage,
                                      "parser_classes": parser.config.num_classes}),
        **shape)
    model = Regressor(config)
    if parser is not None:
        model.load_parser(parser)
    return model
