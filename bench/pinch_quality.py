"""Recognize and pinch quality on held-out rig renders (known truth) and on real photos.

1. Renders: held-out renders at random poses over the rig's whole range, aligned
   onto the reference face the way the jobs align photos (68-point affine, on
   the render's own landmarks: dlib finds only ~3 in 4 rig faces and is ~7 px off
   at 256 px). Mean absolute error of the recovered continuous parameters
   (identity, expression, appearance; the pose is reported apart, as most of it
   is what alignment removes) over the error of the reference face; accuracy of
   the discrete styles. Parameters marked ``visible: false`` count in the main
   figure and are also left out in ``mae_ratio_visible``.
2. Photos: the sample photos aligned as the jobs align them (dlib, 68-point
   affine). The avatar's landmarks (rig geometry, aligned the same way) against
   the photo's, over the eye distance (NME), beside the same error of the
   reference face.

Figures for recognize alone (the regressor) and for the pinch job's defaults
(options as ``PinchOptions()``: starting from recognize, landmark term on).

    python bench/pinch_quality.py [--regressor DIR] [--imitator DIR] [--parser DIR] [--renders 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pinch_inputs import align_largest_face, pinch_aligner

from facecore import weights
from facecore.face.landmarks import eye_centres
from facecore.losses import affine_aligned
from facecore.methods.pinch import pinch
from facecore.models.imitator import Imitator
from facecore.models.parsing import FaceParser
from facecore.models.regressor import Regressor
from facecore.presets import preset_path
from facecore.rig import default_schema, geometry, reference_face
from jobs.kinds.pinch import PinchOptions, pinch_config
from jobs.kinds.recognize import model_inputs
from jobs.samples import aligned_renders, sample_photos

POSE = ("yaw", "pitch", "roll", "head_size")


def tensors(images: np.ndarray, landmarks: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops and landmarks resized to ``size`` as the jobs' model stages make them."""
    return model_inputs(list(images), landmarks, size)


def recognize(regressor: Regressor, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    size = regressor.config.image_size
    found = []
    for start in range(0, len(images), 64):
        crops, points = tensors(images[start:start + 64], landmarks[start:start + 64], size)
        found.append(regressor.vectors(crops, points)[0].numpy())
    return np.concatenate(found)


def pinch_from(start: np.ndarray | None, imitator, parser, images, landmarks, schema, config) -> np.ndarray:
    size = imitator.config.image_size
    found = []
    for index in range(0, len(images), 32):
        crops, points = tensors(images[index:index + 32], landmarks[index:index + 32], size)
        begin = None if start is None else torch.from_numpy(start[index:index + 32])
        found.append(pinch(imitator, parser, crops, schema, config, start=begin, landmarks=points).params)
    return np.concatenate(found)


def render_figures(found: np.ndarray, truth: np.ndarray, schema) -> dict[str, float]:
    reference = schema.reference_vector()
    names = schema.continuous_names
    free = [i for i, name in enumerate(names) if name not in POSE]
    visible = [i for i in free if i in set(schema.visible_indices.tolist())]
    pose = [names.index(name) for name in POSE]

    def ratio(index):
        error = np.abs(found[:, index] - truth[:, index]).mean()
        return float(error / np.abs(reference[index] - truth[:, index]).mean())

    correct = [np.mean(found[:, schema.group_slice(g.name)].argmax(1) == truth[:, schema.group_slice(g.name)].argmax(1))
               for g in schema.discrete]
    figures = {"mae_ratio": ratio(free), "mae_ratio_visible": ratio(visible), "pose_mae_ratio": ratio(pose),
               "discrete_acc": float(np.mean(correct))}
    for group in ("identity", "expression", "appearance"):
        figures[group] = ratio([i for i in schema.indices(group) if i in free])
    for group, accuracy in zip(schema.discrete, correct):
        figures[f"{group.name}_acc"] = float(accuracy)
    return figures


def nme(params: np.ndarray, photo_landmarks: np.ndarray, schema, size: int) -> np.ndarray:
    """Per photo: the avatar's landmarks (aligned like the photo) vs the photo's, over its eye distance."""
    vectors = torch.from_numpy(params).double()
    points = geometry.landmarks(geometry.values_from_vector(vectors, schema), size)
    reference = torch.from_numpy(reference_face(size).landmarks)
    aligned = affine_aligned(points, reference).numpy()
    errors = []
    for avatar, photo in zip(aligned, photo_landmarks):
        distance = np.linalg.norm(np.diff(eye_centres(photo), axis=0))
        errors.append(np.linalg.norm(avatar - photo, axis=1).mean() / distance)
    return np.array(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regressor", default=None, help="model folder (default: the shipped preset)")
    parser.add_argument("--imitator", default=None)
    parser.add_argument("--parser", default=None)
    parser.add_argument("--renders", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="override pinch options, e.g. landmark_weight=0 init=reference")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    options = PinchOptions.model_validate({**PinchOptions().model_dump(), **overrides})
    config = pinch_config(options)
    print(f"pinch: init={options.init} {config}")
    torch.set_grad_enabled(True)
    regressor = weights.load_model(Regressor, args.regressor or preset_path("regressor")).eval()
    imitator = weights.load_model(Imitator, args.imitator or preset_path("imitator")).eval()
    face_parser = weights.load_model(FaceParser, args.parser or preset_path("parser")).eval()
    schema = default_schema()

    # 1. held-out renders, every pose
    images, landmarks, truth = aligned_renders(args.renders, args.seed, regressor.config.image_size)
    recognized = recognize(regressor, images, landmarks)
    pinched = pinch_from(recognized if options.init == "recognize" else None, imitator, face_parser, images,
                         landmarks, schema, config)
    figures = {"recognize": render_figures(recognized, truth, schema), "pinch": render_figures(pinched, truth, schema)}
    for name, values in figures.items():
        print(f"renders {name:9s} " + " ".join(f"{key}={value:.3f}" for key, value in values.items()))

    # 2. real photos
    size = regressor.config.image_size
    detector = pinch_aligner(size)
    faces = {name: align_largest_face(detector, path) for name, path in sample_photos().items()}
    photo_images = np.stack([face.image for face in faces.values()])
    photo_landmarks = np.stack([face.landmarks for face in faces.values()]).astype(np.float32)
    photo_recognized = recognize(regressor, photo_images, photo_landmarks)
    photo_pinched = pinch_from(photo_recognized if options.init == "recognize" else None, imitator, face_parser,
                               photo_images, photo_landmarks, schema, config)
    reference_nme = nme(np.tile(schema.reference_vector()[None], (len(faces), 1)).astype(np.float32),
                        photo_landmarks, schema, size)
    recognize_nme, pinch_nme = (nme(photo_recognized, photo_landmarks, schema, size),
                                nme(photo_pinched, photo_landmarks, schema, size))
    for name, a, b, c in zip(faces, reference_nme, recognize_nme, pinch_nme):
        print(f"photo {name:14s} NME reference {a:.3f} recognize {b:.3f} pinch {c:.3f}")
    visible = len(schema.visible_indices)
    print(f"RESULT mae_ratio={figures['pinch']['mae_ratio']:.3f} discrete_acc={figures['pinch']['discrete_acc']:.3f} "
          f"nme_ratio={pinch_nme.mean() / reference_nme.mean():.3f} "
          f"recognize_mae_ratio={figures['recognize']['mae_ratio']:.3f} "
          f"recognize_discrete_acc={figures['recognize']['discrete_acc']:.3f} "
          f"recognize_nme_ratio={recognize_nme.mean() / reference_nme.mean():.3f} "
          f"visible={visible}/{schema.continuous_size} "
          f"mae_ratio_visible={figures['pinch']['mae_ratio_visible']:.3f} "
          f"recognize_mae_ratio_visible={figures['recognize']['mae_ratio_visible']:.3f} "
          f"pose_mae_ratio={figures['pinch']['pose_mae_ratio']:.3f} "
          f"recognize_pose_mae_ratio={figures['recognize']['pose_mae_ratio']:.3f}")


if __name__ == "__main__":
    main()
