"""Expression transfer on held-out rig pairs: the learned G against the piecewise-affine baseline.

Pairs of one identity (``jobs.samples.aligned_expression_pairs``, a seed no
training run uses): G moves the source to the target's landmarks, and so does
the baseline (``facecore.methods.landmark_warp``); both are scored by the L1 to
the true second render, beside the L1 of not moving the source at all.

    python bench/transfer_quality.py --generator DIR [--pairs 200]

    RESULT rig_l1_ratio=<G / baseline> rig_l1=<G> baseline_l1=<baseline> copy_l1=<source as is>

Issue 13's photo figures (id_keep, nme_ratio, detect) need the transfer job's
target landmarks on photos and are not measured here yet.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from facecore import weights
from facecore.methods.landmark_warp import piecewise_affine_warp
from facecore.models.expression import ExpressionGenerator, generator_inputs
from jobs.samples import aligned_expression_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="model folder of a trained G")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=424242)
    args = parser.parse_args()
    generator = weights.load_model(ExpressionGenerator, args.generator).eval()
    size = generator.config.image_size
    (source, source_points, _), (target, target_points, _) = aligned_expression_pairs(args.pairs, args.seed, size)

    def tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

    results = []
    with torch.no_grad():
        for start in range(0, args.pairs, 32):
            part = slice(start, start + 32)
            inputs = generator_inputs(torch.from_numpy(source_points[part]), torch.from_numpy(target_points[part]),
                                      generator.config)
            result, _ = generator(tensor(source[part]), inputs["source_maps"], inputs["target_maps"],
                                  inputs["landmark_flow"])
            results.append(result)
    model_l1 = float((torch.cat(results) - tensor(target)).abs().mean())
    warped = np.stack([piecewise_affine_warp(image, a, b) for image, a, b in zip(source, source_points, target_points)])
    baseline_l1 = float((tensor(warped) - tensor(target)).abs().mean())
    copy_l1 = float((tensor(source) - tensor(target)).abs().mean())
    print(f"held-out rig pairs: {args.pairs} at {size} px")
    print(f"RESULT rig_l1_ratio={model_l1 / baseline_l1:.3f} rig_l1={model_l1:.4f} baseline_l1={baseline_l1:.4f} "
          f"copy_l1={copy_l1:.4f}")


if __name__ == "__main__":
    main()
