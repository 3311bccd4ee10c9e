"""Expression transfer (SPEC.md §1, seed 001): ``Î_t = G(I_s, L_s, L_t)`` and its two discriminators.

G is an encoder–decoder of convolutions with residual blocks, as the seed says,
on the source crop, the source and target landmark heatmaps and the source
warped by the landmark flow (below). It does not paint the face from scratch: it
predicts

- a dense flow that warps the source (what moves: lips, brows, lids, the jaw),
  as a correction of the *landmark flow*, the piecewise-affine map that takes
  the source landmarks to the target ones (``facecore.methods.landmark_warp``,
  a function of ``L_s`` and ``L_t`` alone, so ``G(I_s, L_s, L_t)`` still holds);
- a refinement image for what no warp of the source shows (an opened mouth's
  inside, a closed eye's lid),
- a blend mask between the two.

A model trained mostly on rig renders then keeps a real photo's own pixels
wherever a warp suffices, which is most of the face. At initialisation the
correction is zero and the mask favours the warp, so G starts as the
piecewise-affine baseline and training has only to improve on it (a first run
that learned the whole flow from heatmaps ended 40 % worse than the baseline).

``D_id(a, b)``: are two faces the same person? ``D_e(image, heatmaps)``: does the
face show those landmarks? Both return logits; the losses apply the sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from facecore.face.heatmap import HeatmapMode, heatmap_channels
from facecore.models.layers import group_norm


@dataclass(frozen=True)
class ExpressionConfig:
    """Shape of G and of the discriminators.

    Attributes:
        image_size: side of the aligned crops (64 in tests, 128 the shipped preset, 256/512 on GPUs).
        heatmap_mode: how landmarks become heatmaps (``facecore.face.heatmap``).
        heatmap_sigma: blob size in pixels at 64 px (scaled with ``image_size``).
        base_channels: channels of G's first stage (doubled per stage up to 8x).
        stages: G's down-sampling stages (each halves the side).
        residual_blocks: residual blocks at G's bottleneck.
        discriminator_channels: channels of the discriminators' first stage.
        mask_bias: the blend mask's starting logit (the warp's share is sigmoid of it).
        flow_prior: the warp G corrects (``landmark_flow``). "face": the face's
            landmarks move, the rest of the picture fades to still over
            ``flow_falloff`` pixels (``face_warp_maps``); "warp": the baseline's
            frame-anchored piecewise-affine warp (``piecewise_affine_maps``).
        flow_falloff: the "face" prior's fade in pixels at 64 px (scaled with ``image_size``).
    """

    image_size: int = 64
    heatmap_mode: HeatmapMode = "groups"
    heatmap_sigma: float = 1.5
    base_channels: int = 32
    stages: int = 3
    residual_blocks: int = 4
    discriminator_channels: int = 32
    mask_bias: float = 4.0
    flow_prior: str = "face"
    flow_falloff: float = 2.5

    def __post_init__(self) -> None:
        if self.flow_prior not in ("face", "warp") or self.flow_falloff <= 0:
            raise ValueError(f"flow_prior must be 'face' or 'warp' and flow_falloff > 0, got {self.flow_prior!r}, "
                             f"{self.flow_falloff}")
        if self.image_size % 2 ** self.stages or self.image_size < 2 ** (self.stages + 2):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2**stages = {2 ** self.stages} "
                             f"and at least {2 ** (self.stages + 2)}")
        if self.heatmap_mode not in ("single", "groups", "points"):
            raise ValueError(f"heatmap_mode must be 'single', 'groups' or 'points', got {self.heatmap_mode!r}")

    @property
    def heatmap_channels(self) -> int:
        return heatmap_channels(self.heatmap_mode)

    @property
    def sigma(self) -> float:
        return self.heatmap_sigma * self.image_size / 64.0


def _conv(in_channels: int, channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
                         group_norm(channels), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), group_norm(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  group_norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class ExpressionGenerator(nn.Module):
    """G: (B, 3, S, S) source in [0, 1], (B, K, S, S) source and target heatmaps → (B, 3, S, S) in [0, 1]."""

    def __init__(self, config: ExpressionConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * min(2 ** i, 8) for i in range(config.stages + 1)]
        self.stem = _conv(6 + 2 * config.heatmap_channels, widths[0])
        self.down = nn.ModuleList(_conv(a, b, stride=2) for a, b in zip(widths, widths[1:]))
        self.middle = nn.Sequential(*[_Residual(widths[-1]) for _ in range(config.residual_blocks)])
        self.up = nn.ModuleList(_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(config.stages)))
        self.flow = nn.Conv2d(widths[0], 2, 3, padding=1)
        self.mask = nn.Conv2d(widths[0], 1, 3, padding=1)
        self.refine = nn.Conv2d(widths[0], 3, 3, padding=1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)
        nn.init.zeros_(self.mask.weight)
        nn.init.constant_(self.mask.bias, config.mask_bias)
        side = torch.linspace(-1.0, 1.0, config.image_size)
        ys, xs = torch.meshgrid(side, side, indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys], dim=-1)[None], persistent=False)

    def forward(self, source: torch.Tensor, source_heatmaps: torch.Tensor, target_heatmaps: torch.Tensor,
                landmark_flow: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the result and its parts: ``flow`` (B, 2, S, S) G's correction of ``landmark_flow``
        (both offsets in normalised coordinates, as :func:`landmark_flow` makes them), ``mask``
        (B, 1, S, S) the warp's share, ``warped`` and ``refined`` (B, 3, S, S)."""
        size, channels, batch = self.config.image_size, self.config.heatmap_channels, source.shape[0]
        if source.ndim != 4 or source.shape[1:] != (3, size, size):
            raise ValueError(f"expected source of shape (B, 3, {size}, {size}), got {tuple(source.shape)}")
        for name, tensor, depth in (("source_heatmaps", source_heatmaps, channels),
                                    ("target_heatmaps", target_heatmaps, channels),
                                    ("landmark_flow", landmark_flow, 2)):
            if tensor.shape != (batch, depth, size, size):
                raise ValueError(f"expected {name} of shape ({batch}, {depth}, {size}, {size}), "
                                 f"got {tuple(tensor.shape)}")
        prior = self.grid + landmark_flow.permute(0, 2, 3, 1)
        prior_warped = F.grid_sample(source, prior, mode="bilinear", padding_mode="border", align_corners=True)
        x = self.stem(torch.cat([source * 2.0 - 1.0, prior_warped * 2.0 - 1.0, source_heatmaps, target_heatmaps],
                                dim=1))
        skips = [x]
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.middle(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], dim=1))
        flow = self.flow(x)
        warped = F.grid_sample(source, prior + flow.permute(0, 2, 3, 1), mode="bilinear",
                               padding_mode="border", align_corners=True)
        mask = torch.sigmoid(self.mask(x))
        refined = torch.sigmoid(self.refine(x))
        result = mask * warped + (1.0 - mask) * refined
        return result, {"flow": flow, "mask": mask, "warped": warped, "refined": refined}


def _critic(in_channels: int, channels: int, size: int) -> nn.Sequential:
    """Strided spectral-normed convolutions down to 4x4, then a linear logit."""
    sn = nn.utils.parametrizations.spectral_norm
    layers: list[nn.Module] = []
    width, side = in_channels, size
    out = channels
    while side > 4:
        layers += [sn(nn.Conv2d(width, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, inplace=True)]
        width, side, out = out, side // 2, min(out * 2, channels * 8)
    layers += [nn.Flatten(), sn(nn.Linear(width * side * side, 1))]
    return nn.Sequential(*layers)


class IdentityDiscriminator(nn.Module):
    """D_id(a, b): (B, 3, S, S) twice → (B,) logits that a and b show the same person."""

    def __init__(self, config: ExpressionConfig) -> None:
        super().__init__()
        self.config = config
        self.net = _critic(6, config.discriminator_channels, config.image_size)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=1) * 2.0 - 1.0).squeeze(1)


class ExpressionDiscriminator(nn.Module):
    """D_e(image, heatmaps): (B, 3, S, S), (B, K, S, S) → (B,) logits that the face shows those landmarks."""

    def __init__(self, config: ExpressionConfig) -> None:
        super().__init__()
        self.config = config
        self.net = _critic(3 + config.heatmap_channels, config.discriminator_channels, config.image_size)

    def forward(self, images: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([images * 2.0 - 1.0, heatmaps], dim=1)).squeeze(1)


def landmark_flow(source_landmarks: torch.Tensor, target_landmarks: torch.Tensor,
                  config: ExpressionConfig) -> torch.Tensor:
    """(B, 68, 2) source and target landmarks in crop pixels → (B, 2, S, S) the backward map of
    ``config.flow_prior``'s warp as offsets from each pixel, in ``grid_sample``'s normalised coordinates."""
    import numpy as np

    from facecore.methods.landmark_warp import face_warp_maps, piecewise_affine_maps

    size = config.image_size
    falloff = config.flow_falloff * size / 64.0
    pixels = np.arange(size, dtype=np.float32)
    flows = []
    for source, target in zip(source_landmarks.detach().cpu().numpy(), target_landmarks.detach().cpu().numpy()):
        if config.flow_prior == "face":
            map_x, map_y = face_warp_maps(source, target, size, size, falloff)
        else:
            map_x, map_y = piecewise_affine_maps(source, target, size, size)
        flows.append(np.stack([map_x - pixels[None, :], map_y - pixels[:, None]]) * (2.0 / (size - 1)))
    return torch.from_numpy(np.stack(flows).astype(np.float32)).to(source_landmarks.device)


def generator_inputs(source_landmarks: torch.Tensor, target_landmarks: torch.Tensor,
                     config: ExpressionConfig) -> dict[str, torch.Tensor]:
    """What G takes besides the source image: ``source_maps``, ``target_maps`` and ``landmark_flow``."""
    return {"source_maps": heatmaps(source_landmarks, config), "target_maps": heatmaps(target_landmarks, config),
            "landmark_flow": landmark_flow(source_landmarks, target_landmarks, config)}


def heatmaps(landmarks: torch.Tensor, config: ExpressionConfig) -> torch.Tensor:
    """(B, 68, 2) landmarks in pixels of the crop → (B, K, S, S) heatmaps as G and D_e take them."""
    import numpy as np

    from facecore.face.heatmap import landmark_heatmap

    maps = [landmark_heatmap(points, config.image_size, config.sigma, config.heatmap_mode)
            for points in landmarks.detach().cpu().numpy()]
    return torch.from_numpy(np.stack(maps)).to(landmarks.device)
