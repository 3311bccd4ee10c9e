"""Photos aligned as the pinch job aligns them, for the pinch benchmarks.

68-point affine onto the rig's reference face at the imitator's size, largest
face only (SPEC.md §4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facecore.face import DetectorConfig, FaceDetector
from facecore.images import decode
from facecore.rig import reference_face


def pinch_aligner(size: int) -> FaceDetector:
    return FaceDetector(DetectorConfig(), reference=reference_face(size), align_method="affine68")


def align_largest_face(detector: FaceDetector, path: Path):
    """The photo's largest face, aligned: ``.image`` (S, S, 3) uint8 and ``.landmarks`` (68, 2)."""
    image = decode(path.read_bytes()).rgb
    return detector.align(image, detector(image)[0].landmarks)


def as_batch(crops: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, S, S) floats in [0, 1], what ``pinch`` takes."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0


def timed_job(fields: dict, paths: list[Path]):
    """Run a photo job over ``paths`` on a fresh local Ray with 2 CPUs: (summary, seconds of ``run``).

    ``fields``: the spec without input and output (kind, models, options, resources).
    """
    import tempfile
    import time

    import ray

    from jobs.manifest import write_manifest
    from jobs.pipeline import run
    from jobs.spec import parse_spec

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            manifest = Path(scratch) / "m.parquet"
            write_manifest([str(p) for p in paths], str(manifest), keys=[f"k{i:05d}" for i in range(len(paths))])
            spec = parse_spec({**fields, "input": {"manifest": str(manifest)},
                               "output": {"path": str(Path(scratch) / "out")}})
            started = time.perf_counter()
            summary = run(spec, progress=False)
            return summary, time.perf_counter() - started
    finally:
        ray.shutdown()
