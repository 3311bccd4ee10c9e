"""How good the shipped models are: the training figures of the presets.

1. Imitator: L1 between ``g(x)`` and the rig's render of x on fresh frontal
   renders (a sampling seed training never used), beside an untrained imitator
   of the same shape.
2. Parser: mean IoU on the same renders (exact masks), and on the aligned sample
   photos with masks from their 68 landmarks (unknown pixels ignored):
   astronaut.png was held out of the preset's training photos, the others were in it.

    python bench/preset_scores.py [--imitator DIR] [--parser DIR] [--renders 500]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pinch_inputs import align_largest_face, as_batch, pinch_aligner

from facecore import weights
from facecore.face.parsing_mask import landmark_mask
from facecore.models.imitator import Imitator
from facecore.models.parsing import FaceParser
from facecore.presets import preset_path
from facecore.rig import Renderer, default_schema
from facecore.training.steps import imitator_eval, parser_eval
from jobs.samples import sample_photos

FRONTAL = {"yaw": 0.5, "pitch": 0.5, "roll": 0.5}
HELD_OUT_PHOTOS = ("astronaut.png",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imitator", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--parser", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--renders", type=int, default=500)
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args()

    imitator = weights.load_model(Imitator, args.imitator or preset_path("imitator")).eval()
    face_parser = weights.load_model(FaceParser, args.parser or preset_path("parser")).eval()
    torch.manual_seed(0)
    untrained = Imitator(imitator.config).eval()
    schema, renderer, size = default_schema(), Renderer(), imitator.config.image_size

    values = schema.sample(np.random.default_rng(args.seed), args.renders, fixed=FRONTAL)
    renders = [renderer.render(v, size) for v in values]
    batch = {
        "params": torch.from_numpy(np.stack([schema.encode(v) for v in values])).float(),
        "image": torch.from_numpy(np.stack([r.image for r in renders])).permute(0, 3, 1, 2).float() / 255.0,
        "mask": torch.from_numpy(np.stack([r.mask for r in renders]).astype(np.int64)),
    }
    l1, l1_untrained = imitator_eval(imitator, batch)["l1"], imitator_eval(untrained, batch)["l1"]
    miou_renders = parser_eval(face_parser, batch, face_parser.config.num_classes)["miou"]
    print(f"imitator L1 on {args.renders} fresh renders: {l1:.4f} (untrained {l1_untrained:.4f})")
    print(f"parser mean IoU on the renders: {miou_renders:.3f}")

    detector = pinch_aligner(size)
    scores: dict[bool, list[float]] = {True: [], False: []}
    for name, path in sorted(sample_photos().items()):
        aligned = align_largest_face(detector, path)
        photo = {"image": as_batch([aligned.image]),
                 "mask": torch.from_numpy(landmark_mask(aligned.landmarks, size).astype(np.int64))[None]}
        miou = parser_eval(face_parser, photo, face_parser.config.num_classes)["miou"]
        held_out = name in HELD_OUT_PHOTOS
        scores[held_out].append(miou)
        print(f"  {name:16s} mean IoU {miou:.3f}{' (held out)' if held_out else ''}")
    held, seen = float(np.mean(scores[True])), float(np.mean(scores[False]))
    print(f"RESULT imitator_l1={l1:.4f} imitator_l1_untrained={l1_untrained:.4f} "
          f"parser_miou_renders={miou_renders:.3f} parser_miou_photo_heldout={held:.3f} "
          f"parser_miou_photos_seen={seen:.3f}")


if __name__ == "__main__":
    main()
