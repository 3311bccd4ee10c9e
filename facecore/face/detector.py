"""Face detection, 68 landmarks and alignment with dlib.

``FaceDetector`` exposes ``detect()``, ``landmarks()``, ``align()`` and a
``__call__`` that chains them. Detection runs on a copy downscaled to
``detect_max_side``; boxes are mapped back and landmarks are fitted on the
full-resolution image, so the downscale costs recall on tiny faces only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from facecore.face import transform
from facecore.face.dlib_models import CNN_DETECTOR, SHAPE_68, model_path
from facecore.face.landmarks import FIVE_POINT_WEIGHTS, five_points
from facecore.face.reference import ReferenceFace, mean_face_reference

AlignMethod = Literal["similarity5", "affine68"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates (right/bottom exclusive)."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def scaled(self, factor: float) -> "Box":
        return Box(self.left * factor, self.top * factor, self.right * factor, self.bottom * factor)

    def as_list(self) -> list[float]:
        return [self.left, self.top, self.right, self.bottom]


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face found in an image.

    Attributes:
        box: detector box in the image's pixel coordinates.
        score: detector confidence (HOG margin or CNN score; higher is surer).
        landmarks: (68, 2) float64 iBUG landmarks in image coordinates.
    """

    box: Box
    score: float
    landmarks: np.ndarray


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """A face warped onto the reference frame.

    Attributes:
        image: (S, S, 3) uint8 aligned crop.
        matrix: (2, 3) float64, source image → aligned frame.
        inverse: (2, 3) float64, aligned frame → source image.
        landmarks: (68, 2) landmarks mapped into the aligned frame.
    """

    image: np.ndarray
    matrix: np.ndarray
    inverse: np.ndarray
    landmarks: np.ndarray


@dataclass(frozen=True)
class FacePolicy:
    """Which faces of a multi-face image to keep: "largest", "all" or "index:N".

    Faces are ordered by box area, largest first, so "index:0" is "largest".
    """

    mode: Literal["largest", "all", "index"]
    index: int = 0

    @classmethod
    def parse(cls, text: str) -> "FacePolicy":
        text = text.strip()
        if text in ("largest", "all"):
            return cls(mode=text)  # type: ignore[arg-type]
        match = re.fullmatch(r"index:(\d+)", text)
        if match:
            return cls(mode="index", index=int(match.group(1)))
        raise ValueError(f"face policy must be 'largest', 'all' or 'index:N', got {text!r}")

    def __str__(self) -> str:
        return f"index:{self.index}" if self.mode == "index" else self.mode

    def select(self, faces: list[DetectedFace]) -> list[DetectedFace]:
        """The faces this policy keeps, from a list ordered largest first."""
        if self.mode == "all":
            return list(faces)
        position = 0 if self.mode == "largest" else self.index
        return [faces[position]] if position < len(faces) else []


@dataclass(frozen=True)
class DetectorConfig:
    """How faces are found.

    Attributes:
        detector: "hog" (dlib frontal HOG + SVM, fast on CPU) or "cnn" (dlib MMOD).
        detect_max_side: detection runs on a copy whose longer side is at most
            this many pixels; 0 disables downscaling.
        upsample: dlib's pyramid upsampling count; each doubles the image and
            halves the smallest face found (HOG's window is 80 px).
        min_score: detections scoring below this are dropped.
    """

    detector: Literal["hog", "cnn"] = "hog"
    detect_max_side: int = 640
    upsample: int = 1
    min_score: float = 0.3


class FaceDetector:
    """dlib face detector + 68-point landmark model + aligner.

    Loads the dlib models once; not thread-safe (give each worker its own).
    """

    def __init__(self, config: DetectorConfig = DetectorConfig(),
                 reference: ReferenceFace | None = None,
                 align_method: AlignMethod = "similarity5") -> None:
        import dlib  # imported here so facecore imports without dlib installed

        self.config = config
        self.reference = reference if reference is not None else mean_face_reference()
        if align_method not in ("similarity5", "affine68"):
            raise ValueError(f"align_method must be 'similarity5' or 'affine68', got {align_method!r}")
        self.align_method = align_method
        if config.detector == "hog":
            self._hog = dlib.get_frontal_face_detector()
            self._cnn = None
        elif config.detector == "cnn":
            self._hog = None
            self._cnn = dlib.cnn_face_detection_model_v1(str(model_path(CNN_DETECTOR)))
        else:
            raise ValueError(f"detector must be 'hog' or 'cnn', got {config.detector!r}")
        self._predictor = dlib.shape_predictor(str(model_path(SHAPE_68)))
        self._dlib = dlib

    def detect(self, rgb: np.ndarray) -> list[tuple[Box, float]]:
        """Face boxes in ``rgb``'s coordinates with scores, largest first.

        Args:
            rgb: (H, W, 3) uint8.
        """
        _check_rgb(rgb)
        scale = 1.0
        small = rgb
        longest = max(rgb.shape[:2])
        if self.config.detect_max_side and longest > self.config.detect_max_side:
            scale = self.config.detect_max_side / longest
            small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found: list[tuple[Box, float]] = []
        if self._hog is not None:
            rects, scores, _ = self._hog.run(small, self.config.upsample, self.config.min_score)
            pairs = zip(rects, scores)
        else:
            pairs = ((d.rect, d.confidence) for d in self._cnn(small, self.config.upsample))
        for rect, score in pairs:
            if score < self.config.min_score:
                continue
            box = Box(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1).scaled(1.0 / scale)
            found.append((box, float(score)))
        found.sort(key=lambda pair: pair[0].area, reverse=True)
        return found

    def landmarks(self, rgb: np.ndarray, box: Box) -> np.ndarray:
        """(68, 2) float64 landmarks of the face in ``box``, on the full image."""
        _check_rgb(rgb)
        rect = self._dlib.rectangle(int(round(box.left)), int(round(box.top)),
                                    int(round(box.right)) - 1, int(round(box.bottom)) - 1)
        shape = self._predictor(rgb, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def align(self, rgb: np.ndarray, landmarks68: np.ndarray) -> AlignedFace:
        """Warp the face with these landmarks onto the reference frame."""
        matrix = alignment_matrix(landmarks68, self.reference, self.align_method)
        return AlignedFace(
            image=transform.warp(rgb, matrix, self.reference.size),
            matrix=matrix,
            inverse=transform.invert(matrix),
            landmarks=transform.apply(matrix, landmarks68),
        )

    def __call__(self, rgb: np.ndarray) -> list[DetectedFace]:
        """Detect every face and fit its landmarks, largest first."""
        return [DetectedFace(box=box, score=score, landmarks=self.landmarks(rgb, box))
                for box, score in self.detect(rgb)]


def alignment_matrix(landmarks68: np.ndarray, reference: ReferenceFace,
                     method: AlignMethod = "similarity5") -> np.ndarray:
    """(2, 3) matrix taking a face's landmarks onto the reference's.

    "similarity5" fits scale, rotation and shift on the 5 points of SPEC.md §1,
    eyes weighted highest (see ``landmarks.FIVE_POINT_WEIGHTS``);
    "affine68" fits a full affine map on all 68 points (SPEC.md §4).
    """
    if method == "similarity5":
        return transform.similarity_matrix(five_points(landmarks68), reference.five_points, FIVE_POINT_WEIGHTS)
    if method == "affine68":
        return transform.affine_matrix(landmarks68, reference.landmarks)
    raise ValueError(f"method must be 'similarity5' or 'affine68', got {method!r}")


def _check_rgb(rgb: np.ndarray) -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {shape} {dtype}")
