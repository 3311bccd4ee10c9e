"""dlib's ResNet face-recognition network, in PyTorch.

The only pretrained face-recognition network this machine can have is dlib's
(``dlib_face_recognition_resnet_model_v1.dat`` from ``face-recognition-models``;
99.38% on LFW). dlib runs it on the CPU, one face at a time, without gradients.
:class:`DlibResNet` is the same network as an ``nn.Module`` whose weights are read
from that file (no pickle): batched, on any device, and differentiable, so it can
serve as ``z_id`` / ``F_reg`` in the identity losses of SPEC.md §1-3.

Architecture (as in the file): 7x7/2 conv (32) → affine → relu → 3x3/2 max-pool →
residual stages 32 (3 blocks), 64 (down + 3), 128 (down + 2), 256 (down + 2),
256 (down) → global average pool → 128-d linear map without bias. dlib pads
stride-2 convolutions and pools by 0, a downsampling block's shortcut is a 2x2
average pool (no 1x1 conv), and its residual add zero-pads the smaller tensor at
the end of channels, height and width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facecore.face.dlib_models import RESNET_RECOGNITION, model_path
from facecore.models.dlib_format import DlibFormatError, read_dlib_net


@dataclass(frozen=True)
class DlibResNetConfig:
    """Shape of the network. The defaults are dlib's face-recognition model.

    Attributes:
        stem_channels: filters of the 7x7 stem convolution.
        stages: (channels, blocks, first block downsamples) per stage, input side first.
        embedding_size: output dimension.
        input_size: side of the RGB chip the network expects.
        input_mean: per-channel RGB mean subtracted before dividing by 256.
    """

    stem_channels: int = 32
    stages: tuple[tuple[int, int, bool], ...] = ((32, 3, False), (64, 4, True), (128, 3, True),
                                                 (256, 3, True), (256, 1, True))
    embedding_size: int = 128
    input_size: int = 150
    input_mean: tuple[float, float, float] = (122.782, 117.001, 104.298)

    def to_dict(self) -> dict:
        return asdict(self)


class Affine(nn.Module):
    """Per-channel scale and shift (dlib's ``affine`` layer, a frozen batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[None, :, None, None] + self.beta[None, :, None, None]


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: sum two tensors, zero-padding the smaller at the end of C, H, W."""
    if a.shape == b.shape:
        return a + b
    channels, height, width = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[3], 0, height - t.shape[2], 0, channels - t.shape[1]))

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    """conv → affine → relu → conv → affine, plus the (pooled, padded) input, then relu."""

    def __init__(self, in_channels: int, channels: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        # dlib pads a convolution by half its size only when its stride is 1.
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=0 if downsample else 1)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(add_zero_padded(out, shortcut))


class DlibResNet(nn.Module):
    """Face embedding: B x 3 x 150 x 150 RGB in [0, 255] → B x 128 descriptors.

    Descriptors of the same person are within about 0.6 of each other (Euclidean),
    as with ``dlib.face_recognition_model_v1.compute_face_descriptor``.
    """

    def __init__(self, config: DlibResNetConfig = DlibResNetConfig()) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.input_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, config.stem_channels, 7, stride=2, padding=0)
        self.stem_affine = Affine(config.stem_channels)
        blocks = []
        channels = config.stem_channels
        for width, count, downsample in config.stages:
            for index in range(count):
                blocks.append(ResidualBlock(channels, width, downsample and index == 0))
                channels = width
        self.blocks = nn.ModuleList(blocks)
        self.embedding = nn.Linear(channels, config.embedding_size, bias=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """Args:
            chips: (B, 3, S, S) float RGB in [0, 255], S = config.input_size.

        Returns:
            (B, embedding_size) descriptors.
        """
        size = self.config.input_size
        if chips.ndim != 4 or chips.shape[1] != 3 or chips.shape[2:] != (size, size):
            raise ValueError(f"expected chips of shape (B, 3, {size}, {size}), got {tuple(chips.shape)}")
        x = (chips - self.mean.to(chips.dtype)) / 256.0
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem(x))), 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.embedding(x.mean(dim=(2, 3)))

    @classmethod
    def from_dat(cls, path: str | Path | None = None) -> "DlibResNet":
        """Build the network with the weights of a dlib ``.dat`` file.

        Args:
            path: the file; default: the installed face-recognition-models copy.
        """
        net = read_dlib_net(path or model_path(RESNET_RECOGNITION))
        config = DlibResNetConfig(input_size=net.input_size[0],
                                  input_mean=tuple(round(m, 6) for m in net.input_mean))  # type: ignore[arg-type]
        model = cls(config)
        convs, affines, fcs = net.of_kind("con"), net.of_kind("affine"), net.of_kind("fc")
        targets_conv = [model.stem] + [c for b in model.blocks for c in (b.conv1, b.conv2)]
        targets_affine = [model.stem_affine] + [a for b in model.blocks for a in (b.affine1, b.affine2)]
        if len(convs) != len(targets_conv) or len(affines) != len(targets_affine) or len(fcs) != 1:
            raise DlibFormatError(f"file has {len(convs)} convolutions, {len(affines)} affine layers and "
                                  f"{len(fcs)} fc layers; this architecture needs {len(targets_conv)}, "
                                  f"{len(targets_affine)} and 1")
        with torch.no_grad():
            for layer, conv in zip(convs, targets_conv):
                weight = torch.from_numpy(np.ascontiguousarray(layer.values["weight"]))
                if weight.shape != conv.weight.shape or tuple(layer.values["stride"]) != conv.stride:
                    raise DlibFormatError(f"convolution {tuple(weight.shape)}/{layer.values['stride']} does not fit "
                                          f"{tuple(conv.weight.shape)}/{conv.stride}")
                if tuple(layer.values["padding"]) != conv.padding:
                    raise DlibFormatError(f"convolution padding {layer.values['padding']} != {conv.padding}")
                conv.weight.copy_(weight)
                conv.bias.copy_(torch.from_numpy(layer.values["bias"]))
            for layer, affine in zip(affines, targets_affine):
                affine.gamma.copy_(torch.from_numpy(layer.values["gamma"]))
                affine.beta.copy_(torch.from_numpy(layer.values["beta"]))
            weight = fcs[0].values["weight"]  # (inputs, outputs): dlib computes x @ W
            if weight.shape != (model.embedding.in_features, model.embedding.out_features):
                raise DlibFormatError(f"fc weights {weight.shape} do not fit {tuple(model.embedding.weight.T.shape)}")
            model.embedding.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
        return model.eval()


class IdentityScorer:
    """Embeds faces with :class:`DlibResNet` on dlib's chip geometry; scores pairs.

    Works on images in any frame (photos, aligned crops, renders) given their 68
    landmarks: chips are cut with a differentiable warp, so the same path scores
    generated images and trains through them.
    """

    def __init__(self, model: DlibResNet | None = None, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = (model or DlibResNet.from_dat()).to(self.device).eval()

    def chips(self, images: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) float RGB 0-255 and (B, 68, 2) landmarks → (B, 3, 150, 150) chips."""
        from facecore.face.transform import dlib_chip_matrix
        from facecore.face.warp_torch import warp_affine

        size = self.model.config.input_size
        matrices = torch.from_numpy(np.stack([dlib_chip_matrix(points, size) for points in landmarks]))
        return warp_affine(images, matrices.to(images.device), size)

    def embed(self, images: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
        """(B, 128) descriptors of the faces at ``landmarks`` (differentiable in ``images``)."""
        return self.model(self.chips(images.to(self.device), landmarks))

    @torch.inference_mode()
    def id_similarity(self, images_a: list[np.ndarray], landmarks_a: list[np.ndarray],
                      images_b: list[np.ndarray], landmarks_b: list[np.ndarray]) -> np.ndarray:
        """Cosine similarity of pairs of faces: the ``id_similarity`` output column.

        Args:
            images_a, images_b: (H, W, 3) uint8 RGB images (sizes may differ per image).
            landmarks_a, landmarks_b: (68, 2) landmarks in those images.

        Returns:
            (N,) float32 in [-1, 1]; same-person pairs score high (see bench/identity.py).
        """
        if not (len(images_a) == len(landmarks_a) == len(images_b) == len(landmarks_b)):
            raise ValueError("id_similarity needs as many images as landmark sets on each side")
        embeddings = []
        for images, landmarks in ((images_a, landmarks_a), (images_b, landmarks_b)):
            chips = [self.chips(torch.from_numpy(image).permute(2, 0, 1)[None].float().to(self.device),
                                np.asarray(points)[None]) for image, points in zip(images, landmarks)]
            embeddings.append(self.model(torch.cat(chips)) if chips else torch.zeros(0, 128))
        similarity = F.cosine_similarity(embeddings[0], embeddings[1], dim=1)
        return similarity.float().cpu().numpy()
