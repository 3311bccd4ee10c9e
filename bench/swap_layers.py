"""What each layer of the swap's latent carries: swap one layer at a time and measure what changes.

On held-out rig swap pairs (a seed no training run uses), for each layer k of
the code: decode the target's code with only layer k taken from the source, and
compare with decoding the target's own code (its reconstruction):

- ``truth gain``: how much of the way to the ground-truth swap (the target with
  the source's identity) the change goes: (L1(recon, truth) − L1(k, truth)) /
  L1(recon, truth); 1 would be the whole swap, negative moves away;
- ``id to source``: the change in dlib cosine similarity to the source;
- ``face`` / ``outside``: mean absolute pixel change inside the target's face
  hull and outside it (hair, background: what a swap must keep).

The same figures for the model's identity layers together close the table.
Prints a Markdown table (the README's).

    python bench/swap_layers.py [--model DIR] [--pairs 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from facecore.methods.landmark_swap import face_mask
from facecore.models.identity import IdentityScorer
from facecore.models.latent import mix_layers
from jobs.kinds.swap import load_swapper
from jobs.samples import aligned_swap_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder of the swap (default: the shipped preset)")
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()
    swapper = load_swapper(args.model, None, "cpu")
    config = swapper.config
    side = config.image_size
    (sources, source_points, _), (targets, target_points, _), (truths, _, _) = aligned_swap_pairs(args.pairs, 515151,
                                                                                                 side)
    tensor = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    source, target, truth = tensor(sources), tensor(targets), tensor(truths)
    inside = torch.from_numpy(np.stack([face_mask(points, side, side) > 0 for points in target_points]))[:, None]
    scorer = IdentityScorer(device="cpu")
    with torch.inference_mode():
        source_id = scorer.embed(source * 255.0, source_points)
        codes = swapper.encoder(torch.cat([source, target]))
        source_codes, target_codes = codes.chunk(2)
        recon = swapper.decoder(target_codes)

        def measure(layers: tuple[int, ...]) -> dict[str, float]:
            image = swapper.decoder(mix_layers(source_codes, target_codes, layers))
            base, now = (recon - truth).abs().mean(dim=(1, 2, 3)), (image - truth).abs().mean(dim=(1, 2, 3))
            cos = lambda x: F.cosine_similarity(scorer.embed(x * 255.0, target_points), source_id)  # noqa: E731
            change = (image - recon).abs().mean(dim=1, keepdim=True)
            return {"gain": float(((base - now) / base).mean()), "id": float((cos(image) - cos(recon)).mean()),
                    "face": float(change[inside].mean() * 255), "outside": float(change[~inside].mean() * 255)}

        rows = [(f"{k}", 4 * 2 ** (k // 2), measure((k,))) for k in range(config.num_layers)]
        rows.append((f"{list(config.identity_layers)} (the identity layers)",
                     "", measure(tuple(config.identity_layers))))
    print(f"{args.pairs} held-out rig pairs at {side} px; change against the target's reconstruction")
    print("| layer | D's side | truth gain | id to source (cos) | face (px) | outside (px) |")
    print("|---|---|---|---|---|---|")
    for name, level_side, figures in rows:
        print(f"| {name} | {level_side} | {figures['gain']:+.3f} | {figures['id']:+.3f} | {figures['face']:.1f} "
              f"| {figures['outside']:.1f} |")


if __name__ == "__main__":
    main()
