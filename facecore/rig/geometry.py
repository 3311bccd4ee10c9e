"""The rig's geometry in torch: parameters → 3-D face, pose, 68 projected landmarks.

The one definition of where the rig puts its landmarks. The renderer calls it
(one face, float64) and draws around the points it returns; models call it on
batches, differentiably (a landmark loss can pull predicted parameters towards
a photo's landmarks). Each step deforms the canonical 3-D template in the order
the rig defines: identity (outline, brows, eyes, nose, mouth), then expression
(action units), then pose and an orthographic projection.

Parameters arrive as a dict of name → (B,) tensors in [0, 1] (see
:func:`values_from_vector` for a model's flat output).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import numpy as np
import torch

from facecore.face.dlib_models import mean_shape_68
from facecore.face.landmarks import symmetrised

# Canonical face units: landmark box centred at 0, jaw-to-jaw half width 1.
# Projection matches mean_face_reference(): landmarks span FACE_WIDTH of the
# frame, their box centred at CENTRE_Y.
FACE_WIDTH = 0.58
CENTRE_Y = 0.56
# Pose ranges: a parameter of 0 / 1 is this many degrees either side of frontal.
YAW_DEGREES, PITCH_DEGREES, ROLL_DEGREES = 70.0, 50.0, 50.0

POSE_NAMES = ("yaw", "pitch", "roll", "head_size")

JAW, BROW_R, BROW_L, NOSE = range(0, 17), range(17, 22), range(22, 27), range(27, 36)
EYE_R, EYE_L, MOUTH = range(36, 42), range(42, 48), range(48, 68)


@functools.cache
def template() -> np.ndarray:
    """(68, 3) canonical neutral face: dlib's mean shape with a plausible depth."""
    shape = symmetrised(mean_shape_68())
    low, high = shape.min(axis=0), shape.max(axis=0)
    half_width = (high[0] - low[0]) / 2.0
    xy = (shape - (low + high) / 2.0) / half_width
    x, y = xy[:, 0], xy[:, 1]
    surface = 0.8 * np.sqrt(np.clip(1.0 - x**2 - 0.25 * y**2, 0.0, None))
    z = surface.copy()
    z[0:17] = 0.6 * surface[0:17]  # the jaw line is the silhouette
    z[27:31] += [0.12, 0.2, 0.3, 0.4]  # nose bridge to tip
    z[31:36] += [0.15, 0.22, 0.28, 0.22, 0.15]
    z[36:48] -= 0.03
    z[48:60] += 0.05
    return np.stack([x, y, z], axis=1)


class _Face:
    """The (B, 68, 3) points being deformed, and the array operations the deformation needs.

    Rows are indices into the 68 points; ``col`` 0, 1, 2 is x, y, z. Two
    back ends run the same deformation: torch (changed out of place, so autograd
    keeps every step; batches for models) and numpy (in place; one face for the
    renderer, where torch's per-operation cost would be ten times the work).
    """

    def __init__(self, points) -> None:
        self.p = points
        self.torch = isinstance(points, torch.Tensor)

    def const(self, values):
        values = np.array(values, dtype=np.float64)  # a copy: reversed views have negative strides
        return torch.as_tensor(values, dtype=self.p.dtype, device=self.p.device) if self.torch else values

    def get(self, rows, col: int):
        return self.p[:, list(rows), col]

    def set(self, rows, col: int, value) -> None:
        rows = list(rows)
        if not self.torch:
            self.p[:, rows, col] = value
            return
        delta = torch.zeros_like(self.p)
        delta[:, rows, col] = value - self.p[:, rows, col]
        self.p = self.p + delta

    def add(self, rows, col: int, amount) -> None:
        self.set(rows, col, self.get(rows, col) + amount)

    def scale(self, rows, col: int, factor) -> None:
        self.set(rows, col, self.get(rows, col) * factor)

    def _centre(self, rows):
        x, y = self.get(rows, 0), self.get(rows, 1)
        if self.torch:
            return x, y, x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
        return x, y, x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)

    def scale_about(self, rows, factor_x, factor_y) -> None:
        """Scale a group of points about its own centre (of x and y); factors (B, 1) or numbers."""
        x, y, cx, cy = self._centre(rows)
        self.set(rows, 0, cx + (x - cx) * factor_x)
        self.set(rows, 1, cy + (y - cy) * factor_y)

    def rotate_about(self, rows, angle) -> None:
        """Rotate a group of points about its own centre; angle (B, 1) in radians."""
        x, y, cx, cy = self._centre(rows)
        c, s = (torch.cos(angle), torch.sin(angle)) if self.torch else (np.cos(angle), np.sin(angle))
        self.set(rows, 0, cx + c * (x - cx) - s * (y - cy))
        self.set(rows, 1, cy + s * (x - cx) + c * (y - cy))


def shape_3d(v: Mapping[str, torch.Tensor | np.ndarray]) -> torch.Tensor | np.ndarray:
    """Identity and expression parameters → (B, 68, 3) canonical points (before pose).

    Values are (B,) torch tensors (the result is a tensor of their dtype and
    device, differentiable) or (B,) numpy arrays (the result is float64 numpy).
    """
    first = next(iter(v.values()))
    if isinstance(first, torch.Tensor):
        base = torch.as_tensor(template(), dtype=first.dtype, device=first.device)
        face = _Face(base.expand(first.shape[0], 68, 3).clone())
    else:
        face = _Face(np.repeat(template()[None], len(first), axis=0))

    def d(name: str):  # identity: -1 .. 1, 0 at neutral; (B, 1)
        return (2.0 * (v[name] - 0.5))[:, None]

    def a(name: str):  # action unit: 0 .. 1; (B, 1)
        return v[name][:, None]

    const = face.const
    tpl = template()
    chin_weight = const(np.clip((tpl[0:17, 1] - tpl[0, 1]) / (tpl[8, 1] - tpl[0, 1]), 0.0, 1.0) ** 2)
    side = np.sign(tpl[:, 0])
    jaw, mouth = list(JAW), list(MOUTH)

    def at(group, *indices) -> list[int]:  # indices within a group → indices of the 68
        return [group[i] for i in indices]

    # 1. identity: face outline
    face.scale(jaw, 0, 1.0 + 0.10 * d("face_width"))
    face.add(jaw, 1, 0.14 * d("face_length") * chin_weight)
    lower = const([0, 0, 0, .5, 1, 1, .7, .3, 0, .3, .7, 1, 1, .5, 0, 0, 0])
    face.scale(jaw, 0, 1.0 + 0.12 * d("jaw_width") * lower)
    face.add(at(jaw, 2, 3, 4, 12, 13, 14), 1, 0.10 * d("jaw_angle_height"))
    face.scale(jaw[6:11], 0, 1.0 + 0.35 * d("chin_width"))
    face.add(jaw[6:11], 1, 0.08 * d("chin_length") * const([.4, .8, 1, .8, .4]))
    face.add([8], 1, 0.06 * d("chin_pointiness"))
    face.add([7, 9], 1, -0.02 * d("chin_pointiness"))
    face.scale(at(jaw, 1, 2, 3, 4, 12, 13, 14, 15), 0, 1.0 + 0.10 * d("cheek_width"))
    face.add(at(jaw, 0, 1, 2, 14, 15, 16), 1, 0.12 * d("cheekbone_height"))
    # brows
    arch = const([0.0, 0.5, 1.0, 0.5, 0.0])
    for brow, sign in ((BROW_R, -1.0), (BROW_L, 1.0)):
        face.add(brow, 1, -0.08 * d("brow_height"))
        face.add(brow, 0, sign * 0.06 * d("brow_spacing"))
        face.rotate_about(brow, -sign * math.radians(10.0) * d("brow_tilt"))
        face.scale_about(brow, 1.0 + 0.25 * d("brow_length"), 1.0)
        face.add(brow, 1, -0.05 * d("brow_arch") * arch)
    # eyes
    for eye, sign in ((EYE_R, -1.0), (EYE_L, 1.0)):
        face.add(eye, 1, -0.07 * d("eye_height"))
        face.add(eye, 0, sign * 0.05 * d("eye_spacing"))
        size = 1.0 + 0.2 * d("eye_size")
        face.scale_about(eye, size, size * (1.0 + 0.4 * d("eye_openness")))
        face.rotate_about(eye, -sign * math.radians(10.0) * d("eye_tilt"))
        face.add(at(eye, 1, 2), 1, -0.03 * d("eye_roundness"))
        face.add(at(eye, 4, 5), 1, 0.015 * d("eye_roundness"))
    # nose
    face.add(list(NOSE)[1:], 1, 0.08 * d("nose_length") * const([0.25, 0.5, 0.75, 1, 1, 1, 1, 1]))
    centre_x = face.get([NOSE[6]], 0)
    wings = list(NOSE)[4:9]
    face.set(wings, 0, centre_x + (face.get(wings, 0) - centre_x) * (1.0 + 0.3 * d("nose_width")))
    face.add(at(NOSE, 4, 8), 0, const([-1.0, 1.0]) * 0.04 * d("nostril_flare"))
    face.add(at(NOSE, 4, 8), 1, -0.02 * d("nostril_flare"))
    face.add(at(NOSE, 3, 6), 1, -const([0.08, 0.05]) * d("nose_tip_lift"))
    face.add(NOSE, 0, 0.05 * d("nose_shift"))
    # mouth
    face.add(mouth, 1, 0.07 * d("mouth_height"))
    face.scale_about(mouth, 1.0 + 0.2 * d("mouth_width"), 1.0)
    corners = at(MOUTH, 0, 6, 12, 16)
    face.add(corners, 1, -0.05 * d("mouth_corner_height"))
    face.rotate_about(mouth, math.radians(8.0) * d("mouth_tilt"))
    upper, lower_lip = mouth[1:6], mouth[7:12]
    face.add(upper, 1, -0.05 * d("upper_lip_thickness"))
    face.add(lower_lip, 1, 0.05 * d("lower_lip_thickness"))
    face.add(at(MOUTH, 2, 4), 1, -0.04 * d("cupid_bow"))
    face.add(at(MOUTH, 3), 1, 0.02 * d("cupid_bow"))

    # 2. expression: action units
    for eye, amount in ((EYE_R, a("eye_close_right")), (EYE_L, a("eye_close_left"))):
        for top, bottom in ((1, 5), (2, 4)):
            lid = face.get([eye[top]], 1)
            face.set([eye[top]], 1, lid + (face.get([eye[bottom]], 1) - lid) * 0.95 * amount)
    for eye in (EYE_R, EYE_L):
        face.add(at(eye, 1, 2), 1, -0.035 * a("upper_lid_raise"))
        face.add(at(eye, 0, 3), 1, -0.008 * a("upper_lid_raise"))
        face.add(at(eye, 4, 5), 1, -0.025 * a("lid_tighten"))
        face.add(at(eye, 1, 2), 1, 0.01 * a("lid_tighten"))
    inner, outer = np.array([0.0, 0.0, 0.3, 0.7, 1.0]), np.array([1.0, 0.6, 0.2, 0.0, 0.0])
    for brow, order in ((BROW_R, slice(None)), (BROW_L, slice(None, None, -1))):  # the left brow runs mirrored
        face.add(brow, 1, -0.09 * a("inner_brow_raise") * const(inner[order]))
        face.add(brow, 1, -0.09 * a("outer_brow_raise") * const(outer[order]))
        face.add(brow, 1, 0.06 * a("brow_lower"))
    face.add(BROW_R, 0, 0.03 * a("brow_lower") * const(inner))
    face.add(BROW_L, 0, -0.03 * a("brow_lower") * const(inner[::-1]))
    face.add(wings, 1, -0.03 * a("nose_wrinkle"))
    face.add(at(NOSE, 4, 8), 0, const([-1.0, 1.0]) * 0.02 * a("nose_wrinkle"))
    face.add(upper, 1, -0.05 * a("upper_lip_raise"))
    face.add(mouth[13:16], 1, -0.04 * a("upper_lip_raise"))
    face.add(lower_lip, 1, 0.05 * a("lower_lip_depress"))
    face.add(mouth[17:20], 1, 0.04 * a("lower_lip_depress"))
    opening = a("mouth_open")
    face.add(lower_lip, 1, 0.25 * opening * const([0.6, 0.9, 1.0, 0.9, 0.6]))
    face.add(mouth[17:20], 1, 0.25 * opening * const([0.9, 1.0, 0.9]))
    face.add(corners, 1, 0.06 * opening)
    face.add(jaw, 1, 0.12 * opening * chin_weight)
    corner_side = const(side[[MOUTH[i] for i in (0, 6, 12, 16)]])
    face.add(corners, 0, corner_side * (0.07 * a("smile") + 0.10 * a("lip_stretch")))
    face.add(corners, 1, -0.07 * a("smile"))
    face.add(at(MOUTH, 1, 5, 7, 11), 1, -0.03 * a("smile"))
    face.add(corners, 1, 0.01 * a("lip_stretch") + 0.07 * a("lip_corner_depress"))
    face.scale_about(mouth, 1.0 - 0.35 * a("pucker"), 1.0)
    face.add(upper, 1, -0.015 * a("pucker"))
    face.add(lower_lip, 1, 0.015 * a("pucker"))
    face.add(upper, 1, 0.02 * a("lip_press"))
    face.add(lower_lip, 1, -0.02 * a("lip_press"))
    face.scale(jaw, 0, 1.0 + 0.08 * a("cheek_puff") * const(
        [0, .2, .6, 1, 1, .8, .4, 0, 0, 0, .4, .8, 1, 1, .6, .2, 0]))
    jaw_shift = 0.10 * (a("jaw_left") - a("jaw_right"))
    face.add(jaw, 0, jaw_shift * lower)
    face.add(lower_lip, 0, 0.4 * jaw_shift)
    face.add(mouth[17:20], 0, 0.4 * jaw_shift)
    face.add(mouth, 0, 0.06 * (a("mouth_left") - a("mouth_right")))
    return face.p


def pose_angles(v: Mapping):
    """(yaw, pitch, roll) in radians from the pose parameters (0.5 is frontal)."""
    return (math.radians(YAW_DEGREES) * (v["yaw"] - 0.5), math.radians(PITCH_DEGREES) * (v["pitch"] - 0.5),
            math.radians(ROLL_DEGREES) * (v["roll"] - 0.5))


def pose(v: Mapping[str, torch.Tensor | np.ndarray], size: int):
    """(rotation (B, 3, 3), scale (B,), origin (2,)) of the orthographic camera at ``size`` pixels.

    Torch in, torch out (differentiable); numpy in, numpy out (the renderer).
    """
    is_torch = isinstance(v["yaw"], torch.Tensor)
    lib = torch if is_torch else np
    yaw, pitch, roll = pose_angles(v)
    one, zero = lib.ones_like(yaw), lib.zeros_like(yaw)

    def matrix(rows):
        if is_torch:
            return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)
        return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)

    cy, sy, cp, sp, cr, sr = (lib.cos(yaw), lib.sin(yaw), lib.cos(pitch), lib.sin(pitch),
                              lib.cos(roll), lib.sin(roll))
    r_yaw = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    r_pitch = matrix([[one, zero, zero], [zero, cp, -sp], [zero, sp, cp]])
    r_roll = matrix([[cr, -sr, zero], [sr, cr, zero], [zero, zero, one]])
    rotation = r_roll @ r_yaw @ r_pitch
    scale = FACE_WIDTH * size / 2.0 * (1.0 + 0.24 * (v["head_size"] - 0.5))
    origin = [size / 2.0, CENTRE_Y * size]
    origin = torch.tensor(origin, dtype=yaw.dtype, device=yaw.device) if is_torch else np.array(origin)
    return rotation, scale, origin


def project(points, rotation, scale, origin):
    """(B, N, 3) canonical points → (B, N, 2) pixels (torch or numpy, as given)."""
    return (points @ rotation.transpose(0, 2, 1) if isinstance(rotation, np.ndarray)
            else points @ rotation.transpose(1, 2))[..., :2] * scale[:, None, None] + origin


def landmarks(v: Mapping[str, torch.Tensor | np.ndarray], size: int):
    """Named parameters (each (B,)) → the (B, 68, 2) landmarks the renderer draws at ``size`` pixels."""
    rotation, scale, origin = pose(v, size)
    return project(shape_3d(v), rotation, scale, origin)


def values_from_vector(vector: torch.Tensor, schema) -> dict[str, torch.Tensor]:
    """A model's (B, vector_size) or (B, continuous_size) output → the named values geometry uses.

    As :meth:`RigSchema.decode`: clipped to [0, 1], and of each exclusive pair
    only the stronger side kept (the other 0). Styles do not move landmarks.
    """
    values = {name: vector[:, i].clamp(0.0, 1.0) for i, name in enumerate(schema.continuous_names)}
    for first, second in schema.exclusive:
        keep_first = values[first] >= values[second]
        values[first], values[second] = (torch.where(keep_first, values[first], torch.zeros_like(values[first])),
                                         torch.where(keep_first, torch.zeros_like(values[second]), values[second]))
    return values
