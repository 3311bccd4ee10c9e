"""Face swap in latent space (SPEC.md §2, seed 002): a layered encoder E and a styled decoder D.

``E(image)`` is a *layered latent*: one vector per layer of D, as a StyleGAN W+
code is (the seed's example: 18 x 512 at 1024 px). D starts from a learned 4x4
constant and doubles its side level by level up to the image's; each level has
two modulated convolutions, each driven by its own layer vector, and an RGB
output added into the picture so far (StyleGAN2's skip architecture). So layer
``2i`` and ``2i + 1`` act at side ``4 * 2**i``: the first layers set the coarse
shape (pose, face outline), the last ones colour and fine texture.

A swap mixes two codes layer by layer (:func:`mix_layers`): the identity layers
(``LatentConfig.identity_layers``, which layers they are is measured on the
trained model, see the README) from the source, every other layer from the
target, and D renders the mix.

E mirrors D: strided convolutions from the image's side down to 4x4, the
feature map at each side feeding the two layer vectors of D's level at that
side (coarse layers from deep features, fine layers from shallow ones, as
pixel2style2pixel's map-to-style heads do), each through strided convolutions
down to 4x4 and a linear map of the flattened 4x4 grid, which keeps where
things are and not only what.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from facecore.models.layers import group_norm


@dataclass(frozen=True)
class LatentConfig:
    """Shape of E and D.

    Attributes:
        image_size: side of the aligned crops, a power of two (64 in tests, 128 the shipped
            preset, 256/512 on GPUs).
        latent_dim: length of each layer vector.
        channels: D's and E's width at the finest level; it doubles per coarser level up to
            ``max_channels``.
        max_channels: the widest level's width.
        identity_layers: the layers a swap takes from the source (0-based; the rest come
            from the target).
        noise: D adds per-pixel noise of learned strength after each convolution
            (StyleGAN's stochastic detail); off by default, so a result is a function of
            its inputs alone.
        blend: D also draws where to put its picture over the target: a mask and a flow,
            and a swap is ``mask · D(mix) + (1 − mask) · warp(target, flow)``. D paints the
            face where it must, and elsewhere the target's own pixels, moved by the flow,
            keep its hair and background and reshape its face (the rig's identity is much
            of it geometry, which a warp gives at once and a painting only slowly). D
            also draws a gate over a *source layer* (the source's own face moved onto
            the swap's landmarks, see :func:`composite`): how much of the source's skin
            and features shows through under its picture.
    """

    image_size: int = 64
    latent_dim: int = 128
    channels: int = 16
    max_channels: int = 128
    identity_layers: tuple[int, ...] = (4, 5)
    noise: bool = False
    blend: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {self.image_size}")
        if self.latent_dim < 1 or self.channels < 1 or self.max_channels < self.channels:
            raise ValueError(f"latent_dim and channels must be >= 1 and max_channels >= channels, got "
                             f"{self.latent_dim}, {self.channels}, {self.max_channels}")
        bad = [layer for layer in self.identity_layers if not 0 <= layer < self.num_layers]
        if bad or len(set(self.identity_layers)) != len(self.identity_layers):
            raise ValueError(f"identity_layers must be distinct layers in [0, {self.num_layers}), "
                             f"got {list(self.identity_layers)}")

    @property
    def levels(self) -> int:
        """D's levels: sides 4, 8, ..., image_size."""
        return int(math.log2(self.image_size)) - 1

    @property
    def num_layers(self) -> int:
        """Layer vectors in a code: two per level (12 at 128 px, 18 at 1024 px as in StyleGAN)."""
        return 2 * self.levels

    def width(self, level: int) -> int:
        """Channels at ``level`` (0: 4x4)."""
        return min(self.max_channels, self.channels * 2 ** (self.levels - 1 - level))


def mix_layers(source: torch.Tensor, target: torch.Tensor, identity_layers: tuple[int, ...]) -> torch.Tensor:
    """(B, n, L) codes → the swap's code: ``identity_layers`` from ``source``, the rest from ``target``
    (the seed's 0/1 layer weights: exactly one vector per layer)."""
    if source.shape != target.shape:
        raise ValueError(f"codes differ in shape: {tuple(source.shape)} vs {tuple(target.shape)}")
    take = torch.zeros(source.shape[1], dtype=torch.bool, device=source.device)
    take[list(identity_layers)] = True
    return torch.where(take[None, :, None], source, target)


class ModulatedConv(nn.Module):
    """A 3x3 (or 1x1) convolution whose input channels are scaled per image by a style from a
    layer vector, then demodulated (StyleGAN2), so each image has its own weights."""

    def __init__(self, in_channels: int, out_channels: int, latent_dim: int, kernel: int = 3,
                 demodulate: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.style = nn.Linear(latent_dim, in_channels)
        nn.init.ones_(self.style.bias)  # every style starts near one: the plain convolution
        self.gain = 1.0 / math.sqrt(in_channels * kernel * kernel)  # equalised learning rate
        self.demodulate = demodulate
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        batch, in_channels, height, width = x.shape
        style = self.style(latent)  # (B, in)
        weight = self.gain * self.weight[None] * style[:, None, :, None, None]  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        out_channels = weight.shape[1]
        # One grouped convolution: each image is a group with its own weights.
        y = F.conv2d(x.reshape(1, batch * in_channels, height, width),
                     weight.reshape(batch * out_channels, in_channels, *weight.shape[3:]),
                     padding=self.padding, groups=batch)
        return y.reshape(batch, out_channels, height, width) + self.bias[None, :, None, None]


class _StyledLevel(nn.Module):
    """One side of D: (upsample), two modulated convolutions, an RGB output."""

    def __init__(self, in_channels: int, channels: int, config: LatentConfig, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv1 = ModulatedConv(in_channels, channels, config.latent_dim)
        self.conv2 = ModulatedConv(channels, channels, config.latent_dim)
        # RGB and, when the config blends, the mask's logit, the flow (x, y) and the source gate's logit.
        self.rgb = ModulatedConv(channels, BLEND_CHANNELS if config.blend else 3, config.latent_dim, kernel=1,
                                 demodulate=False)
        if config.blend:
            with torch.no_grad():  # start as the target itself: mask near 0 (summed over the levels), little flow
                self.rgb.bias[3] = -4.0 / config.levels
                self.rgb.weight[3:] *= 0.1
        self.noise_strength = nn.Parameter(torch.zeros(2)) if config.noise else None

    def forward(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                noise: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        for index, (conv, latent) in enumerate(((self.conv1, first), (self.conv2, second))):
            x = conv(x, latent)
            if self.noise_strength is not None:
                grain = torch.randn(x.shape[0], 1, *x.shape[2:], generator=noise, device="cpu").to(x.device)
                x = x + self.noise_strength[index] * grain
            x = F.leaky_relu(x, 0.2) * math.sqrt(2.0)
        return x, self.rgb(x, second)


class StyledDecoder(nn.Module):
    """D: (B, n, L) layered codes → (B, 3, S, S) images in [0, 1]; with ``placed``, also where a
    ``blend`` config puts them over a target: (B, 4, S, S), the mask in [0, 1], the flow
    (x, y, in grid units of [-1, 1]) and the source gate in [0, 1]; see :func:`composite`."""

    def __init__(self, config: LatentConfig) -> None:
        super().__init__()
        self.config = config
        self.constant = nn.Parameter(torch.randn(1, config.width(0), 4, 4))
        self.levels = nn.ModuleList(
            _StyledLevel(config.width(max(level - 1, 0)), config.width(level), config, upsample=level > 0)
            for level in range(config.levels))
        if config.blend:
            # The source gate's logit over the whole picture, on top of what the levels draw:
            # one number, scaled so that Adam moves it GATE_SCALE times faster than a weight
            # (StyleGAN's learning-rate multiplier). Per-pair tuning opens the gate with it
            # within tens of steps when the identity critic asks for more of the source.
            # It starts nearly shut: the swap starts as the target.
            self.gate_offset = nn.Parameter(torch.tensor(GATE_START / GATE_SCALE))

    def forward(self, codes: torch.Tensor, noise: torch.Generator | None = None,
                placed: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        if codes.ndim != 3 or codes.shape[1:] != (config.num_layers, config.latent_dim):
            raise ValueError(f"expected codes of shape (B, {config.num_layers}, {config.latent_dim}), "
                             f"got {tuple(codes.shape)}")
        x = self.constant.expand(codes.shape[0], -1, -1, -1)
        picture = None
        for level, block in enumerate(self.levels):
            x, rgb = block(x, codes[:, 2 * level], codes[:, 2 * level + 1], noise)
            picture = rgb if picture is None else rgb + F.interpolate(picture, scale_factor=2.0, mode="bilinear",
                                                                      align_corners=False)
        image = torch.sigmoid(picture[:, :3])
        if not placed:
            return image
        if not config.blend:  # the picture everywhere, nothing of the target or the source
            return image, torch.cat([torch.ones_like(image[:, :1]), torch.zeros_like(image[:, :3])], dim=1)
        # The flow's raw output is scaled so that the random start moves pixels by a fraction of one.
        gate = torch.sigmoid(picture[:, 6:7] + GATE_SCALE * self.gate_offset)
        return image, torch.cat([torch.sigmoid(picture[:, 3:4]), FLOW_SCALE * picture[:, 4:6], gate], dim=1)


FLOW_SCALE = 0.01
BLEND_CHANNELS = 7  # RGB, mask, flow (x, y), source gate
GATE_SCALE, GATE_START = 100.0, -4.0


def composite(images: torch.Tensor, placement: torch.Tensor, targets: torch.Tensor,
              prior: torch.Tensor | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
    """D's swap over the target: ``mask · image + (1 − mask) · under``.

    ``placement`` is D's (B, 4, S, S) mask, flow and source gate. ``under`` is the
    target warped by ``prior + flow``: the flow says, per output pixel, where in the
    target (grid units, [-1, 1] across) its pixel comes from, on top of ``prior``
    (B, 2, S, S), a warp given from outside (the landmark warp to the source's face
    shape, :func:`facecore.methods.latent_swap.prior_flows`). With a ``source``
    layer (B, 4, S, S: RGB and an alpha; the source's face moved onto the swap's
    landmarks, :func:`facecore.methods.latent_swap.source_layers`), ``under`` shows
    it over the warped target where ``gate · alpha`` says.
    """
    mask, flow = placement[:, :1], placement[:, 1:3]
    if prior is not None:
        flow = flow + prior
    batch, _, height, width = targets.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height, device=targets.device, dtype=targets.dtype),
                            torch.linspace(-1, 1, width, device=targets.device, dtype=targets.dtype), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1)[None] + flow.permute(0, 2, 3, 1)
    under = F.grid_sample(targets, grid, mode="bilinear", padding_mode="border", align_corners=True)
    if source is not None:
        shown = placement[:, 3:4] * source[:, 3:4]
        under = under + shown * (source[:, :3] - under)
    return mask * images + (1.0 - mask) * under


def _down(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False),
                         group_norm(channels), nn.LeakyReLU(0.2, inplace=True))


class LayeredEncoder(nn.Module):
    """E: (B, 3, S, S) images in [0, 1] → (B, n, L) layered codes."""

    def __init__(self, config: LatentConfig) -> None:
        super().__init__()
        self.config = config
        finest = config.levels - 1
        self.stem = nn.Sequential(nn.Conv2d(3, config.width(finest), 3, padding=1, bias=False),
                                  group_norm(config.width(finest)), nn.LeakyReLU(0.2, inplace=True))
        # down[j] takes level finest - j to the next coarser level.
        self.down = nn.ModuleList(_down(config.width(level), config.width(level - 1))
                                  for level in range(finest, 0, -1))
        heads = []
        for level in range(config.levels):
            trunk = [_down(config.width(level), config.width(level)) for _ in range(level)]  # to 4x4
            heads.append(nn.Sequential(*trunk, nn.Flatten(),
                                       nn.Linear(config.width(level) * 16, 2 * config.latent_dim)))
        self.heads = nn.ModuleList(heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        config = self.config
        size = config.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.stem(images * 2.0 - 1.0)
        maps = [x]  # finest first
        for block in self.down:
            x = block(x)
            maps.append(x)
        maps.reverse()  # maps[level]: side 4 * 2**level
        codes = [head(features) for head, features in zip(self.heads, maps)]
        return torch.cat(codes, dim=1).reshape(images.shape[0], config.num_layers, config.latent_dim)


class LatentSwapper(nn.Module):
    """E and D as one model: what ``model: swap`` training exports and the swap job loads."""

    def __init__(self, config: LatentConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = LayeredEncoder(config)
        self.decoder = StyledDecoder(config)

    def forward(self, source: torch.Tensor, target: torch.Tensor, identity_layers: tuple[int, ...] | None = None,
                prior: torch.Tensor | None = None, source_layer: torch.Tensor | None = None) -> torch.Tensor:
        """The swap: ``source``'s identity layers with ``target``'s others, decoded; (B, 3, S, S) in [0, 1]."""
        codes = self.encoder(torch.cat([source, target]))
        source_codes, target_codes = codes.chunk(2)
        layers = self.config.identity_layers if identity_layers is None else identity_layers
        images, placement = self.decoder(mix_layers(source_codes, target_codes, layers), placed=True)
        return composite(images, placement, target, prior, source_layer)
