"""Pinch speed: the batched optimiser vs one image at a time, its stopping rule, and the job.

All in one run on the same models and the same aligned sample photos:
1. images/s of ``pinch`` on batches of 32 vs the seed's one-image loop, both for a
   fixed number of iterations (stopping rule off);
2. the default stopping rule's mean iterations per image, and the relative gap of
   its final loss to a 400-iteration run of the same optimiser;
3. the ``pinch`` job on Ray (2 CPUs) vs a plain loop doing the same work in one
   process: read, detect, align, the regressor's start, pinch in batches of 32,
   encode the preview and the rig render.

The optimiser settings are the pinch job's defaults. Models default to the
shipped presets.

    python bench/pinch.py [--imitator DIR] [--parser DIR] [--images 128] [--iterations 40]
"""

from __future__ import annotations

from jobs.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before ray is imported

import argparse
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from pinch_inputs import align_largest_face, as_batch, pinch_aligner, timed_job
from pinch_quality import recognize, tensors

from facecore import weights
from facecore.images import encode_png
from facecore.methods.pinch import PinchConfig, pinch
from facecore.models.imitator import Imitator
from facecore.models.parsing import FaceParser
from facecore.models.regressor import Regressor
from facecore.presets import preset_path
from facecore.rig import Renderer, default_schema
from jobs.samples import sample_photos
from jobs.kinds.pinch import PinchOptions
from jobs.kinds.pinch import pinch_config


def plain_loop(paths: list[Path], imitator, face_parser, regressor, schema, config: PinchConfig,
               options: PinchOptions) -> int:
    """What the job does, without Ray: one process, photo by photo then batch by batch."""
    detector = pinch_aligner(options.size)
    renderer = Renderer(schema)
    written = 0
    size = imitator.config.image_size
    for start in range(0, len(paths), 32):
        faces = [align_largest_face(detector, path) for path in paths[start:start + 32]]
        images, landmarks = np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces])
        begin = torch.from_numpy(recognize(regressor, images, landmarks)) if options.init == "recognize" else None
        targets, points = tensors(images, landmarks, size)
        result = pinch(imitator, face_parser, targets, schema, config, start=begin, landmarks=points)
        with torch.no_grad():
            previews = (imitator(torch.from_numpy(result.params)).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1)
        for params, preview in zip(result.params, previews.numpy()):
            written += len(encode_png(preview)) + len(encode_png(renderer.render(params, options.render_size).image))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imitator", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--parser", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    cv2.setNumThreads(1)

    regressor = weights.load_model(Regressor, preset_path("regressor")).eval()
    imitator_uri = args.imitator or preset_path("imitator")
    parser_uri = args.parser or preset_path("parser")
    imitator = weights.load_model(Imitator, imitator_uri).eval()
    face_parser = weights.load_model(FaceParser, parser_uri).eval()
    schema = default_schema()
    options = PinchOptions()
    default = pinch_config(options)
    photos = list(sample_photos().values())
    paths = [photos[i % len(photos)] for i in range(args.images)]
    size = imitator.config.image_size
    detector = pinch_aligner(size)
    targets = as_batch([align_largest_face(detector, path).image for path in paths])
    fixed = replace(default, max_iterations=args.iterations, patience=10**9)

    started = time.perf_counter()
    for start in range(0, len(targets), 32):
        pinch(imitator, face_parser, targets[start:start + 32], schema, fixed)
    batched_ips = len(targets) / (time.perf_counter() - started)
    started = time.perf_counter()
    for index in range(len(targets)):
        pinch(imitator, face_parser, targets[index:index + 1], schema, fixed)
    sequential_ips = len(targets) / (time.perf_counter() - started)
    print(f"{args.iterations} iterations: batched {batched_ips:.2f} img/s, one at a time {sequential_ips:.2f} img/s")

    stopped = pinch(imitator, face_parser, targets[:32], schema, default)
    long = pinch(imitator, face_parser, targets[:32], schema, replace(default, max_iterations=400, patience=10**9))
    gap = float(np.mean((stopped.loss_end - long.loss_end) / np.maximum(long.loss_end, 1e-12)))
    print(f"default stop: {stopped.iterations.mean():.1f} iterations per image; loss gap to 400 iterations {gap:+.2%}")

    started = time.perf_counter()
    plain_loop(paths, imitator, face_parser, regressor, schema, default, options)
    plain_seconds = time.perf_counter() - started

    summary, job_seconds = timed_job({"kind": "pinch", "models": {"imitator": imitator_uri, "parser": parser_uri},
                                      "resources": {"batch_size": 32, "concurrency": 1}}, paths)
    assert summary.ok_rows == len(paths), summary
    print(f"pinch job on Ray: {len(paths) / job_seconds:.2f} img/s; plain loop {len(paths) / plain_seconds:.2f}")
    print(f"RESULT batched_ips={batched_ips:.2f} sequential_ips={sequential_ips:.2f} "
          f"ratio={batched_ips / sequential_ips:.2f} iters_mean={stopped.iterations.mean():.1f} "
          f"loss_gap={gap:.4f} job_vs_plain={plain_seconds / job_seconds:.2f}")


if __name__ == "__main__":
    main()
