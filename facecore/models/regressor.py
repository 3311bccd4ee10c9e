"""The regressor ``R``: an aligned face → game-face parameters in one pass (SPEC.md §3).

Inputs are what the align stage produces for every photo: the crop aligned onto
the rig's reference face (``image_size``, 128 px by default) and the face's 68
landmarks in that crop. Three sets of features feed one MLP head:

- ``F_seg``, the face parser's encoder (the seed's feature extractor), run at
  the size it was trained at, each stage averaged over space;
- a small strided CNN on the full-resolution crop, for what 64 px cannot show
  (bench/rig_visibility.py: seven parameters are invisible at 64, three at 128);
- the landmarks, as offsets from the reference face's, which pin down the shape
  parameters directly whatever the lighting or colours;
- what the landmarks point at (:func:`landmark_samples`): each brow sampled in a
  strip along it at full resolution (the brow styles differ by a pixel or two of
  outline at 128 px, which global pooling averages away), and the colour at
  fixed places of the face (cheeks, forehead, hair above and beside the head,
  chin, upper lip, lips, eyes, background), which carry the appearance, hair
  and beard. They replace the parser's per-class areas and colours, whose
  decoder cost more than half of the whole forward pass.

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


# Places sampled for their colour, each on the line through two landmarks a, b:
# (a, b, t) is a + t (b - a); t < 0 lies beyond a, away from b.
_COLOUR_PLACES: tuple[tuple[int, int, float], ...] = (
    (1, 29, 0.5), (15, 29, 0.5),        # cheeks
    (27, 30, -1.2), (27, 30, -2.2),     # forehead, hairline
    (27, 30, -3.2),                     # hair on top
    (0, 16, -0.12), (16, 0, -0.12),     # beside the temples: hair or background
    (3, 13, -0.15), (13, 3, -0.15),     # beside the jaw: long hair or background
    (8, 57, -0.8),                      # under the chin: neck, long beard
    (8, 57, 0.5), (5, 48, 0.5), (11, 54, 0.5),  # chin and jaw: beard
    (33, 51, 0.5),                      # upper lip: moustache
    (51, 62, 0.5), (57, 66, 0.5), (62, 66, 0.5),  # lips, mouth
    (37, 40, 0.5), (43, 46, 0.5),       # eyes
    (28, 30, 0.5),                      # nose
)
_BROW_ALONG, _BROW_ACROSS = 9, 9
_LUMINANCE = torch.tensor([0.299, 0.587, 0.114])
LANDMARK_SAMPLES = 3 * (len(_COLOUR_PLACES) + 2) + 2 * _BROW_ALONG * _BROW_ACROSS


def place_colours(images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """(B, 3, P) mean colours (over about 5x5 px at 128) at ``_COLOUR_PLACES`` and two background corners.

    ``landmarks`` are in the pixels of ``images``, whatever their side: the places
    and the spread of the samples scale with it.
    """
    batch, width = images.shape[0], images.shape[3]
    ends = torch.tensor([place[:2] for place in _COLOUR_PLACES], device=landmarks.device)
    t = landmarks.new_tensor([place[2] for place in _COLOUR_PLACES])[None, :, None]
    a, b = landmarks[:, ends[:, 0]], landmarks[:, ends[:, 1]]
    unit = width / 128.0
    corners = landmarks.new_tensor([[4.0, 4.0], [123.0, 4.0]]).mul(unit).expand(batch, 2, 2)
    places = torch.cat([a + t * (b - a), corners], dim=1)  # (B, P, 2)
    # The mean of a 3x3 grid of samples 2 px apart, not a blurred copy of the image: as steady, a tenth the work.
    spread = torch.stack(torch.meshgrid(*[torch.tensor([-2.0, 0.0, 2.0])] * 2, indexing="xy"), dim=-1).view(9, 2)
    around = places[:, :, None] + spread.to(places) * unit  # (B, P, 9, 2)
    return _sample(images, around).view(batch, 3, -1, 9).mean(dim=3)


def _sample(images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``images`` at ``points`` (B, ..., 2) in pixels: (B, 3, N) flattened over the points."""
    batch, _, height, width = images.shape
    grid = (points + 0.5) * points.new_tensor([2.0 / width, 2.0 / height]) - 1.0  # pixel centres
    return F.grid_sample(images, grid.reshape(batch, 1, -1, 2), mode="bilinear", padding_mode="border",
                         align_corners=False).flatten(2)


def landmark_samples(images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """What the landmarks point at: (B, LANDMARK_SAMPLES) colours in [0, 1].

    The colours of :func:`place_colours`, then each brow as a strip of
    ``_BROW_ACROSS`` x ``_BROW_ALONG`` samples at full resolution: along the brow's
    five landmarks from its inner end, and across it vertically over ±0.25 of the
    brow's length. The strips are luminance with each strip's own mean and
    contrast taken out: they carry the outline (the brow style) and nothing of
    the colour. With colour, the regressor read the hair colour off the brows (the
    rig tints brows with the hair) and, on photos, whose brows are softer and
    lighter against the skin, called dark-haired people blond.
    """
    strips = []
    across = torch.linspace(-0.25, 0.25, _BROW_ACROSS, device=images.device, dtype=images.dtype)
    for brow in (landmarks[:, 17:22].flip(1), landmarks[:, 22:27]):  # inner end first on both sides
        along = F.interpolate(brow.transpose(1, 2), size=_BROW_ALONG, mode="linear", align_corners=True)
        length = (brow[:, 1:] - brow[:, :-1]).norm(dim=2).sum(dim=1)  # (B,)
        vertical = torch.stack([torch.zeros_like(across), across])  # (2, C)
        points = along.transpose(1, 2)[:, None] + (vertical.T[None] * length[:, None, None])[:, :, None]  # (B, C, A, 2)
        luminance = torch.einsum("bcn,c->bn", _sample(images, points), _LUMINANCE.to(images))
        centred = luminance - luminance.mean(dim=1, keepdim=True)
        strips.append(centred / (centred.std(dim=1, keepdim=True) + 0.02))
    return torch.cat([place_colours(images, landmarks).flatten(1)] + strips, dim=1)


class Regressor(nn.Module):
    """(B, 3, S, S) aligned crops in [0, 1] + (B, 68, 2) landmarks in pixels → parameters."""

    def __init__(self, config: RegressorConfig) -> None:
        super().__init__()
        self.config = config
        self.parser = FaceParser(config.parsing)
        self.register_buffer("reference", torch.tensor(config.reference_landmarks, dtype=torch.float32).view(68, 2))
        widths = [config.parser_base_channels * 2 ** (i + 1) for i in range(config.parser_stages)]
        features = sum(widths) + 136 + LANDMARK_SAMPLES
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
        pooled = [stage.mean(dim=(2, 3)) for stage in self.parser.encode(small)[1:]]
        landmarks = landmarks.to(images.dtype)
        offsets = (landmarks - self.reference) / size * 8.0  # about unit scale
        parts = pooled + [offsets.flatten(1), landmark_samples(images, landmarks)]
        if self.cnn is not None:
            grid = self.cnn(images)
            parts += [grid.mean(dim=(2, 3)), F.adaptive_avg_pool2d(grid, 2).flatten(1)]
        return torch.cat(parts, dim=1)

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
