"""``kind: recognize``: photos -> rig parameters in one pass of the regressor (SPEC.md §3).

CPU pool: fetch, decode, 68-point affine alignment onto the rig's reference face.
Model pool: the regressor on the aligned crops and their landmarks.
CPU pool again: the rig render of the parameters as PNG, then the commit.

The parts every kind that turns aligned faces into rig vectors shares live here
too, and ``pinch`` uses them: the model inputs of a batch of aligned rows, loading
the regressor (pinch starts from its vectors), the weights a job depends on, and
the finish stage that renders vectors with the rig.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from facecore.images import encode_png
from jobs.kinds.base import PhotoKind, StageSpec
from jobs.kinds.render import rig_metadata
from jobs.spec import AlignOptions, PhotoJob, StorageSpec, StrictModel, check_uri
from jobs.stages import ALIGN_FIELD_DOCS, ALIGN_SCHEMA, DEVICE_COLUMN, Batch, ModelStage

if TYPE_CHECKING:  # torch stays out of the import path of CPU-only stages
    import torch

    from facecore.models.regressor import Regressor
    from facecore.rig import RigSchema


# -- shared by the kinds that turn aligned faces into rig vectors --------------

def aligned_faces(rows: Sequence[Mapping[str, Any]]) -> tuple[list[np.ndarray], np.ndarray]:
    """The rows' aligned crops (RGB uint8, square) and their landmarks, (B, 68, 2) in crop pixels."""
    from facecore.images import decode_png

    crops = [decode_png(row["aligned"]) for row in rows]
    landmarks = np.array([row["aligned_landmarks"] for row in rows], np.float32).reshape(len(rows), 68, 2)
    return crops, landmarks


def model_inputs(crops: Sequence[np.ndarray], landmarks: np.ndarray, size: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops and their landmarks as a model takes them, at side ``size``.

    Args:
        crops: B square RGB uint8 crops (any side; resized with INTER_AREA).
        landmarks: (B, 68, 2) in each crop's pixels; scaled by the resize factor.
        size: the model's image side.

    Returns:
        images (B, 3, size, size) float in [0, 1] and landmarks (B, 68, 2) float32 in pixels at ``size``.
    """
    import cv2
    import torch

    images, points = [], []
    for crop, marks in zip(crops, landmarks):
        scale = size / crop.shape[0]
        if crop.shape[0] != size:
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        images.append(crop)
        points.append(np.asarray(marks, np.float32) * np.float32(scale))
    images_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)
    return images_t.to(device), torch.from_numpy(np.stack(points)).to(device)


def check_regressor_fits(regressor: Regressor, schema: RigSchema) -> None:
    """Raise a ``ValueError`` naming ``models.regressor`` when it predicts another rig's layout."""
    config = regressor.config
    styles = tuple(group.size for group in schema.discrete)
    if config.continuous_size != schema.continuous_size or tuple(config.style_sizes) != styles:
        raise ValueError(f"models.regressor predicts {config.continuous_size} continuous parameters and style "
                         f"groups of {list(config.style_sizes)} choices; rig {schema.name} has "
                         f"{schema.continuous_size} and {list(styles)}")


def load_regressor(uri: str | None, storage: StorageSpec | None, device, schema: RigSchema) -> Regressor:
    """The regressor at ``uri`` (None: the shipped preset), in eval mode, checked against ``schema``."""
    from facecore import weights
    from facecore.models.regressor import Regressor
    from facecore.presets import preset_path
    from jobs.storage import fsspec_options

    uri = uri or preset_path("regressor")
    regressor = weights.load_model(Regressor, uri, device, fsspec_options(storage, uri)).eval()
    check_regressor_fits(regressor, schema)
    return regressor


def weights_file(folder: str | None, preset: str) -> str:
    """The weights file of a model folder (None: the shipped preset ``preset``), for lineage."""
    from facecore import weights
    from facecore.presets import preset_path

    return f"{str(folder or preset_path(preset)).rstrip('/')}/{weights.WEIGHTS}"


def model_uri(value: str | None) -> str | None:
    """A ``models.*`` field: a checkpoint folder, any URI; None: the shipped preset."""
    return value if value is None else check_uri(value, "model")


class RigFinishStage:
    """CPU side of the kinds that find rig vectors: their rig renders and the model's images, as PNG.

    Args:
        schema: the schema of the rows this stage returns.
        renders: image column -> the vector column the rig renderer draws into it.
        render_size: side of the rig renders.
        raw_images: columns the model pool filled with raw square RGB bytes, each
            with its side in ``<column>_side`` (dropped here): PNG encoding is CPU work.
    """

    def __init__(self, schema: pa.Schema, renders: Mapping[str, str], render_size: int = 128,
                 raw_images: Sequence[str] = ()) -> None:
        from facecore.rig import Renderer, default_schema

        self.schema = schema
        self.renders = dict(renders)
        self.render_size = render_size
        self.raw_images = tuple(raw_images)
        self.renderer = Renderer(default_schema())

    def __call__(self, batch: Batch) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(dict(batch))
        rows = table.to_pylist()
        for row in rows:
            for column in self.raw_images:
                side = row.pop(f"{column}_side", None)
                if row.get(column) is not None and side:
                    row[column] = encode_png(np.frombuffer(row[column], np.uint8).reshape(side, side, 3))
            for image, vector in self.renders.items():
                if row.get(vector) is not None:  # rows that failed upstream have none
                    row[image] = encode_png(self.renderer.render(np.asarray(row[vector], np.float32),
                                                                 self.render_size).image)
        schema = self.schema
        if DEVICE_COLUMN in table.column_names:
            schema = schema.append(pa.field(DEVICE_COLUMN, pa.string()))
        return pa.Table.from_pylist(rows, schema=schema)


# -- the recognize kind ----------------------------------------------------------

class RecognizeOptions(AlignOptions):
    """Align options (68-point affine onto the rig's reference face by default) plus the render."""

    method: Literal["similarity5", "affine68"] = "affine68"  # the regressor learned affine68 crops
    size: int = Field(128, ge=32, le=2048)  # side of the stored aligned crop
    render_size: int = Field(128, ge=32, le=1024)  # side of the rig render of the result


class RecognizeModels(StrictModel):
    # A checkpoint folder (config.json + model.safetensors), any URI; None: the
    # regressor the project ships (facecore.presets), found on each worker.
    regressor: str | None = None

    @field_validator("regressor")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return model_uri(value)


class RecognizeJob(PhotoJob):
    """Photos → rig parameters by the regressor, in one pass (SPEC.md §3)."""

    kind: Literal["recognize"]
    models: RecognizeModels = RecognizeModels()
    options: RecognizeOptions = RecognizeOptions()


RECOGNIZE_FIELD_DOCS = {
    **ALIGN_FIELD_DOCS,
    "params": "flat rig vector from the regressor, styles snapped to their likeliest choice; "
              "slot names in facejobs.params",
    "render": "PNG of the rig renderer's rendering of params",
    "style_confidence": "the regressor's probability of each chosen style, one per discrete group "
                        "in rig order (facejobs.style_groups)",
}

RECOGNIZE_SCHEMA = pa.schema(list(ALIGN_SCHEMA) + [
    pa.field("params", pa.list_(pa.float32())),
    pa.field("render", pa.binary()),
    pa.field("style_confidence", pa.list_(pa.float32())),
])


class RecognizeStage(ModelStage):
    """Run the regressor on the aligned faces of a block, ``batch_size`` at a time.

    Loads the regressor once per actor, on the GPU when the actor has one and on
    the CPU otherwise (see :func:`jobs.stages.pick_device`).
    """

    output_schema = RECOGNIZE_SCHEMA

    def __init__(self, regressor_uri: str | None, storage: StorageSpec | None = None, batch_size: int = 16,
                 device: str = "auto", wants_gpu: bool = False, cpu_threads: int | None = None) -> None:
        from facecore.rig import default_schema

        super().__init__(batch_size, device, wants_gpu, cpu_threads)
        self.schema = default_schema()
        self.regressor = load_regressor(regressor_uri, storage, self.device, self.schema)

    def infer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        crops, landmarks = aligned_faces(rows)
        images, points = model_inputs(crops, landmarks, self.regressor.config.image_size, self.device)
        vectors, confidence = self.regressor.vectors(images, points)
        vectors, confidence = vectors.float().cpu().numpy(), confidence.float().cpu().numpy()
        return [{"params": vectors[j].tolist(), "style_confidence": confidence[j].tolist()}
                for j in range(len(rows))]


class RecognizeKind(PhotoKind):
    name = "recognize"
    spec_model = RecognizeJob
    output_schema = RECOGNIZE_SCHEMA
    field_docs = RECOGNIZE_FIELD_DOCS

    def model_stage(self, spec: RecognizeJob) -> StageSpec:
        resources = spec.resources
        return StageSpec(RecognizeStage, {
            "regressor_uri": spec.models.regressor, "storage": spec.storage, "batch_size": resources.batch_size,
            "device": resources.device, "wants_gpu": resources.num_gpus > 0})

    def finish_stages(self, spec: RecognizeJob) -> list[StageSpec]:
        return [StageSpec(RigFinishStage, {"schema": RECOGNIZE_SCHEMA, "renders": {"render": "params"},
                                           "render_size": spec.options.render_size})]

    def schema_metadata(self, spec: RecognizeJob) -> dict[str, str]:
        from facecore.rig import default_schema

        schema = default_schema()
        return {**rig_metadata(schema), "facejobs.style_groups": json.dumps([g.name for g in schema.discrete])}

    def model_files(self, spec: RecognizeJob) -> dict[str, str]:
        return {**super().model_files(spec), "regressor": weights_file(spec.models.regressor, "regressor")}

    def row_bytes(self, spec: RecognizeJob) -> int:
        return super().row_bytes(spec) + int(1.5 * spec.options.render_size ** 2) + 2048


KIND = RecognizeKind()
