"""``kind: landmarks``: 68 landmarks and the head pose of every face; no images.

The small example of how a kind is built (README: "Writing a new job kind"): it
reuses the photo kinds' fetch stage, brings one stage of its own (a subclass of
the align stage that writes pose instead of a crop, named as ``face_stage``), and
declares its columns.
There is no model stage, so the CPU pool does all the work and commits.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from facecore.face.pose import head_pose
from jobs.kinds.base import PhotoKind
from jobs.spec import DetectOptions, PhotoJob
from jobs.stages import ALIGN_FIELD_DOCS, ALIGN_SCHEMA, AlignStage


class LandmarksJob(PhotoJob):
    """Detect every face and write its 68 landmarks and head pose."""

    kind: Literal["landmarks"]
    options: DetectOptions = DetectOptions()  # nothing is cropped: no size or alignment method


POSE_FIELD_DOCS = {
    "yaw": "degrees; positive when the face turns towards the image's right",
    "pitch": "degrees; positive when the face tilts down",
    "roll": "degrees; positive when the face tilts clockwise in the image",
}
_CROP_COLUMNS = ("aligned_landmarks", "matrix", "aligned")

# The align rows without the crop, with the pose.
LANDMARKS_FIELD_DOCS = {**{k: v for k, v in ALIGN_FIELD_DOCS.items() if k not in _CROP_COLUMNS},
                        "score": "detector confidence", **POSE_FIELD_DOCS}
LANDMARKS_SCHEMA = pa.schema([field for field in ALIGN_SCHEMA if field.name not in _CROP_COLUMNS]
                             + [pa.field(name, pa.float32()) for name in POSE_FIELD_DOCS])


class LandmarksStage(AlignStage):
    """Decode and detect like :class:`AlignStage`; per face, landmarks and head pose."""

    schema = LANDMARKS_SCHEMA

    def face_row(self, rgb: np.ndarray, face) -> dict[str, Any]:
        pose = head_pose(face.landmarks, rgb.shape[1], rgb.shape[0])
        return {**self.detection_columns(face), "yaw": pose.yaw, "pitch": pose.pitch, "roll": pose.roll}


class LandmarksKind(PhotoKind):
    name = "landmarks"
    spec_model = LandmarksJob
    output_schema = LANDMARKS_SCHEMA
    field_docs = LANDMARKS_FIELD_DOCS
    face_stage = LandmarksStage

    def row_bytes(self, spec: LandmarksJob) -> int:
        return 1024  # 68 points and a few numbers


KIND = LandmarksKind()
