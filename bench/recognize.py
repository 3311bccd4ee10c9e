"""Recognize speed: the regressor vs pinch on the same faces, and the recognize job vs a plain loop.

All in one run on the same models and the same aligned sample photos:
1. faces/s of the recognize stage's work (the regressor on batches of 32) vs the
   pinch stage's with its defaults (the regressor's start, then the search with
   the landmark term and the stopping rule), batches of 32;
2. the ``recognize`` job on Ray (2 CPUs) vs a plain loop doing the same work in
   one process: read, detect, align, regress in batches of 32, render and encode.

    python bench/recognize.py [--regressor DIR] [--images 256]
"""

from __future__ import annotations

from jobs.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before ray is imported

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pinch_inputs import align_largest_face, pinch_aligner, timed_job  # noqa: E402
from pinch_quality import pinch_from, recognize  # noqa: E402

from facecore import weights  # noqa: E402
from facecore.images import encode_png  # noqa: E402
from facecore.models.imitator import Imitator  # noqa: E402
from facecore.models.parsing import FaceParser  # noqa: E402
from facecore.models.regressor import Regressor  # noqa: E402
from facecore.presets import preset_path  # noqa: E402
from facecore.rig import Renderer, default_schema  # noqa: E402
from jobs.kinds.pinch import PinchOptions, pinch_config  # noqa: E402
from jobs.samples import sample_photos  # noqa: E402


def plain_loop(paths: list[Path], regressor: Regressor, render_size: int) -> int:
    """What the recognize job does, without Ray: one process, photo by photo then batch by batch."""
    detector = pinch_aligner(regressor.config.image_size)
    renderer = Renderer()
    written = 0
    for start in range(0, len(paths), 32):
        faces = [align_largest_face(detector, path) for path in paths[start:start + 32]]
        vectors = recognize(regressor, np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces]))
        for face, params in zip(faces, vectors):
            written += len(encode_png(face.image)) + len(encode_png(renderer.render(params, render_size).image))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regressor", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    regressor_uri = args.regressor or preset_path("regressor")
    regressor = weights.load_model(Regressor, regressor_uri).eval()
    imitator = weights.load_model(Imitator, preset_path("imitator")).eval()
    face_parser = weights.load_model(FaceParser, preset_path("parser")).eval()
    schema = default_schema()
    options = PinchOptions()
    config = pinch_config(options)

    photos = list(sample_photos().values())
    paths = [photos[i % len(photos)] for i in range(args.images)]
    detector = pinch_aligner(regressor.config.image_size)
    faces = [align_largest_face(detector, path) for path in photos]
    images = np.stack([faces[i % len(faces)].image for i in range(args.images)])
    landmarks = np.stack([faces[i % len(faces)].landmarks for i in range(args.images)]).astype(np.float32)

    started = time.perf_counter()
    for start in range(0, len(images), 32):
        recognize(regressor, images[start:start + 32], landmarks[start:start + 32])
    recognize_fps = len(images) / (time.perf_counter() - started)
    count = min(len(images), 64)  # pinch is slow: fewer faces give its rate
    started = time.perf_counter()
    for start in range(0, count, 32):
        begin = recognize(regressor, images[start:start + 32], landmarks[start:start + 32])
        pinch_from(begin, imitator, face_parser, images[start:start + 32], landmarks[start:start + 32], schema, config)
    pinch_fps = count / (time.perf_counter() - started)
    print(f"recognize {recognize_fps:.1f} faces/s, pinch (defaults) {pinch_fps:.2f} faces/s")

    torch.set_num_threads(2)
    started = time.perf_counter()
    plain_loop(paths, regressor, options.render_size)
    plain_seconds = time.perf_counter() - started

    summary, job_seconds = timed_job({"kind": "recognize", "models": {"regressor": regressor_uri},
                                      "resources": {"batch_size": 32, "concurrency": 1}}, paths)
    assert summary.ok_rows == len(paths), summary
    print(f"recognize job on Ray: {len(paths) / job_seconds:.2f} faces/s; plain loop {len(paths) / plain_seconds:.2f}")
    print(f"RESULT recognize_fps={recognize_fps:.1f} pinch_fps={pinch_fps:.2f} speedup={recognize_fps / pinch_fps:.0f} "
          f"job_vs_plain={plain_seconds / job_seconds:.2f}")


if __name__ == "__main__":
    main()
