"""Head pose from landmarks: rig renders of known yaw and pitch, and a mirrored photo."""

from __future__ import annotations

import numpy as np
import pytest

from facecore.face.pose import head_pose
from facecore.rig import Renderer, default_schema


def _rig_pose(renderer, schema, **values):
    params = schema.encode(schema.complete(values))
    render = renderer.render(params, 256)
    return head_pose(render.landmarks.reshape(68, 2), 256, 256)


def test_pose_follows_the_rigs_yaw_and_pitch():
    schema = default_schema()
    renderer = Renderer(schema)
    frontal = _rig_pose(renderer, schema)
    assert abs(frontal.yaw) < 6 and abs(frontal.roll) < 3
    poses = [_rig_pose(renderer, schema, yaw=value) for value in (0.2, 0.35, 0.5, 0.65, 0.8)]
    yaws = [pose.yaw for pose in poses]
    # The rig's yaw > 0.5 moves the nose to the image's right: positive yaw, rising with it.
    assert all(b > a for a, b in zip(yaws, yaws[1:])) and yaws[-1] > 15 and yaws[0] < -15, yaws
    assert abs(yaws[0] + yaws[-1]) < 2  # symmetric
    assert max(abs(pose.roll) for pose in poses) < 5  # a turn is not a tilt
    pitches = [_rig_pose(renderer, schema, pitch=value).pitch for value in (0.2, 0.5, 0.8)]
    assert abs(pitches[2] - pitches[0]) > 5
    rolls = [_rig_pose(renderer, schema, roll=value).roll for value in (0.3, 0.5, 0.7)]
    assert abs(rolls[2] - rolls[0]) > 5 and abs(rolls[1]) < 3


def test_a_mirrored_face_has_the_opposite_yaw_and_roll(photos):
    from facecore.face import FaceDetector
    from facecore.images import decode

    rgb = decode(photos["biden.jpg"].read_bytes()).rgb
    detector = FaceDetector()
    points = detector(rgb)[0].landmarks
    pose = head_pose(points, rgb.shape[1], rgb.shape[0])
    flipped = points.copy()
    flipped[:, 0] = rgb.shape[1] - 1 - flipped[:, 0]
    order = np.r_[16:-1:-1, 26:16:-1, 27:31, 35:30:-1, 45:41:-1, 47:45:-1, 39:35:-1, 41:39:-1,
                  54:47:-1, 59:54:-1, 64:59:-1, 67:64:-1]  # iBUG left/right pairs swap in a mirror
    mirrored = head_pose(flipped[order], rgb.shape[1], rgb.shape[0])
    assert mirrored.yaw == pytest.approx(-pose.yaw, abs=2.0)
    assert mirrored.roll == pytest.approx(-pose.roll, abs=2.0)
    assert mirrored.pitch == pytest.approx(pose.pitch, abs=2.0)
    assert abs(pose.yaw) < 30 and abs(pose.pitch) < 30  # a portrait, facing the camera
