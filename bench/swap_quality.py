"""Face swap, the latent swap (with its default per-pair tuning) against the classic landmark swap.

1. Held-out rig pairs of two people (``jobs.samples.aligned_swap_pairs``, a seed no
   training run uses), each aligned on its own landmarks as photos are: both
   methods put the source's identity on the target, and both are scored by the
   L1 to the ground truth, the target redrawn with the source's identity
   parameters. ``rig_l1_ratio`` = latent swap / baseline. The untuned swap's and
   copying the target's L1 are printed beside it.
2. Real photos (the sample photos: three of Obama, one of Biden, Eileen
   Collins), every ordered pair of two photos, aligned as the swap job aligns
   them. Each result is re-encoded as JPEG at quality 80, dlib's HOG detector looks
   for a face in it (``detect``), and dlib's descriptor of it (at the landmarks
   found, else the target's) is matched to the people's mean descriptors (each
   person's photos as sources): ``id_top1`` is the share whose nearest person is
   the source's. ``att_nme``: dlib's landmarks of the result against the target
   crop's, over the eye-corner distance (the results where a face is found).
   Pairs of two photos of one person are in the set (6 of 20) and are right by
   construction; the figure over the 14 pairs of two people is printed beside.

    python bench/swap_quality.py [--model DIR] [--pairs 100]

    RESULT rig_l1_ratio=<swap / baseline> id_top1=<swap> id_top1_baseline=<baseline> att_nme=<swap>
           detect=<swap> ...
"""

from __future__ import annotations

import argparse
import itertools
import time

import cv2
import numpy as np
import torch
from pinch_inputs import align_largest_face, pinch_aligner

from facecore.methods.landmark_swap import landmark_swap
from facecore.methods.latent_swap import TuneConfig, regressed_guides, swap_faces
from facecore.models.identity import IdentityScorer
from facecore.models.latent import composite
from facecore.models.mobilenet import MobileNetV2Features
from facecore.training.swap import SwapCritics
from facecore.rig import default_schema
from jobs.kinds.recognize import load_regressor
from jobs.kinds.swap import TuneOptions, load_swapper
from jobs.samples import aligned_swap_pairs, sample_photos

RIG = default_schema()
REGRESSOR = load_regressor(None, None, "cpu", RIG)  # the swap job's: the warp to the source's face shape
PEOPLE = {"obama.jpg": "obama", "obama2.jpg": "obama", "obama3.jpg": "obama", "biden.jpg": "biden",
          "astronaut.png": "collins"}


def as_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def as_pixels(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def latent_swaps(swapper, critics, tune: TuneConfig, sources, source_points, targets, target_points,
                 rendered: np.ndarray | None = None, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The swap job's model work on aligned crops at the model's side (the regressor's warp, E, D,
    tuning): (results uint8, tune steps). ``rendered``: the targets' rig vectors when they are
    renders (as a job with a render output for targets has them)."""
    images, steps = [], []
    for start in range(0, len(sources), batch):
        part = slice(start, start + batch)
        inputs = (as_tensor(sources[part]), torch.from_numpy(source_points[part]), as_tensor(targets[part]),
                  torch.from_numpy(target_points[part]))
        prior, source_layer = regressed_guides(REGRESSOR, RIG, *inputs,
                                               rendered=None if rendered is None else list(rendered[part]))
        known = None if rendered is None else torch.tensor([vector is not None for vector in rendered[part]])
        result = swap_faces(swapper, *inputs, critics, tune, prior=prior, source=source_layer, rendered=known)
        images.append(as_pixels(result.images))
        steps.append(result.tune_steps.numpy())
    return np.concatenate(images), np.concatenate(steps)


def rig_scores(swapper, critics, tune: TuneConfig, count: int) -> dict[str, float]:
    side = swapper.config.image_size
    (sources, source_points, _), (targets, target_points, rendered), (truths, _, _) = aligned_swap_pairs(
        count, 424242, side)
    # The targets are renders, as a job's are when input.targets is a render output: the job
    # knows their rig vectors. The sources are taken as photos (the regressor's estimate).
    tuned, steps = latent_swaps(swapper, critics, tune, sources, source_points, targets, target_points, rendered)
    plain, _ = latent_swaps(swapper, critics, TuneConfig(max_steps=0), sources, source_points, targets,
                            target_points, rendered)
    # Both sides taken as photos (the job's path for photo targets: both shapes estimated, and the source layer).
    as_photos, _ = latent_swaps(swapper, None, TuneConfig(max_steps=0), sources, source_points, targets,
                                target_points, np.full(len(targets), None))
    baseline = np.stack([landmark_swap(s, sp, t, tp) for s, sp, t, tp in
                         zip(sources, source_points, targets, target_points)])
    # The warp alone (what the swap starts from), for reference.
    target_t = as_tensor(targets)
    prior, _ = regressed_guides(REGRESSOR, RIG, as_tensor(sources), torch.from_numpy(source_points), target_t,
                                torch.from_numpy(target_points), list(rendered))
    still = torch.zeros(len(targets), 4, side, side)  # mask 0, no flow of D's own, no source
    warp_only = as_pixels(composite(torch.zeros_like(target_t), still, target_t, prior))

    def l1(images: np.ndarray) -> float:
        return float(np.abs(images.astype(np.float64) - truths.astype(np.float64)).mean() / 255.0)

    scores = {"swap": l1(tuned), "untuned": l1(plain), "baseline": l1(baseline), "copy_target": l1(targets),
              "warp_only": l1(warp_only), "both_regressed": l1(as_photos)}
    print(f"rig pairs ({count}, {side} px): L1 to the truth " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
          + f"; tune steps mean {steps.mean():.1f}, max {steps.max()}")
    return scores


def jpeg(image: np.ndarray, quality: int = 80) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def photo_scores(results: np.ndarray, target_points: np.ndarray, sources_of: list[str], gallery: dict,
                 scorer: IdentityScorer, detector) -> dict[str, np.ndarray]:
    """Per result: found by dlib, landmark NME to the target, nearest person."""
    from facecore.methods.expression_transfer import landmark_nme

    names = sorted(gallery)
    means = torch.stack([gallery[name] for name in names])
    found, nme, nearest = [], [], []
    for image, wanted in zip(results, target_points):
        image = jpeg(image)
        faces = detector(image)
        found.append(bool(faces))
        nme.append(landmark_nme(faces[0].landmarks, wanted) if faces else np.nan)
        points = faces[0].landmarks if faces else wanted
        with torch.inference_mode():
            descriptor = scorer.embed(torch.from_numpy(image).permute(2, 0, 1)[None].float(), points[None])
        nearest.append(names[int((means - descriptor).norm(dim=1).argmin())])
    right = np.array([guess == truth for guess, truth in zip(nearest, sources_of)])
    return {"found": np.array(found), "nme": np.array(nme), "right": right, "nearest": nearest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder of the swap (default: the shipped preset)")
    parser.add_argument("--pairs", type=int, default=100)
    for name in ("max_steps", "id_threshold", "att_threshold", "learning_rate"):
        parser.add_argument("--" + name.replace("_", "-"), type=int if name == "max_steps" else float, default=None,
                            help=f"tuning's {name} (default: the job's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    swapper = load_swapper(args.model, None, "cpu")
    scorer = IdentityScorer(device="cpu")
    critics = SwapCritics(MobileNetV2Features.pretrained(), scorer)
    tune = TuneConfig(**{name: value if getattr(args, name) is None else getattr(args, name)
                         for name, value in TuneOptions().model_dump().items()})
    print(f"tuning: {tune}; identity layers {swapper.config.identity_layers}")
    started = time.perf_counter()
    rig = rig_scores(swapper, critics, tune, args.pairs)
    print(f"rig part: {time.perf_counter() - started:.0f} s")

    from facecore.face.detector import DetectorConfig, FaceDetector

    size, side = 128, swapper.config.image_size
    photos = sample_photos()
    aligner = pinch_aligner(size)
    faces = {name: align_largest_face(aligner, photos[name]) for name in PEOPLE}
    with torch.inference_mode():
        descriptors = {name: scorer.embed(as_tensor([faces[name].image]) * 255.0, faces[name].landmarks[None])[0]
                       for name in PEOPLE}
    gallery = {person: torch.stack([descriptors[n] for n in PEOPLE if PEOPLE[n] == person]).mean(dim=0)
               for person in set(PEOPLE.values())}
    pairs = list(itertools.permutations(PEOPLE, 2))
    scale = side / size
    crop = lambda name: cv2.resize(faces[name].image, (side, side), interpolation=cv2.INTER_AREA)  # noqa: E731
    points = lambda name: (faces[name].landmarks * scale).astype(np.float32)  # noqa: E731
    tuned, steps = latent_swaps(swapper, critics, tune, np.stack([crop(s) for s, _ in pairs]),
                                np.stack([points(s) for s, _ in pairs]), np.stack([crop(t) for _, t in pairs]),
                                np.stack([points(t) for _, t in pairs]))
    if side != size:
        tuned = np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR) for image in tuned])
    baseline = np.stack([landmark_swap(faces[s].image, faces[s].landmarks, faces[t].image, faces[t].landmarks)
                         for s, t in pairs])
    detector = FaceDetector(DetectorConfig(detector="hog", detect_max_side=0, upsample=1, min_score=0.0))
    target_points = np.stack([faces[t].landmarks for _, t in pairs])
    truth = [PEOPLE[s] for s, _ in pairs]
    two_people = np.array([PEOPLE[s] != PEOPLE[t] for s, t in pairs])
    scores = {name: photo_scores(images, target_points, truth, gallery, scorer, detector)
              for name, images in (("swap", tuned), ("baseline", baseline))}
    for name, result in scores.items():
        print(f"photos, {name}: id_top1 {result['right'].mean():.3f} (two people: "
              f"{result['right'][two_people].mean():.3f}), detect {result['found'].mean():.3f}, "
              f"att_nme {np.nanmean(result['nme']):.4f}")
    print("nearest person per pair (swap): " + ", ".join(
        f"{s.split('.')[0]}->{t.split('.')[0]}: {guess}" for (s, t), guess in zip(pairs, scores["swap"]["nearest"])))
    print(f"photo tune steps: mean {steps.mean():.1f}, max {steps.max()}")
    ours, theirs = scores["swap"], scores["baseline"]
    print(f"RESULT rig_l1_ratio={rig['swap'] / rig['baseline']:.3f} id_top1={ours['right'].mean():.3f} "
          f"id_top1_baseline={theirs['right'].mean():.3f} att_nme={np.nanmean(ours['nme']):.4f} "
          f"detect={ours['found'].mean():.3f} untuned_rig_l1_ratio={rig['untuned'] / rig['baseline']:.3f} "
          f"both_regressed_rig_l1_ratio={rig['both_regressed'] / rig['baseline']:.3f} "
          f"id_top1_two_people={ours['right'][two_people].mean():.3f} "
          f"id_top1_two_people_baseline={theirs['right'][two_people].mean():.3f} "
          f"att_nme_baseline={np.nanmean(theirs['nme']):.4f} detect_baseline={theirs['found'].mean():.3f}")


if __name__ == "__main__":
    main()
