"""Face descriptors: the batched PyTorch port vs dlib's per-face call, on the CPU.

Both embed the same 150x150 chips of the real sample photos (cut by dlib), the
port in batches of 32, dlib one ``compute_face_descriptor`` call per face, and
their descriptors are compared.

    python bench/identity.py [--faces 256] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from facecore.face import FaceDetector
from facecore.face.dlib_models import RESNET_RECOGNITION, model_path
from facecore.images import decode
from facecore.models.identity import DlibResNet
from jobs.samples import sample_photos


def main() -> None:
    import dlib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    detector = FaceDetector()
    chips = []
    for path in sample_photos().values():
        image = decode(path.read_bytes()).rgb
        face = detector(image)[0]
        points = [dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks]
        shape = dlib.full_object_detection(dlib.rectangle(*[int(v) for v in face.box.as_list()]), points)
        chips.append(dlib.get_face_chip(image, shape, 150, 0.25))
    chips = [chips[i % len(chips)] for i in range(args.faces)]

    reference = dlib.face_recognition_model_v1(str(model_path(RESNET_RECOGNITION)))
    reference.compute_face_descriptor(chips[0])  # warm up
    started = time.perf_counter()
    expected = np.array([np.array(reference.compute_face_descriptor(chip)) for chip in chips])
    dlib_fps = len(chips) / (time.perf_counter() - started)

    model = DlibResNet.from_dat()
    batch = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        model(batch[: args.batch])  # warm up
        started = time.perf_counter()
        ported = torch.cat([model(batch[i:i + args.batch]) for i in range(0, len(batch), args.batch)]).numpy()
        port_fps = len(chips) / (time.perf_counter() - started)
    difference = float(np.abs(ported - expected).max())
    print(f"dlib: {dlib_fps:.1f} faces/s (one call per face); port: {port_fps:.1f} faces/s "
          f"(batch {args.batch}, {torch.get_num_threads()} threads); max |difference| {difference:.2e}")
    print(f"RESULT port_fps={port_fps:.1f} dlib_fps={dlib_fps:.1f} ratio={port_fps / dlib_fps:.2f} "
          f"max_abs_diff={difference:.2e}")


if __name__ == "__main__":
    main()
