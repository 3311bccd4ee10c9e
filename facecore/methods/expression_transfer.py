"""Expression transfer on photos (SPEC.md §1): where the target landmarks come from, and the result's frame.

The seed's G needs the target landmarks ``L_t``. On a photo nobody gives them:
they are made with the rig. The regressor finds the source's rig vector
(identity, pose, expression); the target keeps its identity and pose and takes
the target expression (drawn, named, or a driver photo's). The rig's landmarks
of both vectors differ only by the expression; that displacement, carried into
the crop's frame by the affine that fits the rig's source landmarks onto the
photo's, is added to the photo's own landmarks. The result keeps the person's
face shape exactly (only what the expression moves, moves), and the rig's
imperfect fit of the shape never enters ``L_t``.

Also here: the augmented dataset's expression draws (deterministic per key,
face, target and seed), the paste-back region, and the landmark score of a result.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import cv2
import numpy as np

from facecore.face.transform import affine_matrix

if TYPE_CHECKING:
    import torch

    from facecore.rig import RigSchema


def expression_names(schema: RigSchema) -> list[str]:
    """The rig's expression parameters, in vector order: the layout of ``target_params``."""
    return [schema.continuous_names[i] for i in schema.indices("expression")]


def drawn_expressions(schema: RigSchema, key: str, face_index: int, count: int, seed: int) -> np.ndarray:
    """(count, E) random expressions for one face, from the rig's own expression distribution.

    The draw depends on (``seed``, ``key``, ``face_index``) alone, so a rerun, a
    resumed job or another cluster writes the same labels.
    """
    digest = hashlib.sha256(f"{seed}\0{key}\0{face_index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    names = expression_names(schema)
    return np.array([[values[name] for name in names] for values in schema.sample(rng, count)], np.float32)


def named_expressions(schema: RigSchema, labels: list[str]) -> np.ndarray:
    """(len(labels), E) the rig's named expressions (``smile``, ``surprise``...)."""
    names = expression_names(schema)
    return np.array([[schema.expression_values(label)[name] for name in names] for label in labels], np.float32)


def target_landmarks(source_landmarks: np.ndarray, source_vectors: torch.Tensor, expressions: torch.Tensor,
                     schema: RigSchema, size: int) -> np.ndarray:
    """The source's landmarks moved by the target expression, in the crop's pixels.

    Args:
        source_landmarks: (B, 68, 2) the photo's landmarks in the aligned crop.
        source_vectors: (B, V) the regressor's rig vectors of the sources.
        expressions: (B, E) the target expression parameters (``expression_names`` order).
        schema: the rig.
        size: the crop's side (the rig's landmarks are taken at this size).

    Returns:
        (B, 68, 2) float32 target landmarks.
    """
    return moved_landmarks(source_landmarks, source_vectors, "expression", expressions, schema, size)


def moved_landmarks(landmarks: np.ndarray, vectors: torch.Tensor, group: str, values: torch.Tensor,
                    schema: RigSchema, size: int) -> np.ndarray:
    """A face's landmarks moved as the rig moves them when one group of its parameters changes.

    The rig's landmarks for ``vectors`` and for ``vectors`` with ``group``'s slots set to
    ``values`` differ by a displacement; it is carried into the crop through the affine
    fit of the rig's landmarks onto the face's (its scale and shear, not its offset).

    Args:
        landmarks: (B, 68, 2) the face's landmarks in its aligned crop.
        vectors: (B, V) the regressor's rig vectors of the faces.
        group: the parameter group that changes ("expression", "identity", ...).
        values: (B, G) the group's new values (``schema.indices(group)`` order).
        schema: the rig.
        size: the crop's side (the rig's landmarks are taken at this size).

    Returns:
        (B, 68, 2) float32 moved landmarks.
    """
    import torch

    from facecore.rig.geometry import landmarks as rig_landmarks, values_from_vector

    vectors = vectors.detach().float().cpu()
    changed = vectors.clone()
    changed[:, torch.from_numpy(schema.indices(group))] = values.detach().float().cpu()
    rig_from = rig_landmarks(values_from_vector(vectors, schema), size).numpy()
    rig_to = rig_landmarks(values_from_vector(changed, schema), size).numpy()
    moved = []
    for face, before, after in zip(np.asarray(landmarks, np.float64), rig_from, rig_to):
        linear = affine_matrix(before, face)[:, :2]  # rig frame -> crop frame, its scale and shear
        moved.append(face + (after - before) @ linear.T)
    return np.asarray(moved, np.float32)


def face_region(source_landmarks: np.ndarray, target_landmarks: np.ndarray, size: int,
                margin: float = 0.12) -> np.ndarray:
    """(size, size) float32 mask of what a result changes: the hull of both landmark sets, grown.

    Pasting only this back keeps the photo's own hair, ears and background, where
    the crop's border (cut out of the photo, or padded) would otherwise show a seam.
    """
    points = np.concatenate([np.asarray(source_landmarks, np.float64), np.asarray(target_landmarks, np.float64)])
    centre = points.mean(axis=0)
    grown = centre + (points - centre) * (1.0 + margin)
    # Above the brows: the forehead moves with raised brows; extend the hull up by a fifth of the face.
    top = grown[np.argsort(grown[:, 1])[:10]] - [0.0, 0.2 * np.ptp(points[:, 1])]
    hull = cv2.convexHull(np.concatenate([grown, top]).astype(np.float32)).reshape(-1, 2)
    mask = np.zeros((size, size), np.float32)
    cv2.fillConvexPoly(mask, np.round(hull * 16).astype(np.int32), 1.0, lineType=cv2.LINE_AA, shift=4)
    return mask


def landmark_nme(found: np.ndarray, wanted: np.ndarray) -> float:
    """Mean distance between two (68, 2) landmark sets over the wanted set's outer-eye-corner distance."""
    found, wanted = np.asarray(found, np.float64), np.asarray(wanted, np.float64)
    eyes = float(np.linalg.norm(wanted[45] - wanted[36]))
    return float(np.linalg.norm(found - wanted, axis=1).mean() / max(eyes, 1e-6))
