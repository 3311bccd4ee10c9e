"""``kind: landmarks``: 68 landmarks and the head pose of every face; no images.

The small example of how a kind is built (README: "Writing a new job kind"): it
reuses the photo kinds' fetch stage, brings one stage of its own (a subclass of
the align stage that writes pose instead of a crop), and declares its columns.
There is no model stage, so the CPU pool does all the work and commits.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from facecore.face.pose import head_pose
from jobs.kinds.base import PhotoKind, StageSpec
from jobs.spec import AlignOptions, InputSpec, LimitsSpec, OutputSpec, ResourcesSpec, StorageSpec, StrictModel
from jobs.stages import AlignStage, FetchStage


class LandmarksOptions(AlignOptions):
    """Detection options of align; nothing is cropped, so no size or alignment method."""

    size: int = Field(256, ge=32, le=2048)  # unused: kept so the align options validate alike


class LandmarksJob(StrictModel):
    """Detect every face and write its 68 landmarks and head pose."""

    kind: Literal["landmarks"]
    input: InputSpec
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    options: LandmarksOptions = LandmarksOptions()
    resources: ResourcesSpec = ResourcesSpec()
    limits: LimitsSpec = LimitsSpec()


LANDMARKS_FIELD_DOCS = {
    "face_index": "rank of this face by box area in the source, 0 = largest",
    "face_count": "faces detected in the source",
    "score": "detector confidence",
    "box": "detector box [left, top, right, bottom] in source pixels",
    "landmarks": "68 iBUG landmarks in source pixels, flattened x0,y0,x1,y1,...",
    "yaw": "degrees; positive when the face turns towards the image's right",
    "pitch": "degrees; positive when the face tilts down",
    "roll": "degrees; positive when the face tilts clockwise in the image",
    "width": "source width after EXIF orientation",
    "height": "source height after EXIF orientation",
}

LANDMARKS_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("face_index", pa.int32()),
    pa.field("face_count", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("box", pa.list_(pa.float32())),
    pa.field("landmarks", pa.list_(pa.float32())),
    pa.field("yaw", pa.float32()),
    pa.field("pitch", pa.float32()),
    pa.field("roll", pa.float32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])


class LandmarksStage(AlignStage):
    """Decode and detect like :class:`AlignStage`; per face, landmarks and head pose."""

    schema = LANDMARKS_SCHEMA

    def face_row(self, rgb: np.ndarray, face) -> dict[str, Any]:
        pose = head_pose(face.landmarks, rgb.shape[1], rgb.shape[0])
        return {
            "score": face.score,
            "box": face.box.as_list(),
            "landmarks": face.landmarks.astype(np.float32).ravel().tolist(),
            "yaw": pose.yaw,
            "pitch": pose.pitch,
            "roll": pose.roll,
        }


class LandmarksKind(PhotoKind):
    name = "landmarks"
    spec_model = LandmarksJob
    output_schema = LANDMARKS_SCHEMA
    field_docs = LANDMARKS_FIELD_DOCS

    def cpu_stages(self, spec: LandmarksJob) -> list[StageSpec]:
        return [
            StageSpec(FetchStage, {"storage": spec.storage, "max_bytes": spec.options.max_bytes,
                                   "threads": spec.resources.fetch_threads}),
            StageSpec(LandmarksStage, {"options": spec.options}),
        ]

    def row_bytes(self, spec: LandmarksJob) -> int:
        return 1024  # 68 points and a few numbers


KIND = LandmarksKind()
