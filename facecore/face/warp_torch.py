"""Differentiable affine warps in PyTorch, with OpenCV's pixel conventions.

Matrices are (2, 3) source → destination in pixel coordinates with pixel centres
on integers (as ``cv2.warpAffine`` and :mod:`facecore.face.transform`), so one
matrix serves both the NumPy and the Torch path, and gradients flow to the
source pixels through bilinear sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, size: int | tuple[int, int],
                padding_mode: str = "zeros") -> torch.Tensor:
    """Warp a batch of images with per-image affine matrices, bilinearly.

    Args:
        images: (B, C, H, W) float.
        matrices: (B, 2, 3) or (2, 3) source → destination, pixel coordinates.
        size: output side, or (width, height).
        padding_mode: "zeros" or "border", as in ``grid_sample``.

    Returns:
        (B, C, out_h, out_w), same dtype as ``images``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    out_w, out_h = (size, size) if isinstance(size, int) else size
    matrices = matrices.to(images.dtype)
    if matrices.shape == (2, 3):
        matrices = matrices.expand(batch, 2, 3)
    if matrices.shape != (batch, 2, 3):
        raise ValueError(f"expected matrices of shape ({batch}, 2, 3), got {tuple(matrices.shape)}")
    # Invert each source→destination map to find, for every output pixel, where to sample.
    full = torch.cat([matrices, matrices.new_tensor([0.0, 0.0, 1.0]).expand(batch, 1, 3)], dim=1)
    inverse = torch.linalg.inv(full)[:, :2]
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=images.dtype, device=images.device),
                            torch.arange(out_w, dtype=images.dtype, device=images.device), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3)
    source = grid @ inverse.transpose(1, 2)  # (B, out_h*out_w, 2) in source pixels
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    normalised = torch.stack([2.0 * source[..., 0] / max(width - 1, 1) - 1.0,
                              2.0 * source[..., 1] / max(height - 1, 1) - 1.0], dim=-1)
    return F.grid_sample(images, normalised.reshape(batch, out_h, out_w, 2), mode="bilinear",
                         padding_mode=padding_mode, align_corners=True)
