"""Pinch quality on held-out rig renders (known truth) and on real photos.

1. Renders: 200 random frontal renders the models never saw; mean absolute error
   of the recovered continuous parameters per group against the truth, beside the
   error of the reference-face initialisation; accuracy of the discrete styles.
2. Photos: 68-landmark error (normalised by the inter-ocular distance) between
   each aligned photo and the rig render of its result, beside the same error for
   the reference face.

The optimiser settings are the pinch job's defaults; models default to the
shipped presets.

    python bench/pinch_quality.py [--imitator DIR] [--parser DIR] [--renders 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pinch_inputs import align_largest_face, as_batch, pinch_aligner

from facecore import weights
from facecore.face.landmarks import eye_centres
from facecore.methods.pinch import pinch
from facecore.models.imitator import Imitator
from facecore.models.parsing import FaceParser
from facecore.presets import preset_path
from facecore.rig import Renderer, default_schema
from jobs.samples import sample_photos
from jobs.kinds.pinch import PinchOptions
from jobs.kinds.pinch import pinch_config

FRONTAL = {"yaw": 0.5, "pitch": 0.5, "roll": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imitator", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--parser", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--renders", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="override pinch options, e.g. learning_rate=0.03 prior_weight=0")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    config = pinch_config(PinchOptions.model_validate({**PinchOptions().model_dump(), **overrides}))
    print(f"optimiser: {config}")

    imitator = weights.load_model(Imitator, args.imitator or preset_path("imitator")).eval()
    face_parser = weights.load_model(FaceParser, args.parser or preset_path("parser")).eval()
    schema, renderer = default_schema(), Renderer()
    size = imitator.config.image_size

    # 1. held-out renders
    truth = schema.sample(np.random.default_rng(args.seed), args.renders, fixed=FRONTAL)
    images = np.stack([renderer.render(values, size).image for values in truth])
    targets = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    results = [pinch(imitator, face_parser, targets[i:i + 32], schema, config) for i in range(0, len(truth), 32)]
    found = np.concatenate([r.params for r in results])
    true_vectors = np.stack([schema.encode(values) for values in truth])
    reference = schema.reference_vector()
    free = [i for i, name in enumerate(schema.continuous_names) if name not in FRONTAL]
    for group in ("identity", "expression", "appearance"):
        index = [i for i in schema.indices(group) if i in free]
        mae = np.abs(found[:, index] - true_vectors[:, index]).mean()
        init = np.abs(reference[index] - true_vectors[:, index]).mean()
        print(f"{group:10s} MAE {mae:.3f} (reference init {init:.3f})")
    mae = np.abs(found[:, free] - true_vectors[:, free]).mean()
    init_mae = np.abs(reference[free] - true_vectors[:, free]).mean()
    correct = [np.mean([schema.decode(f)[g.name] == t[g.name] for f, t in zip(found, truth)]) for g in schema.discrete]
    discrete_acc = float(np.mean(correct))
    print(f"overall MAE {mae:.3f} vs reference init {init_mae:.3f}; discrete accuracy {discrete_acc:.1%} "
          f"({', '.join(f'{g.name} {c:.0%}' for g, c in zip(schema.discrete, correct))})")

    # 2. real photos
    detector = pinch_aligner(size)
    faces = [align_largest_face(detector, path) for path in sample_photos().values()]
    photo_landmarks = [face.landmarks for face in faces]
    batch = as_batch([face.image for face in faces])
    result = pinch(imitator, face_parser, batch, schema, config)
    errors, reference_errors = [], []
    for params, points in zip(result.params, photo_landmarks):
        distance = np.linalg.norm(np.diff(eye_centres(points), axis=0))
        rendered = renderer.render(params, size).landmarks
        errors.append(np.linalg.norm(rendered - points, axis=1).mean() / distance)
        reference_errors.append(np.linalg.norm(detector.reference.landmarks - points, axis=1).mean() / distance)
    nme, reference_nme = float(np.mean(errors)), float(np.mean(reference_errors))
    print(f"photos: landmark error {nme:.3f} x eye distance vs reference face {reference_nme:.3f}")
    print(f"RESULT mae={mae:.4f} init_mae={init_mae:.4f} mae_ratio={mae / init_mae:.3f} "
          f"discrete_acc={discrete_acc:.3f} nme_ratio={nme / reference_nme:.3f}")


if __name__ == "__main__":
    main()
