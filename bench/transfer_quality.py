"""Expression transfer, the learned G against the piecewise-affine baseline, on rig pairs and on photos.

1. Held-out rig pairs of one identity (``jobs.samples.aligned_expression_pairs``,
   a seed no training run uses): G moves the source to the target's landmarks,
   and so does the baseline (``facecore.methods.landmark_warp``); both are scored
   by the L1 to the true second render, beside the L1 of not moving the source.
   ``rig_l1_ratio`` is on the transfer job's own geometry: the target keeps the
   source's pose and frame, only the expression changes. Two harder sets are
   reported beside it: ``pose`` (the training pairs' kind: the pose moved by up to
   ±0.05 as well) and ``reframed`` (that, and the target aligned on its own
   landmarks, as two photos of one person are, so that the whole crop moves).
2. Real photos (the sample photos, every named expression of the rig): the
   transfer job's own stages make the target landmarks and G's results; the
   baseline warps the same aligned crops to the same landmarks. Both are scored
   alike: ``id_keep`` the share of results whose dlib descriptor is within 0.6
   of the source's, ``detect`` the share in which dlib's HOG detector finds a
   face, ``nme`` dlib's landmarks of the result against the target landmarks
   (over the faces found in both; ``nme_ratio`` = G / baseline).

    python bench/transfer_quality.py [--generator DIR] [--pairs 200]

    RESULT rig_l1_ratio=<G / baseline> id_keep=<G> nme_ratio=<G / baseline> detect=<G> ...
           pose_l1_ratio=<G / baseline> reframed_l1_ratio=<G / baseline> ...
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from facecore import weights
from facecore.methods.landmark_warp import piecewise_affine_warp
from facecore.models.expression import ExpressionGenerator, generator_inputs
from jobs.samples import aligned_expression_pairs


def photo_scores(sources: list[np.ndarray], source_points: list[np.ndarray], results: list[np.ndarray],
                 target_points: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per result: dlib distance to its source, whether dlib finds a face, dlib's landmark NME to the target."""
    from facecore.face.detector import DetectorConfig, FaceDetector
    from facecore.methods.expression_transfer import landmark_nme
    from facecore.models.identity import IdentityScorer

    scorer = IdentityScorer(device="cpu")
    detector = FaceDetector(DetectorConfig(detector="hog", detect_max_side=0, upsample=1, min_score=0.0))

    def embed(images, points):
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            return scorer.embed(batch, np.stack(points))

    distance = (embed(sources, source_points) - embed(results, target_points)).norm(dim=1).numpy()
    found = [detector(image) for image in results]
    nme = np.array([landmark_nme(faces[0].landmarks, wanted) if faces else np.nan
                    for faces, wanted in zip(found, target_points)])
    return {"distance": distance, "detected": np.array([bool(faces) for faces in found]), "nme": nme}


def photo_results(generator_uri: str) -> tuple[list, list, list, list, list]:
    """Every sample photo given every named expression by the transfer job's stages:
    sources, their landmarks, G's results, the target landmarks, the target names."""
    from facecore.images import decode_png
    from facecore.rig import default_schema
    from jobs.kinds.transfer import TransferAlignStage, TransferOptions, TransferStage
    from jobs.samples import sample_photos
    from jobs.stages import FetchStage

    options = TransferOptions(targets={"expressions": sorted(default_schema().expressions)}, paste_back=False)
    photos = sample_photos()
    batch = {"key": list(photos), "uri": [str(path) for path in photos.values()]}
    aligned = TransferAlignStage(options)(FetchStage()(batch))
    rows = TransferStage(generator_uri, None, options, batch_size=32, device="cpu")(aligned).to_pylist()
    rows = [row for row in rows if row["status"] == "ok"]
    side = options.size

    def crop(data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).reshape(side, side, 3)

    return ([decode_png(row["aligned"]) for row in rows],
            [np.asarray(row["aligned_landmarks"], np.float32).reshape(68, 2) for row in rows],
            [crop(row["result"]) for row in rows],
            [np.asarray(row["target_landmarks"], np.float32).reshape(68, 2) for row in rows],
            [f"{row['key']}:{row['target']}" for row in rows])


REGIONS = ("outside", "face", "mouth", "eyes")


def region_masks(source_points: np.ndarray, target_points: np.ndarray, size: int) -> np.ndarray:
    """(N, 68, 2) twice → (N, 4, S, S) masks that split each crop into ``REGIONS``: the mouth and the
    eyes (each the hull of the source's and the target's points), the rest of the face (the hull of
    all 68 of both) and everything outside it."""
    import cv2

    masks = np.zeros((len(source_points), len(REGIONS), size, size), np.uint8)
    features = {"mouth": [range(48, 60)], "eyes": [range(36, 42), range(42, 48)]}
    for i, points in enumerate(zip(source_points, target_points)):
        hull = cv2.convexHull(np.concatenate(points).astype(np.float32)).astype(np.int32)
        cv2.fillConvexPoly(masks[i, 1], hull, 1)
        for name, groups in features.items():
            layer = masks[i, REGIONS.index(name)]
            for group in groups:
                part = np.concatenate([p[list(group)] for p in points]).astype(np.float32)
                cv2.fillConvexPoly(layer, cv2.convexHull(part).astype(np.int32), 1)
            masks[i, 1] &= 1 - layer
        masks[i, 0] = masks[i, 1:].sum(axis=0) == 0
    return masks


def rig_scores(generator: ExpressionGenerator, pairs: int, seed: int, pose_jitter: float,
               pair_frame: str) -> dict[str, object]:
    """On held-out rig pairs: the per-pixel L1 to the true target of G (``model``), of the baseline
    and of the unmoved source (``copy``), and per region of the crop (``REGIONS``) the share of the
    baseline's error there and G's ratio to it there (``regions``)."""
    size = generator.config.image_size
    (source, source_points, _), (target, target_points, _) = aligned_expression_pairs(
        pairs, seed, size, pose_jitter=pose_jitter, pair_frame=pair_frame)

    def tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

    results = []
    with torch.no_grad():
        for start in range(0, pairs, 32):
            part = slice(start, start + 32)
            inputs = generator_inputs(torch.from_numpy(source_points[part]), torch.from_numpy(target_points[part]),
                                      generator.config)
            result, _ = generator(tensor(source[part]), inputs["source_maps"], inputs["target_maps"],
                                  inputs["landmark_flow"])
            results.append(result)
    warped = np.stack([piecewise_affine_warp(image, a, b) for image, a, b in zip(source, source_points, target_points)])
    truth = tensor(target)
    model_error = (torch.cat(results) - truth).abs().mean(dim=1)
    baseline_error = (tensor(warped) - truth).abs().mean(dim=1)
    masks = torch.from_numpy(region_masks(source_points, target_points, size)).float()
    regions = {name: (float((baseline_error * masks[:, k]).sum() / baseline_error.sum()),
                      float((model_error * masks[:, k]).sum() / (baseline_error * masks[:, k]).sum().clamp_min(1e-12)))
               for k, name in enumerate(REGIONS)}
    return {"model": float(model_error.mean()), "baseline": float(baseline_error.mean()),
            "copy": float((tensor(source) - truth).abs().mean()), "regions": regions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default=None, help="model folder of G (default: the shipped preset)")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=424242)
    args = parser.parse_args()
    from facecore.presets import preset_path

    generator_uri = args.generator or preset_path("expression")
    generator = weights.load_model(ExpressionGenerator, generator_uri).eval()
    rig = {name: rig_scores(generator, args.pairs, args.seed, jitter, frame)
           for name, jitter, frame in (("job", 0.0, "source"), ("pose", 0.05, "source"), ("reframed", 0.05, "target"))}
    for name, scores in rig.items():
        print(f"held-out rig pairs ({name}): {args.pairs} at {generator.config.image_size} px: "
              f"L1 G {scores['model']:.4f}, baseline {scores['baseline']:.4f}, copy {scores['copy']:.4f}, "
              f"ratio {scores['model'] / scores['baseline']:.3f}")
        print("  where the baseline's error is, and G's ratio there: " + ", ".join(
            f"{region} {share:.0%} -> {ratio:.2f}" for region, (share, ratio) in scores["regions"].items()))
    model_l1, baseline_l1, copy_l1 = rig["job"]["model"], rig["job"]["baseline"], rig["job"]["copy"]

    sources, source_points, results, target_points, names = photo_results(generator_uri)
    warps = [piecewise_affine_warp(image, a, b) for image, a, b in zip(sources, source_points, target_points)]
    model = photo_scores(sources, source_points, results, target_points)
    base = photo_scores(sources, source_points, warps, target_points)
    both = ~np.isnan(model["nme"]) & ~np.isnan(base["nme"])
    for i, name in enumerate(names):
        print(f"photo {name:28s} distance G {model['distance'][i]:.3f} baseline {base['distance'][i]:.3f}  "
              f"nme G {model['nme'][i]:.4f} baseline {base['nme'][i]:.4f}")
    id_keep, detect = float((model["distance"] < 0.6).mean()), float(model["detected"].mean())
    nme_ratio = float(model["nme"][both].mean() / base["nme"][both].mean())
    print(f"photos: {len(names)} results; baseline id_keep {(base['distance'] < 0.6).mean():.3f} "
          f"detect {base['detected'].mean():.3f}")
    print(f"RESULT rig_l1_ratio={model_l1 / baseline_l1:.3f} id_keep={id_keep:.3f} nme_ratio={nme_ratio:.3f} "
          f"detect={detect:.3f} pose_l1_ratio={rig['pose']['model'] / rig['pose']['baseline']:.3f} "
          f"reframed_l1_ratio={rig['reframed']['model'] / rig['reframed']['baseline']:.3f} rig_l1={model_l1:.4f} "
          f"baseline_l1={baseline_l1:.4f} copy_l1={copy_l1:.4f} "
          f"nme={model['nme'][both].mean():.4f} baseline_nme={base['nme'][both].mean():.4f} photos={len(names)}")


if __name__ == "__main__":
    main()
