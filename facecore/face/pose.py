"""Head pose from 68 landmarks: a rigid generic face fitted with PnP.

The model is a mean adult face in millimetres, in camera-aligned axes (x to the
image's right, y down, z away from the camera), so a frontal face gives the
identity rotation. Six landmarks carry the fit: nose tip, chin, the outer eye
corners and the mouth corners. The camera is a pinhole with the focal length
taken as the image width (good to a few degrees for ordinary photo lenses).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facecore.face.landmarks import check_landmarks68

# iBUG indices and their positions on the generic face (mm, nose tip at 0).
_POSE_POINTS = (30, 8, 36, 45, 48, 54)
_MODEL_MM = np.array([
    [0.0, 0.0, 0.0],          # nose tip
    [0.0, 66.0, 13.0],        # chin
    [-45.0, -34.0, 27.0],     # outer corner of the eye on the image's left
    [45.0, -34.0, 27.0],      # outer corner of the eye on the image's right
    [-30.0, 30.0, 25.0],      # mouth corner, image left
    [30.0, 30.0, 25.0],       # mouth corner, image right
], np.float64)


@dataclass(frozen=True)
class HeadPose:
    """Head rotation in degrees.

    Attributes:
        yaw: turn about the vertical axis; positive when the face turns towards
            the image's right (its nose points right).
        pitch: nod; positive when the face tilts down (chin towards the chest).
        roll: in-plane tilt; positive clockwise in the image.
    """

    yaw: float
    pitch: float
    roll: float


def head_pose(landmarks68: np.ndarray, width: int, height: int) -> HeadPose:
    """Fit the generic face to a face's landmarks.

    Args:
        landmarks68: (68, 2) iBUG landmarks in image pixels.
        width: image width in pixels.
        height: image height in pixels.
    """
    points = check_landmarks68(landmarks68).astype(np.float64)[list(_POSE_POINTS)]
    camera = np.array([[width, 0.0, width / 2.0], [0.0, width, height / 2.0], [0.0, 0.0, 1.0]])
    # SQPnP finds the global minimum; the iterative solver can settle on a mirror
    # solution behind the camera (a turned rig face came out rolled by 180 degrees).
    ok, rotation_vector, translation = cv2.solvePnP(_MODEL_MM, points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok or translation[2, 0] <= 0:
        raise ValueError("head pose: the landmarks admit no rigid fit")
    rotation, _ = cv2.Rodrigues(rotation_vector)
    # R = Rz(roll) @ Ry(yaw) @ Rx(pitch), in the camera's axes (y down).
    yaw = np.degrees(np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(rotation[2, 1], rotation[2, 2]))
    roll = np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))
    # The face looks along -z; a nose pointing right (+x) is a negative angle
    # about y in these axes: report it as positive yaw. A face looking down (+y)
    # is a positive angle about x already, and so is a clockwise tilt about z.
    return HeadPose(yaw=float(-yaw), pitch=float(pitch), roll=float(roll))
