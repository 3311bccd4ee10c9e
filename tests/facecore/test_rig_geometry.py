"""The rig's torch geometry: the landmarks the renderer draws, in batches, with gradients."""

from __future__ import annotations

import numpy as np
import torch

from facecore.rig import Renderer, default_schema, geometry


def test_batched_torch_landmarks_are_the_renderers_over_every_pose():
    schema = default_schema()
    samples = schema.sample(np.random.default_rng(7), 1000)  # uniform: yaw, pitch and roll over their whole range
    drawn = np.stack([Renderer(schema).render(values, 256).landmarks for values in samples])
    vectors = torch.tensor(np.stack([schema.encode(values) for values in samples]), dtype=torch.float32)
    computed = geometry.landmarks(geometry.values_from_vector(vectors, schema), 256).numpy()
    assert computed.shape == (1000, 68, 2)
    assert np.abs(computed - drawn).max() <= 0.05
    poses = np.array([[values["yaw"], values["pitch"], values["roll"]] for values in samples])
    assert (poses.min(axis=0) < 0.02).all() and (poses.max(axis=0) > 0.98).all()  # the extremes were covered


def test_gradients_match_finite_differences():
    schema = default_schema()
    rng = np.random.default_rng(3)
    vector = rng.uniform(0.1, 0.9, size=(2, schema.vector_size))  # away from the clamp's corners
    for first, second in schema.exclusive:  # and from the exclusive pairs' tie
        index = schema.continuous_names.index
        vector[:, index(first)], vector[:, index(second)] = 0.8, 0.2
    inputs = torch.tensor(vector, dtype=torch.float64, requires_grad=True)

    def landmarks(v: torch.Tensor) -> torch.Tensor:
        return geometry.landmarks(geometry.values_from_vector(v, schema), 64)

    assert torch.autograd.gradcheck(landmarks, (inputs,), eps=1e-6, atol=1e-5)
    # Every identity, expression and pose parameter moves some landmark; styles and colours none.
    jacobian = torch.autograd.functional.jacobian(landmarks, inputs)[0, :, :, 0, :]  # (68, 2, vector)
    moved = jacobian.abs().amax(dim=(0, 1)).numpy()
    groups = {name: param.group for name, param in zip(schema.continuous_names, schema.continuous)}
    weaker = {second for _, second in schema.exclusive}  # 0.2 against 0.8: dropped, as decode drops it
    for i, name in enumerate(schema.continuous_names):
        if name in weaker:
            assert moved[i] == 0, name
        elif groups[name] in ("expression", "pose") or name in geometry_identity_names():
            assert moved[i] > 1e-3, name
    assert (moved[schema.continuous_size:] == 0).all()


def geometry_identity_names() -> set[str]:
    """Identity parameters that shape the 68 points (the rest shape hair, ears, colours)."""
    return {"face_width", "face_length", "jaw_width", "jaw_angle_height", "chin_width", "chin_length",
            "chin_pointiness", "cheek_width", "cheekbone_height", "brow_height", "brow_spacing", "brow_tilt",
            "brow_length", "brow_arch", "eye_height", "eye_spacing", "eye_size", "eye_openness", "eye_tilt",
            "eye_roundness", "nose_length", "nose_width", "nostril_flare", "nose_tip_lift", "nose_shift",
            "mouth_height", "mouth_width", "mouth_corner_height", "mouth_tilt", "upper_lip_thickness",
            "lower_lip_thickness", "cupid_bow", "head_size"}


def test_numpy_and_torch_back_ends_agree():
    schema = default_schema()
    samples = schema.sample(np.random.default_rng(5), 8)
    vectors = np.stack([schema.encode(values) for values in samples])
    as_torch = geometry.values_from_vector(torch.tensor(vectors, dtype=torch.float64), schema)
    as_numpy = {name: value.numpy() for name, value in as_torch.items()}
    assert np.abs(geometry.landmarks(as_numpy, 128) - geometry.landmarks(as_torch, 128).numpy()).max() < 1e-9
