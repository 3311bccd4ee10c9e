"""Align throughput: the Ray pipeline on 2 CPUs vs a plain single-process loop.

Both do the same facecore work per image (read, decode, detect on a downscaled
copy, 68 landmarks, align, PNG-encode the crop) over the same few hundred real
photos. The pipeline time includes its actors' start-up (model loading), manifest
reading, the Parquet commits and the final reconciliation; Ray itself is started,
and warmed by one tiny job, before the clock runs (a cluster outlives its jobs).

``pipeline_ips`` is end to end; ``steady_ips`` removes the fixed per-job start-up
by timing a second, smaller job: (N - n) / (T_N - T_n).

    python bench/align.py [--images 500] [--cpus 2]
"""

from __future__ import annotations

from jobs.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before ray is imported

import argparse
import tempfile
import time
from pathlib import Path

import cv2

from facecore.face import DetectorConfig, FaceDetector, FacePolicy, mean_face_reference
from facecore.images import decode, encode_png
from jobs.manifest import write_manifest
from jobs.pipeline import run
from jobs.samples import sample_photos
from jobs.spec import parse_spec

NAMES = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png"]


def plain_loop(paths: list[Path]) -> tuple[float, int]:
    detector = FaceDetector(DetectorConfig(), reference=mean_face_reference(256))
    policy = FacePolicy.parse("largest")
    started = time.perf_counter()
    faces = 0
    for path in paths:
        image = decode(path.read_bytes())
        for face in policy.select(detector(image.rgb)):
            encode_png(detector.align(image.rgb, face.landmarks).image)
            faces += 1
    return time.perf_counter() - started, faces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # the same single-threaded OpenCV as inside each actor

    photos = sample_photos()
    paths = [photos[NAMES[i % len(NAMES)]] for i in range(args.images)]

    plain_seconds, plain_faces = plain_loop(paths)
    print(f"plain loop: {args.images} images, {plain_faces} faces in {plain_seconds:.2f} s")

    import ray

    ray.init(num_cpus=args.cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    def timed_job(count: int) -> tuple[float, object]:
        with tempfile.TemporaryDirectory() as scratch:
            manifest = Path(scratch) / "manifest.parquet"
            write_manifest([str(p) for p in paths[:count]], str(manifest),
                           keys=[f"img-{i:05d}" for i in range(count)])
            spec = parse_spec({
                "kind": "align",
                "input": {"manifest": str(manifest)},
                "output": {"path": str(Path(scratch) / "out")},
                "resources": {"concurrency": args.cpus, "batch_size": 8},
            })
            started = time.perf_counter()
            summary = run(spec, progress=False)
            return time.perf_counter() - started, summary

    timed_job(4)  # warm-up: worker processes exist, as on a cluster that outlives jobs
    small = max(args.images // 5, 1)
    small_seconds, _ = timed_job(small)
    pipeline_seconds, summary = timed_job(args.images)
    ray.shutdown()
    assert summary.output_rows == args.images and summary.ok_rows == plain_faces, summary
    print(f"pipeline: {summary.output_rows} rows ({summary.ok_rows} ok) in {pipeline_seconds:.2f} s "
          f"on {args.cpus} CPUs, {summary.parts} parts; {small} rows in {small_seconds:.2f} s")

    plain_ips = args.images / plain_seconds
    pipeline_ips = args.images / pipeline_seconds
    steady_ips = (args.images - small) / (pipeline_seconds - small_seconds)
    print(f"RESULT pipeline_ips={pipeline_ips:.2f} plain_ips={plain_ips:.2f} "
          f"ratio={pipeline_ips / plain_ips:.2f} steady_ips={steady_ips:.2f} "
          f"steady_ratio={steady_ips / plain_ips:.2f} startup_s={small_seconds - small / steady_ips:.2f} "
          f"images={args.images} cpus={args.cpus}")


if __name__ == "__main__":
    main()
