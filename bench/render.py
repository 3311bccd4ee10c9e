"""Avatar rendering speed, the render job's scaling, and how dlib sees the renders.

1. Renders per second on one core at 128x128 and 256x256 (a plain loop over
   random parameter sets, PNG encoding excluded).
2. The ``render`` job (Ray tasks, PNG-encoded Parquet parts) over the same number
   of renders with concurrency 2 vs concurrency 1 on a 2-CPU Ray.
3. dlib's detector + 68-point predictor on random frontal-ish renders (|yaw|,
   |pitch|, |roll| <= 7 degrees) at 256x256: how often it finds the face and how
   far its landmarks are from the rig's, as a fraction of the eye distance.

    python bench/render.py [--renders 2000] [--job-renders 4000] [--dlib-renders 300]
"""

from __future__ import annotations

from jobs.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before ray is imported

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from facecore.face import FaceDetector
from facecore.face.landmarks import eye_centres
from facecore.rig import Renderer, default_schema
from jobs.pipeline import run
from jobs.spec import parse_spec


def per_core_rate(renderer: Renderer, samples: list[dict], size: int) -> float:
    renderer.render(samples[0], size)  # warm caches
    started = time.perf_counter()
    for values in samples:
        renderer.render(values, size)
    return len(samples) / (time.perf_counter() - started)


def job_seconds(count: int, concurrency: int, scratch: Path) -> float:
    spec = parse_spec({
        "kind": "render",
        "output": {"path": str(scratch / f"renders-{concurrency}")},
        "options": {"count": count, "size": 128, "seed": 7},
        "resources": {"concurrency": concurrency},
    })
    started = time.perf_counter()
    summary = run(spec, progress=False)
    assert summary.ok_rows == count, summary
    return time.perf_counter() - started


def dlib_agreement(renderer: Renderer, count: int) -> tuple[float, float]:
    detector = FaceDetector()
    rng = np.random.default_rng(11)
    found, errors = 0, []
    for values in default_schema().sample(rng, count):
        values.update(yaw=rng.uniform(0.4, 0.6), pitch=rng.uniform(0.4, 0.6), roll=rng.uniform(0.4, 0.6))
        render = renderer.render(values, 256)
        faces = detector(render.image)
        if faces:
            found += 1
            eye_distance = np.linalg.norm(np.diff(eye_centres(render.landmarks), axis=0))
            errors.append(np.linalg.norm(faces[0].landmarks - render.landmarks, axis=1).mean() / eye_distance)
    return found / count, float(np.mean(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=2000)
    parser.add_argument("--job-renders", type=int, default=4000)
    parser.add_argument("--dlib-renders", type=int, default=300)
    args = parser.parse_args()
    cv2.setNumThreads(1)

    renderer = Renderer()
    samples = default_schema().sample(np.random.default_rng(0), args.renders)
    rate_128 = per_core_rate(renderer, samples, 128)
    rate_256 = per_core_rate(renderer, samples[: args.renders // 2], 256)
    print(f"one core: {rate_128:.0f} renders/s at 128x128, {rate_256:.0f} renders/s at 256x256")

    rate, error = dlib_agreement(renderer, args.dlib_renders)
    print(f"dlib on {args.dlib_renders} frontal-ish renders: found {rate:.1%}, "
          f"mean landmark error {error:.3f} x eye distance")

    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        job_seconds(64, 2, Path(scratch) / "warm")  # worker processes up, as on a live cluster
        one = job_seconds(args.job_renders, 1, Path(scratch))
        two = job_seconds(args.job_renders, 2, Path(scratch))
    ray.shutdown()
    print(f"render job, {args.job_renders} at 128x128 with PNG + Parquet: "
          f"{args.job_renders / one:.0f}/s on 1 CPU, {args.job_renders / two:.0f}/s on 2 CPUs")
    print(f"RESULT per_core_128={rate_128:.0f} per_core_256={rate_256:.0f} job_2cpu_vs_1cpu={one / two:.2f} "
          f"job_2cpu_per_s={args.job_renders / two:.0f} dlib_found={rate:.3f} dlib_err_iod={error:.3f}")


if __name__ == "__main__":
    main()
