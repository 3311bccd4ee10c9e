"""Face detection, landmarks, the reference face and alignment."""

from facecore.face.detector import (
    AlignedFace,
    AlignMethod,
    Box,
    DetectedFace,
    DetectorConfig,
    FaceDetector,
    FacePolicy,
    alignment_matrix,
)
from facecore.face.heatmap import heatmap_channels, landmark_heatmap
from facecore.face.reference import ReferenceFace, mean_face_reference

__all__ = [
    "AlignedFace",
    "AlignMethod",
    "Box",
    "DetectedFace",
    "DetectorConfig",
    "FaceDetector",
    "FacePolicy",
    "ReferenceFace",
    "alignment_matrix",
    "heatmap_channels",
    "landmark_heatmap",
    "mean_face_reference",
]
