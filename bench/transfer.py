"""Transfer speed: the model's work batched vs one face at a time, and the transfer job vs a plain loop.

All in one run on the same models and the sample photos:
1. faces/s of the transfer job's model stage (the regressor, the target
   landmarks, G, the identity score) on batches of 32 vs one face at a time:
   ``batched``; and of G's forward alone, in calls of 8 (what the stage makes on
   a CPU) and of 32 vs one face a call: ``batched_g``, ``batched_g32``;
2. the ``transfer`` job on Ray (2 CPUs, ``targets: {augment: K}``) vs a plain loop
   doing the same work in one process: the job's own stages (fetch, decode,
   detect, align and fan out; regressor, target landmarks, G, identity score;
   PNG, dlib's landmarks of the result, paste-back) called in a row on batches of
   32, no Ray. ``job_vs_plain`` is plain seconds over job seconds.

    python bench/transfer.py [--generator DIR] [--images 64] [--augment 2]
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

from facecore import weights  # noqa: E402
from facecore.methods.expression_transfer import drawn_expressions, target_landmarks  # noqa: E402
from facecore.models.expression import ExpressionGenerator, generator_inputs  # noqa: E402
from facecore.models.regressor import Regressor  # noqa: E402
from facecore.presets import preset_path  # noqa: E402
from facecore.rig import default_schema  # noqa: E402
from jobs.kinds.recognize import model_inputs  # noqa: E402
from jobs.kinds.transfer import (G_CPU_CHUNK, TransferAlignStage, TransferFinishStage,  # noqa: E402
                                 TransferOptions, TransferStage)
from jobs.samples import sample_photos  # noqa: E402
from jobs.stages import FetchStage  # noqa: E402


def plain_loop(paths: list[Path], generator_uri: str, options: TransferOptions) -> int:
    """The job's stages in one process, batch by batch; returns the rows made."""
    fetch, align = FetchStage(), TransferAlignStage(options)
    model = TransferStage(generator_uri, None, options, batch_size=32, device="cpu")
    finish = TransferFinishStage(options)
    rows = 0
    for start in range(0, len(paths), 32):
        part = paths[start:start + 32]
        batch = {"key": [f"k{start + i:05d}" for i in range(len(part))], "uri": [str(p) for p in part]}
        rows += finish(model(align(fetch(batch)))).num_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default=None, help="model folder of G (default: the shipped preset)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--augment", type=int, default=2)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    generator_uri = args.generator or preset_path("expression")
    generator = weights.load_model(ExpressionGenerator, generator_uri).eval()
    regressor = weights.load_model(Regressor, preset_path("regressor")).eval()
    schema = default_schema()
    options = TransferOptions(targets={"augment": args.augment})
    side = generator.config.image_size

    photos = list(sample_photos().values())
    detector = pinch_aligner(options.size)
    faces = [align_largest_face(detector, path) for path in photos]
    crops = [faces[i % len(faces)].image for i in range(args.images)]
    landmarks = np.stack([faces[i % len(faces)].landmarks for i in range(args.images)]).astype(np.float32)
    with torch.inference_mode():
        images, points = model_inputs(crops, landmarks, regressor.config.image_size)
        vectors, _ = regressor.vectors(images, points)
        wanted = torch.from_numpy(np.concatenate([drawn_expressions(schema, f"k{i}", 0, 1, 0)
                                                  for i in range(args.images)]))
        targets = target_landmarks(landmarks, vectors, wanted, schema, options.size)
        sources, source_points = model_inputs(crops, landmarks, side)
        inputs = generator_inputs(source_points, torch.from_numpy(targets * side / options.size), generator.config)

        def forward(part: slice) -> None:
            generator(sources[part], inputs["source_maps"][part], inputs["target_maps"][part],
                      inputs["landmark_flow"][part])

        def rate(calls: int) -> float:
            forward(slice(0, calls))  # warm-up
            started = time.perf_counter()
            for start in range(0, args.images, calls):
                forward(slice(start, start + calls))
            return args.images / (time.perf_counter() - started)

        g_rates = {calls: rate(calls) for calls in (1, G_CPU_CHUNK, 32)}
    print(f"G at {side} px, faces/s by faces per call: " + ", ".join(f"{k}: {v:.1f}" for k, v in g_rates.items()))

    rows = TransferAlignStage(options.model_copy(update={"paste_back": False}))(FetchStage()({
        "key": [f"k{i:05d}" for i in range(args.images)],
        "uri": [str(photos[i % len(photos)]) for i in range(args.images)]})).to_pylist()[:args.images]
    stage = TransferStage(generator_uri, None, options, batch_size=32, device="cpu")
    stage.infer(rows[:8])  # warm-up

    def stage_rate(size: int) -> float:
        started = time.perf_counter()
        for start in range(0, len(rows), size):
            stage.infer(rows[start:start + size])
        return len(rows) / (time.perf_counter() - started)

    batched_fps, single_fps = stage_rate(32), stage_rate(1)
    print(f"model stage: batches of 32 {batched_fps:.1f} faces/s, one at a time {single_fps:.1f} faces/s")

    paths = [photos[i % len(photos)] for i in range(args.images)]
    torch.set_num_threads(2)
    started = time.perf_counter()
    made = plain_loop(paths, generator_uri, options)
    plain_seconds = time.perf_counter() - started
    summary, job_seconds = timed_job({"kind": "transfer", "models": {"expression": generator_uri},
                                      "options": {"targets": {"augment": args.augment}},
                                      "resources": {"batch_size": 32, "concurrency": 1}}, paths)
    assert summary.ok_rows == made == args.images * args.augment, (summary, made)
    print(f"transfer job on Ray: {made / job_seconds:.2f} results/s; plain loop {made / plain_seconds:.2f}")
    print(f"RESULT batched={batched_fps / single_fps:.2f} batched_g={g_rates[G_CPU_CHUNK] / g_rates[1]:.2f} "
          f"batched_g32={g_rates[32] / g_rates[1]:.2f} job_vs_plain={plain_seconds / job_seconds:.2f} "
          f"stage_fps={batched_fps:.1f} job_rps={made / job_seconds:.2f}")


if __name__ == "__main__":
    main()
