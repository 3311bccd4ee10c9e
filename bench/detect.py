"""Detection on a downscaled copy vs on the full-size photo.

The detector runs on a copy whose longer side is ``detect_max_side`` pixels and
maps boxes back; landmarks are then fitted on the full image either way. This
measures the detection time, and how far the resulting eye centres move, over
the real sample photos (910 to 2333 px on the long side).

    python bench/detect.py [--repeats 5] [--max-side 640]
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from facecore.face import DetectorConfig, FaceDetector
from facecore.face.landmarks import eye_centres
from facecore.images import decode
from jobs.samples import sample_photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-side", type=int, default=640)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    photos = sample_photos()
    images = [decode(photos[n].read_bytes()).rgb for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")]
    detectors = {
        "downscaled": FaceDetector(DetectorConfig(detect_max_side=args.max_side)),
        "full": FaceDetector(DetectorConfig(detect_max_side=0)),
    }
    seconds = {}
    eyes = {}
    for name, detector in detectors.items():
        started = time.perf_counter()
        for _ in range(args.repeats):
            boxes = [detector.detect(rgb) for rgb in images]
        seconds[name] = (time.perf_counter() - started) / (args.repeats * len(images))
        eyes[name] = [eye_centres(detector.landmarks(rgb, found[0][0])) for rgb, found in zip(images, boxes)]
        print(f"{name}: {seconds[name] * 1000:.1f} ms per photo, faces {[len(b) for b in boxes]}")
    eye_shift = max(np.linalg.norm(a - b, axis=1).max() for a, b in zip(eyes["downscaled"], eyes["full"]))
    print(f"RESULT speedup={seconds['full'] / seconds['downscaled']:.2f} "
          f"downscaled_ms={seconds['downscaled'] * 1000:.1f} full_ms={seconds['full'] * 1000:.1f} "
          f"max_eye_shift_px={eye_shift:.2f} max_side={args.max_side}")


if __name__ == "__main__":
    main()
