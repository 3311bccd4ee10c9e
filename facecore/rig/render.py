"""The procedural avatar renderer: the stand-in for a game client.

Parameters deform a 3-D face built on dlib's mean 68-point shape (so the rig's
landmarks mean what iBUG's mean), the pose rotates it, an orthographic camera
projects it, and OpenCV fills shaded polygons for skin, hair, eyes, brows, nose
and lips. The same polygons fill the parsing mask, so image, mask and landmarks
agree by construction. Same parameters, same pixels.

At the reference face (every parameter neutral, frontal) the projected
landmarks equal :func:`facecore.face.mean_face_reference` at the same size: a
photo aligned by the align job and a neutral avatar share one frame.
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import cv2
import numpy as np

from facecore.face.reference import ReferenceFace
from facecore.rig import geometry
from facecore.rig.classes import CLASS_INDEX as C
from facecore.rig.schema import RigSchema, SchemaError, default_schema

# The continuous parameters the geometry reads (styles and colours do not move landmarks).
_GEOMETRY_NAMES = tuple(name for name in default_schema().continuous_names
                        if name not in geometry.POSE_NAMES)
SUBPIXEL_BITS = 4  # cv2 drawing with 1/16-pixel vertex precision
_SCALE = float(1 << SUBPIXEL_BITS)

REGIONS: dict[str, np.ndarray] = {
    "face": np.arange(0, 17),
    "jaw": np.arange(0, 17),
    "brows": np.arange(17, 27),
    "nose": np.arange(27, 36),
    "eyes": np.arange(36, 48),
    "mouth": np.arange(48, 68),
}


@dataclass(frozen=True, eq=False)
class RigRender:
    """One rendered avatar.

    Attributes:
        image: (S, S, 3) uint8 RGB.
        mask: (S, S) uint8 Helen class per pixel (see ``classes.HELEN_CLASSES``).
        landmarks: (68, 2) float32 iBUG landmarks in pixels.
    """

    image: np.ndarray
    mask: np.ndarray
    landmarks: np.ndarray


def _arc(x_half: float, y_side: float, y_top: float, depth: float, count: int = 13,
         ripple: float = 0.0) -> np.ndarray:
    """An elliptic arc over the head, from +x round the top to -x, as (count, 3)."""
    t = np.linspace(0.0, math.pi, count)
    bump = 1.0 + ripple * np.abs(np.sin(7.0 * t))
    x = x_half * np.cos(t) * bump
    y = y_side + (y_top - y_side) * np.sin(t) * bump
    z = depth * np.sin(t)
    return np.stack([x, y, z], axis=1)


def _lerp(a, b, t: float) -> np.ndarray:
    return np.asarray(a, np.float64) * (1.0 - t) + np.asarray(b, np.float64) * t


class Renderer:
    """Draws the default rig. Stateless apart from caches; deterministic."""

    def __init__(self, schema: RigSchema | None = None) -> None:
        self.schema = schema or default_schema()
        needed = set(default_schema().continuous_names) | {g.name for g in default_schema().discrete}
        have = set(self.schema.continuous_names) | {g.name for g in self.schema.discrete}
        if not needed <= have:
            raise SchemaError(f"the built-in renderer draws rig 'facejobs-default'; schema {self.schema.name} "
                              f"lacks {sorted(needed - have)[:8]}")

    def render(self, values: Mapping[str, Any] | np.ndarray, size: int = 256) -> RigRender:
        """Render named values (missing ones neutral) or a flat schema vector.

        Args:
            values: parameter names → values, or a (vector_size,) array.
            size: output side, 64 to 512 (smaller works; detail suffers).
        """
        if not 16 <= size <= 2048:
            raise ValueError(f"size must be in [16, 2048], got {size}")
        if isinstance(values, np.ndarray):
            v = self.schema.decode(values)
        else:
            v = self.schema.complete(values)
        return _draw(v, size)


def reference_face(size: int = 256) -> ReferenceFace:
    """The rig's reference face (every parameter neutral) as an alignment reference.

    Its landmarks equal :func:`facecore.face.mean_face_reference` at the same size,
    and it carries the rendered neutral avatar as its image.
    """
    render = Renderer().render({}, size)
    return ReferenceFace(size=size, landmarks=render.landmarks.astype(np.float64), image=render.image)


# -- geometry -------------------------------------------------------------------


def _shape(v: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The canonical 3-D points (``geometry.shape_3d``, one face) and what is not a landmark."""

    def d(name: str) -> float:  # identity: -1 .. 1, 0 at neutral
        return 2.0 * (float(v[name]) - 0.5)

    p = geometry.shape_3d({name: np.array([float(v[name])]) for name in _GEOMETRY_NAMES})[0]
    jaw = p[0:17]

    # 3. what is not a landmark: hairline, skull, ears
    y_side = float((jaw[0, 1] + jaw[16, 1]) / 2.0)
    x_half = float((jaw[16, 0] - jaw[0, 0]) / 2.0)
    hairline_top = -1.45 - 0.22 * d("forehead_height")
    skull_half = x_half * (1.06 + 0.08 * d("skull_width"))
    skull_top = hairline_top - 0.12 - 0.12 * (float(v["hair_volume"]))
    extra = {
        "hairline": _arc(x_half, y_side, hairline_top, 0.55),
        "skull": _arc(skull_half, y_side + 0.05, skull_top, 0.3),
        "skull_bald": _arc(x_half * 0.97, y_side, hairline_top - 0.1, 0.3),
        "ear_size": 1.0 + 0.3 * d("ear_size"),
        "ear_y": y_side + 0.30 - 0.12 * d("ear_height"),
        "ear_out": 0.10 + 0.08 * d("ear_protrusion"),
        "brow_thickness": 1.0 + 0.3 * d("brow_thickness"),
        "bridge_width": 0.07 * (1.0 + 0.5 * d("nose_bridge_width")),
        "iris": 0.24 * (1.0 + 0.4 * d("iris_size")),
        "hair_volume": float(v["hair_volume"]),
    }
    return p, extra


# -- colours --------------------------------------------------------------------


def _colours(v: Mapping[str, Any]) -> dict[str, np.ndarray]:
    tone, warmth = float(v["skin_tone"]), float(v["skin_warmth"]) - 0.5
    skin = _lerp([238, 205, 180], [92, 60, 44], tone) + np.array([36, 8, -30]) * warmth
    lightness, hair_warmth = float(v["hair_lightness"]), float(v["hair_warmth"]) - 0.5
    hair = _lerp([28, 22, 20], [215, 180, 120], lightness) + np.array([50, 5, -30]) * hair_warmth
    lips = skin * 0.78 + np.array([60, -10, -5]) + np.array([60, -25, -10]) * (float(v["lip_redness"]) - 0.5)
    iris = _lerp([55, 35, 20], [110, 165, 195], float(v["iris_lightness"]))
    r, g, b = colorsys.hls_to_rgb(float(v["background_hue"]), 0.15 + 0.7 * float(v["background_lightness"]), 0.35)
    background = np.array([r, g, b]) * 255.0
    return {name: np.clip(colour, 0, 255) for name, colour in {
        # Brows darker than the skin whatever the hair: the brow line carries the face.
        "skin": skin, "hair": hair, "brow": np.minimum(hair * 0.55, skin * 0.45) * 0.5 + hair * 0.15,
        "lips": lips, "iris": iris,
        "background": background, "inner_mouth": np.array([70, 20, 25]), "teeth": np.array([236, 232, 222]),
        "sclera": np.array([238, 236, 230]), "pupil": np.array([15, 12, 12]),
        "shirt": _lerp(background, [40, 50, 70], 0.7),
    }.items()}


# -- drawing --------------------------------------------------------------------


class _Canvas:
    def __init__(self, size: int, background: np.ndarray) -> None:
        self.size = size
        self.image = np.empty((size, size, 3), np.uint8)
        self.image[:] = np.round(background).astype(np.uint8)
        self.mask = np.zeros((size, size), np.uint8)
        self.skin = np.zeros((size, size), np.uint8)

    @staticmethod
    def _points(polygon: np.ndarray) -> np.ndarray:
        return np.round(polygon * _SCALE).astype(np.int32).reshape(-1, 1, 2)

    def fill(self, polygon: np.ndarray, colour, cls: int | None, skin: bool | None = None) -> None:
        pts = [self._points(polygon)]
        cv2.fillPoly(self.image, pts, tuple(float(c) for c in colour), cv2.LINE_AA, SUBPIXEL_BITS)
        if cls is not None:
            cv2.fillPoly(self.mask, pts, int(cls), cv2.LINE_8, SUBPIXEL_BITS)
        if skin is not None:
            cv2.fillPoly(self.skin, pts, 1 if skin else 0, cv2.LINE_8, SUBPIXEL_BITS)

    def line(self, polyline: np.ndarray, colour, thickness: int, closed: bool = False) -> None:
        cv2.polylines(self.image, [self._points(polyline)], closed, tuple(float(c) for c in colour),
                      max(1, thickness), cv2.LINE_AA, SUBPIXEL_BITS)

    def ellipse(self, centre, axes, angle: float, colour, cls: int | None = None,
                skin: bool | None = None) -> None:
        polygon = _unit_circle() * np.asarray(axes, np.float64)
        c, s = math.cos(angle), math.sin(angle)
        polygon = polygon @ np.array([[c, s], [-s, c]]) + np.asarray(centre, np.float64)
        self.fill(polygon, colour, cls, skin)


@functools.cache
def _unit_circle() -> np.ndarray:
    """(18, 2) counter-clockwise polygon of the unit circle (a convex hull)."""
    t = np.linspace(0.0, 2.0 * math.pi, 18, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _draw(v: Mapping[str, Any], size: int) -> RigRender:
    points, extra = _shape(v)
    colours = _colours(v)
    pose_values = {name: np.array([float(v[name])]) for name in geometry.POSE_NAMES}
    yaw, pitch, roll = (float(angle[0]) for angle in geometry.pose_angles(pose_values))
    rotation, units, origin = geometry.pose(pose_values, size)
    unit = float(units[0])

    def project(p3: np.ndarray) -> np.ndarray:
        return geometry.project(p3[None], rotation, units, origin)[0]

    lm = project(points)
    canvas = _Canvas(size, colours["background"])
    hair_style, beard = v["hair_style"], v["beard"]
    hair, skin = colours["hair"], colours["skin"]
    hairline, skull = extra["hairline"], extra["skull"]
    lower_face = np.linspace(0.0, 1.0, size, dtype=np.float32)
    canvas.image[:] = np.clip(canvas.image * (1.08 - 0.16 * lower_face)[:, None, None], 0, 255).astype(np.uint8)

    # 1. behind the head: long hair, shoulders, neck
    if hair_style in ("bob", "long", "curly"):
        depth = {"bob": 0.75, "long": 2.2, "curly": 0.55}[hair_style]
        widen = {"bob": 1.12, "long": 1.18, "curly": 1.3}[hair_style] + 0.1 * extra["hair_volume"]
        back = np.concatenate([skull * [widen, 1.0, 1.0],
                               [[-skull[0, 0] * widen, skull[0, 1] + depth, -0.3],
                                [skull[0, 0] * widen, skull[0, 1] + depth, -0.3]]])
        canvas.fill(project(back), hair, C["hair"])
    neck_top = (points[4] + points[12]) / 2.0
    neck_half = 0.42
    neck = np.array([[-neck_half, neck_top[1] - 0.3, -0.2], [neck_half, neck_top[1] - 0.3, -0.2],
                     [neck_half * 1.05, 2.4, -0.2], [-neck_half * 1.05, 2.4, -0.2]])
    shoulders = np.array([[-2.2, 2.0, -0.3], [-0.5, 1.55, -0.3], [0.5, 1.55, -0.3], [2.2, 2.0, -0.3],
                          [2.4, 3.5, -0.3], [-2.4, 3.5, -0.3]])
    canvas.fill(project(neck), skin * 0.82, C["background"], skin=True)
    chin_shadow = np.concatenate([points[3:14], points[[12, 8, 4]] + [0, 0.25, 0]])
    canvas.fill(project(chin_shadow), skin * 0.55, None)
    canvas.fill(project(shoulders), colours["shirt"], C["background"])

    # 2. ears, then the face (ears hide behind it when the head turns)
    for sign, attach in ((-1.0, points[1]), (1.0, points[15])):
        centre = np.array([[attach[0] + sign * 0.03, extra["ear_y"], attach[2] - 0.2]])
        axes = (unit * (0.07 + 0.5 * extra["ear_out"]) * extra["ear_size"] * 0.6, unit * 0.2 * extra["ear_size"])
        canvas.ellipse(project(centre)[0], axes, roll, skin * 0.93, C["face"], skin=True)
    top = extra["skull_bald"] if hair_style == "bald" else hairline
    face_outline = np.concatenate([points[0:17], top[1:-1]])
    canvas.fill(project(face_outline), skin, C["face"], skin=True)

    # 3. shading: a lit ellipsoid over the skin drawn so far
    _shade(canvas, lm, v, yaw, pitch)

    # 4. nose: mask region, side shadows, nostrils
    bridge = extra["bridge_width"]
    nose_region = np.concatenate([
        points[[27]] - [bridge, 0, 0], points[[31, 32, 33, 34, 35]], points[[27]] + [bridge, 0, 0]])
    cv2.fillPoly(canvas.mask, [canvas._points(project(nose_region))], C["nose"], cv2.LINE_8, SUBPIXEL_BITS)
    shadow = skin * 0.72
    thickness = max(1, round(size / 160))
    canvas.line(project(np.stack([points[27] - [bridge, 0, 0], points[29] - [bridge * 1.3, 0, 0], points[31]])),
                shadow, thickness)
    canvas.line(project(np.stack([points[27] + [bridge, 0, 0], points[29] + [bridge * 1.3, 0, 0], points[35]])),
                shadow, thickness)
    under = np.concatenate([lm[31:36], lm[[35, 33, 31]] + [0, 0.05 * unit]])
    canvas.fill(under, skin * 0.78, None)
    canvas.line(lm[31:36], skin * 0.55, thickness)
    nostril_axes = (0.035 * unit, 0.018 * unit)
    for a_, b_ in ((31, 32), (34, 35)):
        canvas.ellipse((lm[a_] + lm[b_]) / 2.0 - [0, 0.01 * unit], nostril_axes, roll, skin * 0.35)
    canvas.ellipse(lm[30] - [0, 0.02 * unit], (0.04 * unit, 0.03 * unit), roll,
                   np.clip(skin * 1.12, 0, 255))

    # 5. beard under the mouth
    if beard != "none":
        if beard == "goatee":
            region = np.concatenate([points[6:11], points[[55, 56, 57, 58, 59]]])
        elif beard == "full":
            region = np.concatenate([points[3:14], points[[54]] + [0.06, 0.0, 0], points[[57]] + [0, 0.02, 0],
                                     points[[48]] + [-0.06, 0.0, 0]])
            moustache = np.concatenate([points[[48, 49, 50, 51, 52, 53, 54]] + [0, -0.015, 0],
                                        points[[54, 35, 33, 31, 48]] + [[0.03, -0.06, 0], [0, 0.03, 0], [0, 0.02, 0],
                                                                          [0, 0.03, 0], [-0.03, -0.06, 0]]])
            canvas.fill(project(moustache), _lerp(skin, hair, 0.8), C["hair"])
        else:  # stubble
            region = np.concatenate([points[3:14], points[[54]] + [0.05, -0.05, 0], points[[33]] + [0, 0.05, 0],
                                     points[[48]] + [-0.05, -0.05, 0]])
        # Stubble is a shadow, darker than the skin even under fair hair, so that
        # it shows against a clean-shaven chin at any skin tone.
        colour = (_lerp(skin, np.minimum(hair, skin * 0.5), 0.4) if beard == "stubble"
                  else _lerp(skin, hair, 0.85))
        canvas.fill(project(region), colour, C["face"] if beard == "stubble" else C["hair"])

    # 6. eyes: socket shadow, sclera, iris, pupil, lid line
    for eye_index, brow_index in ((slice(36, 42), slice(17, 22)), (slice(42, 48), slice(22, 27))):
        socket = np.concatenate([lm[brow_index] * 0.45 + lm[eye_index][[0, 1, 2, 3, 3]] * 0.55,
                                 lm[eye_index][[3, 4, 5, 0]] + [0, 0.03 * unit]])
        canvas.fill(socket, skin * 0.8, None)
    for eye_index, cls in ((slice(36, 42), C["right_eye"]), (slice(42, 48), C["left_eye"])):
        eye = lm[eye_index]
        canvas.fill(eye, colours["sclera"], cls)
        width = float(np.linalg.norm(eye[3] - eye[0]))
        centre = eye.mean(axis=0) + [math.sin(yaw) * 0.1 * width, 0.0]
        hull = cv2.convexHull(eye.astype(np.float32))
        for radius, colour in ((extra["iris"] * width, colours["iris"]), (0.1 * width, colours["pupil"])):
            circle = cv2.convexHull((_unit_circle() * radius + centre).astype(np.float32))
            area, clipped = cv2.intersectConvexConvex(hull, circle)
            if area > 0.5 and clipped is not None:
                canvas.fill(clipped.reshape(-1, 2).astype(np.float64), colour, None)
        canvas.line(eye[0:4], colours["pupil"], max(1, round(size / 90)))
        canvas.line(np.concatenate([eye[3:6], eye[0:1]]), skin * 0.6, max(1, round(size / 256)))

    # 7. brows: a band around the brow landmarks (they always lie inside it),
    # its upper and lower edges shaped by the style so that each style shows at
    # 128 px whatever brow_thickness and brow_arch do: straight is an even bar
    # with its edges pulled flat, arched a crescent thin at both ends, angled a
    # wedge from a thick inner end up to a peak two thirds along and down to a
    # point, thin a line (thinner at the thickest brow_thickness than straight
    # at the thinnest).
    upper, lower = {  # half-widths above and below the landmarks, inner end first
        "straight": ([0.95] * 5, [0.95] * 5),
        "arched": ([0.2, 1.2, 1.6, 1.2, 0.2], [0.2, 0.35, 0.35, 0.35, 0.2]),
        "angled": ([1.0, 1.2, 1.4, 1.6, 0.1], [1.6, 1.2, 0.7, 0.2, 0.05]),
        "thin": ([0.35, 0.4, 0.4, 0.35, 0.28], [0.35, 0.4, 0.4, 0.35, 0.28]),
    }[v["brow_style"]]
    half = 0.05 * extra["brow_thickness"]
    for brow_index, cls, order in ((slice(17, 22), C["right_brow"], slice(None, None, -1)),
                                   (slice(22, 27), C["left_brow"], slice(None))):
        brow = points[brow_index]
        up, down = (np.array(widths)[order] * half for widths in (upper, lower))
        if v["brow_style"] == "straight":  # both edges towards the chord between the brow's ends
            rise = brow[:, 1] - np.linspace(brow[0, 1], brow[-1, 1], len(brow))  # < 0 where it arches up
            up, down = np.maximum(up + rise, 0.3 * half), np.maximum(down - rise, 0.3 * half)
        band = np.concatenate([brow - [0, 1, 0] * up[:, None], (brow + [0, 1, 0] * down[:, None])[::-1]])
        canvas.fill(project(band), colours["brow"], cls)

    # 8. mouth: inside, teeth, lips
    canvas.fill(lm[60:68], colours["inner_mouth"], C["inner_mouth"])
    gap = float(np.mean(lm[[65, 66, 67], 1] - lm[[63, 62, 61], 1]))
    if gap > 1.0:
        teeth_depth = min(gap * 0.45, 0.06 * unit)
        teeth = np.concatenate([lm[60:65], lm[[64, 63, 62, 61, 60]] + [0, teeth_depth]])
        canvas.fill(teeth, colours["teeth"], C["inner_mouth"])
    upper = np.concatenate([lm[48:55], lm[[64, 63, 62, 61, 60]]])
    lower = np.concatenate([lm[54:60], lm[[48, 60, 67, 66, 65, 64]]])
    canvas.fill(upper, colours["lips"], C["upper_lip"])
    canvas.fill(lower, np.clip(colours["lips"] * 1.08, 0, 255), C["lower_lip"])
    canvas.line(lm[60:65], colours["lips"] * 0.55, max(1, round(size / 200)))

    # 9. hair in front: a cap between the skull line and the hairline
    if hair_style != "bald":
        ripple = 0.06 if hair_style == "curly" else 0.0
        outer = _arc(skull[0, 0] * (1.08 if hair_style == "curly" else 1.0), skull[0, 1], skull[6, 1],
                     0.3, 13, ripple)
        cap = np.concatenate([outer, hairline[::-1]])
        canvas.fill(project(cap), hair, C["hair"])
    return RigRender(image=canvas.image, mask=canvas.mask, landmarks=lm.astype(np.float32))


def _shade(canvas: _Canvas, lm: np.ndarray, v: Mapping[str, Any], yaw: float, pitch: float) -> None:
    """Lambert shading of the skin drawn so far, as if on a lit ellipsoid."""
    ys, xs = np.nonzero(canvas.skin)
    if len(xs) == 0:
        return
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    half_width = (lm[16, 0] - lm[0, 0]) / 2.0
    centre_x = (lm[0, 0] + lm[16, 0]) / 2.0 + math.sin(yaw) * half_width * 0.35
    centre_y = (lm[27, 1] + lm[8, 1]) / 2.0 - math.sin(pitch) * half_width * 0.35
    radius_x, radius_y = half_width * 1.15, half_width * 1.55
    gx = (np.arange(left, right, dtype=np.float32) - centre_x) / radius_x
    gy = (np.arange(top, bottom, dtype=np.float32) - centre_y) / radius_y
    nx, ny = np.meshgrid(gx, gy)
    nz = np.sqrt(np.clip(1.0 - nx**2 - ny**2, 0.0, 1.0))
    # Light from the side (±50°) and from level to well above (5° to 45°):
    # light from below makes faces nobody photographs.
    azimuth = math.radians(100.0) * (float(v["light_azimuth"]) - 0.5)
    elevation = math.radians(5.0 + 40.0 * float(v["light_elevation"]))
    light = np.array([math.sin(azimuth) * math.cos(elevation), -math.sin(elevation),
                      math.cos(azimuth) * math.cos(elevation)], np.float32)
    lambert = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, 1.0)
    shade = 0.62 + 0.5 * lambert
    region = canvas.image[top:bottom, left:right]
    skin = canvas.skin[top:bottom, left:right].astype(bool)
    region[skin] = np.clip(region[skin] * shade[skin][:, None], 0, 255).astype(np.uint8)
