"""Swap speed: per-pair tuning batched vs one pair at a time, and the swap job vs a plain loop.

All in one run on the same model and the sample photos:
1. the swap job's model work (E, the mix, the per-pair decoder tuning) on a
   batch of ``--batch`` pairs vs on each pair alone, the same number of steps
   (thresholds no pair reaches): ``batched`` is pairs/s batched over pairs/s alone;
2. the ``swap`` job on Ray (2 CPUs, a pair manifest, default tuning) vs a plain
   loop doing the same work in one process: the job's own stages (fetch both
   sides; decode, detect, align; E, D, tuning, identity distances; PNG, dlib's
   landmarks, paste-back) called in a row on batches of ``--batch``, no Ray.
   ``job_vs_plain`` is plain seconds over job seconds.

    python bench/swap.py [--model DIR] [--pairs 40] [--batch 16] [--steps 10]
"""

from __future__ import annotations

from jobs.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before ray is imported

import argparse  # noqa: E402
import itertools  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from pinch_inputs import align_largest_face, pinch_aligner  # noqa: E402

from facecore.methods.latent_swap import TuneConfig, swap_faces  # noqa: E402
from facecore.models.identity import IdentityScorer  # noqa: E402
from facecore.models.mobilenet import MobileNetV2Features  # noqa: E402
from facecore.training.swap import SwapCritics  # noqa: E402
from jobs.kinds.swap import (SwapAlignStage, SwapFetchStage, SwapFinishStage, SwapStage,  # noqa: E402
                             load_swapper, plan_pairs)
from jobs.samples import sample_photos  # noqa: E402
from jobs.spec import parse_spec  # noqa: E402


def plain_loop(spec, batch: int) -> int:
    """The job's stages in one process, batch by batch; returns the ok rows made."""
    rows = plan_pairs(spec)
    fetch = SwapFetchStage(spec.storage, spec.options.max_bytes)
    align, finish = SwapAlignStage(spec.options), SwapFinishStage(spec.options)
    model = SwapStage(spec.models.swap, spec.options, batch_size=batch, device="cpu")
    made = 0
    for start in range(0, rows.num_rows, batch):
        out = finish(model(align(fetch(rows.slice(start, batch)))))
        made += sum(status == "ok" for status in out.column("status").to_pylist())
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder of the swap (default: the shipped preset)")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="tuning steps per pair in part 1")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(2)
    swapper = load_swapper(args.model, None, "cpu")
    side = swapper.config.image_size
    critics = SwapCritics(MobileNetV2Features.pretrained(), IdentityScorer(device="cpu"))
    photos = sample_photos()
    aligner = pinch_aligner(side)
    faces = [align_largest_face(aligner, path) for path in photos.values()]
    ordered = list(itertools.permutations(range(len(faces)), 2))
    chosen = [ordered[i % len(ordered)] for i in range(args.batch)]

    def side_tensors(which: int):
        images = torch.from_numpy(np.stack([faces[p[which]].image for p in chosen])).permute(0, 3, 1, 2) / 255.0
        points = torch.from_numpy(np.stack([faces[p[which]].landmarks for p in chosen]).astype(np.float32))
        return images.float(), points

    (sources, source_points), (targets, target_points) = side_tensors(0), side_tensors(1)
    tune = TuneConfig(max_steps=args.steps, id_threshold=-1.0, att_threshold=-1.0)  # every pair takes every step
    swap_faces(swapper, sources[:2], source_points[:2], targets[:2], target_points[:2], critics,
               TuneConfig(max_steps=1))  # warm-up
    started = time.perf_counter()
    together = swap_faces(swapper, sources, source_points, targets, target_points, critics, tune)
    batched_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(args.batch):
        part = slice(i, i + 1)
        swap_faces(swapper, sources[part], source_points[part], targets[part], target_points[part], critics, tune)
    alone_seconds = time.perf_counter() - started
    assert (together.tune_steps == args.steps).all()
    print(f"tuning {args.steps} steps, {side} px: {args.batch / batched_seconds:.2f} pairs/s in a batch of "
          f"{args.batch}, {args.batch / alone_seconds:.2f} pairs/s one at a time")

    names = list(photos)
    pairs = [(names[s], names[t]) for s, t in (ordered[i % len(ordered)] for i in range(args.pairs))]
    with tempfile.TemporaryDirectory() as scratch:
        manifest = Path(scratch) / "pairs.csv"
        pd.DataFrame({"key": [f"p{i:04d}" for i in range(len(pairs))],
                      "source_uri": [str(photos[s]) for s, _ in pairs],
                      "target_uri": [str(photos[t]) for _, t in pairs]}).to_csv(manifest, index=False)
        fields = {"kind": "swap", "input": {"manifest": str(manifest)}, "models": {"swap": args.model},
                  "resources": {"batch_size": args.batch, "concurrency": 1}}
        spec = parse_spec({**fields, "output": {"path": str(Path(scratch) / "plain-unused")}})
        started = time.perf_counter()
        made = plain_loop(spec, args.batch)
        plain_seconds = time.perf_counter() - started

        import ray

        from jobs.pipeline import run

        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        try:
            job = parse_spec({**fields, "output": {"path": str(Path(scratch) / "out")}})
            started = time.perf_counter()
            summary = run(job, progress=False)
            job_seconds = time.perf_counter() - started
        finally:
            ray.shutdown()
    assert summary.ok_rows == made == len(pairs), (summary, made)
    print(f"swap job on Ray: {made / job_seconds:.2f} pairs/s; plain loop {made / plain_seconds:.2f}")
    print(f"RESULT batched={alone_seconds / batched_seconds:.2f} job_vs_plain={plain_seconds / job_seconds:.2f} "
          f"tune_pairs_per_s={args.batch / batched_seconds:.2f} job_pairs_per_s={made / job_seconds:.2f}")


if __name__ == "__main__":
    main()
