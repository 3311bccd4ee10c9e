"""``kind: pinch``: photos -> rig parameters by pinch optimisation (SPEC.md §4).

CPU pool: fetch, decode, 68-point affine alignment onto the rig's reference face.
Model pool: the start (the regressor's vectors, as ``kind: recognize`` finds them,
or the reference face), then the batched optimiser over the imitator and the face
parser, with the landmark term on the aligned landmarks.
CPU pool again: the preview and the rig renders of the start and the result as
PNG, then the commit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from jobs.kinds.base import PhotoKind, StageSpec
from jobs.kinds.recognize import (
    RigFinishStage,
    aligned_faces,
    load_regressor,
    model_inputs,
    model_uri,
    weights_file,
)
from jobs.kinds.render import rig_metadata
from jobs.spec import AlignOptions, PhotoJob, StorageSpec, StrictModel
from jobs.stages import ALIGN_FIELD_DOCS, ALIGN_SCHEMA, ModelStage

if TYPE_CHECKING:  # torch stays out of the import path of CPU-only stages
    import numpy as np
    import torch

    from facecore.methods.pinch import PinchConfig


class PinchOptions(AlignOptions):
    """Align options (68-point affine onto the rig's reference face by default) plus the optimiser."""

    method: Literal["similarity5", "affine68"] = "affine68"  # SPEC.md §4 aligns with 68 points
    size: int = Field(128, ge=32, le=2048)  # side of the stored aligned crop
    max_iterations: int = Field(100, ge=0)
    # Adam's step on x. Default: 0.02 from the regressor's start (a refinement: larger
    # steps overshoot and the stop rule ends the search), 0.1 from the reference face.
    learning_rate: float | None = Field(None, gt=0)
    patience: int = Field(12, ge=1)
    min_improvement: float = Field(2e-3, ge=0)
    target_loss: float = Field(0.0, ge=0)
    prior_weight: float = Field(0.3, ge=0)  # pull towards where the search starts; 0 = the seed's plain loss
    try_styles: bool = True  # with styles: search, choose each style by trying every one (start and snap)
    render_size: int = Field(128, ge=32, le=1024)  # side of the rig renders of the start and the result
    # Where the search starts: the regressor's vectors (models.regressor), or the reference face.
    init: Literal["recognize", "reference"] = "recognize"
    # The rig's own landmarks of x, aligned like the photo, against the photo's aligned
    # landmarks: exact geometry for shape and pose; 0 = off.
    landmark_weight: float = Field(5.0, ge=0)
    feature_weight: float = Field(1.0, ge=0)  # the seed's imitator-feature term
    # Continuous parameters, or whole groups (identity, expression, pose, appearance),
    # kept where they start. Default: the appearance when starting from recognize (the
    # parser's features are trained to ignore colour, so the search cannot judge it
    # and only drifts), nothing when starting from the reference face.
    hold: list[str] | None = None
    # search: the relaxed one-hots (and try_styles); keep: the start's styles.
    # Default: keep the regressor's styles, search from the reference face.
    styles: Literal["search", "keep"] | None = None
    # An imitator that learned frontal renders only (the presets before issue 12) is
    # shown x with the pose at the reference; only the landmark term and the prior move it.
    frontal_imitator: bool = False

    @field_validator("hold")
    @classmethod
    def _hold_in_rig(cls, value: list[str] | None) -> list[str] | None:
        from facecore.rig import default_schema
        from facecore.rig.schema import PARAM_GROUPS

        unknown = sorted(set(value or ()) - set(default_schema().continuous_names) - set(PARAM_GROUPS))
        if unknown:
            raise ValueError(f"{unknown} are neither continuous parameters nor groups ({', '.join(PARAM_GROUPS)}) "
                             f"of the rig")
        return value

    def held_parameters(self) -> tuple[str, ...]:
        """``hold`` with groups expanded and the default applied."""
        from facecore.rig import default_schema

        schema = default_schema()
        names = self.hold if self.hold is not None else (["appearance"] if self.init == "recognize" else [])
        expanded: list[str] = []
        for name in names:
            group = [p.name for p in schema.continuous if p.group == name]
            expanded += group or [name]
        return tuple(dict.fromkeys(expanded))

    def search_styles(self) -> bool:
        return (self.styles or ("keep" if self.init == "recognize" else "search")) == "search"


class PinchModels(StrictModel):
    # Checkpoint folders (config.json + model.safetensors), any URI; None: the
    # models the project ships (facecore.presets), found on each worker.
    imitator: str | None = None
    parser: str | None = None
    regressor: str | None = None  # used with options.init: recognize

    @field_validator("imitator", "parser", "regressor")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return model_uri(value)


class PinchJob(PhotoJob):
    """Photos → rig parameters by pinch optimisation (SPEC.md §4)."""

    kind: Literal["pinch"]
    models: PinchModels = PinchModels()
    options: PinchOptions = PinchOptions()

    @field_validator("options")
    @classmethod
    def _regressor_used(cls, value: PinchOptions, info: ValidationInfo) -> PinchOptions:
        models = info.data.get("models")
        if value.init == "reference" and models is not None and models.regressor is not None:
            raise ValueError("init: reference starts without the regressor, but models.regressor is given; "
                             "remove it or use init: recognize")
        return value


PINCH_FIELD_DOCS = {
    **ALIGN_FIELD_DOCS,
    "params": "flat rig vector found by pinch; slot names in facejobs.params",
    "preview": "PNG of the imitator's rendering of params",
    "render": "PNG of the rig renderer's rendering of params",
    "init_params": "flat rig vector the search started from: the regressor's (options.init: recognize) "
                   "or the reference face's",
    "init_render": "PNG of the rig renderer's rendering of init_params",
    "loss_start": "pinch loss (feature L1, prior and landmark terms) at init_params",
    "loss_end": "pinch loss at params",
    "iterations": "optimiser steps taken",
}

PINCH_SCHEMA = pa.schema(list(ALIGN_SCHEMA) + [
    pa.field("params", pa.list_(pa.float32())),
    pa.field("preview", pa.binary()),
    pa.field("render", pa.binary()),
    pa.field("init_params", pa.list_(pa.float32())),
    pa.field("init_render", pa.binary()),
    pa.field("loss_start", pa.float32()),
    pa.field("loss_end", pa.float32()),
    pa.field("iterations", pa.int32()),
])

# Between the model pool and the finish stage ``preview`` holds raw RGB bytes,
# square, of side ``preview_side``: the PNG encoding is CPU work.
PINCH_MODEL_SCHEMA = PINCH_SCHEMA.append(pa.field("preview_side", pa.int32()))


def pinch_config(options: PinchOptions) -> PinchConfig:
    """The optimiser settings of a pinch spec's options."""
    from facecore.methods.pinch import PinchConfig

    rate = options.learning_rate or (0.02 if options.init == "recognize" else 0.1)
    return PinchConfig(max_iterations=options.max_iterations, learning_rate=rate,
                       patience=options.patience, min_improvement=options.min_improvement,
                       target_loss=options.target_loss, prior_weight=options.prior_weight,
                       try_styles=options.try_styles, hold=options.held_parameters(),
                       search_styles=options.search_styles(),
                       landmark_weight=options.landmark_weight, frontal_imitator=options.frontal_imitator,
                       feature_weight=options.feature_weight)


class PinchStage(ModelStage):
    """Pinch the aligned faces of a block, ``batch_size`` at a time.

    Loads the imitator and parser (and, with ``init: recognize``, the regressor)
    once per actor, on the GPU when the actor has one and on the CPU otherwise
    (see :func:`jobs.stages.pick_device`).
    """

    output_schema = PINCH_MODEL_SCHEMA

    def __init__(self, imitator_uri: str | None, parser_uri: str | None, options: PinchOptions | None = None,
                 storage: StorageSpec | None = None, batch_size: int = 16, device: str = "auto",
                 wants_gpu: bool = False, cpu_threads: int | None = None, regressor_uri: str | None = None) -> None:
        from facecore import weights
        from facecore.models.imitator import Imitator
        from facecore.models.parsing import FaceParser
        from facecore.presets import preset_path
        from facecore.rig import default_schema
        from jobs.storage import fsspec_options

        super().__init__(batch_size, device, wants_gpu, cpu_threads)
        imitator_uri = imitator_uri or preset_path("imitator")
        parser_uri = parser_uri or preset_path("parser")
        self.options = options or PinchOptions()
        self.imitator = weights.load_model(Imitator, imitator_uri, self.device,
                                           fsspec_options(storage, imitator_uri)).eval()
        self.parser = weights.load_model(FaceParser, parser_uri, self.device,
                                         fsspec_options(storage, parser_uri)).eval()
        self.schema = default_schema()
        if self.imitator.config.param_dim != self.schema.vector_size:
            raise ValueError(f"models.imitator takes {self.imitator.config.param_dim} parameters; "
                             f"rig {self.schema.name} has {self.schema.vector_size}")
        self.config = pinch_config(self.options)
        self.regressor = (load_regressor(regressor_uri, storage, self.device, self.schema)
                          if self.options.init == "recognize" else None)

    def start(self, crops: list[np.ndarray], landmarks: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """(B, D) vectors the search starts from: the regressor's, or the reference face's."""
        import torch

        if self.regressor is not None:
            images, points = model_inputs(crops, landmarks, self.regressor.config.image_size, self.device)
            return self.regressor.vectors(images, points)[0].to(dtype)
        reference = torch.from_numpy(self.schema.reference_vector()).to(device=self.device, dtype=dtype)
        return reference.repeat(len(crops), 1)

    def infer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch

        from facecore.methods.pinch import pinch

        size = self.imitator.config.image_size
        crops, landmarks = aligned_faces(rows)
        targets, points = model_inputs(crops, landmarks, size, self.device)  # landmarks at the imitator's side
        start = self.start(crops, landmarks, targets.dtype)
        result = pinch(self.imitator, self.parser, targets, self.schema, self.config, start=start, landmarks=points)
        with torch.no_grad():
            previews = self.imitator(torch.from_numpy(result.params).to(self.device))
        previews = (previews.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        init = start.float().cpu().numpy()
        return [{"params": result.params[j].tolist(), "preview": previews[j].tobytes(), "preview_side": size,
                 "init_params": init[j].tolist(), "loss_start": float(result.loss_start[j]),
                 "loss_end": float(result.loss_end[j]), "iterations": int(result.iterations[j])}
                for j in range(len(rows))]


class PinchKind(PhotoKind):
    name = "pinch"
    spec_model = PinchJob
    output_schema = PINCH_SCHEMA
    field_docs = PINCH_FIELD_DOCS

    def model_stage(self, spec: PinchJob) -> StageSpec:
        resources = spec.resources
        return StageSpec(PinchStage, {
            "imitator_uri": spec.models.imitator, "parser_uri": spec.models.parser,
            "regressor_uri": spec.models.regressor, "options": spec.options,
            "storage": spec.storage, "batch_size": resources.batch_size, "device": resources.device,
            "wants_gpu": resources.num_gpus > 0})

    def finish_stages(self, spec: PinchJob) -> list[StageSpec]:
        return [StageSpec(RigFinishStage, {
            "schema": PINCH_SCHEMA, "renders": {"render": "params", "init_render": "init_params"},
            "render_size": spec.options.render_size, "raw_images": ["preview"]})]

    def schema_metadata(self, spec: PinchJob) -> dict[str, str]:
        from facecore.rig import default_schema

        return rig_metadata(default_schema())

    def model_files(self, spec: PinchJob) -> dict[str, str]:
        files = super().model_files(spec)
        names = ("imitator", "parser") + (("regressor",) if spec.options.init == "recognize" else ())
        for name in names:
            files[name] = weights_file(getattr(spec.models, name), name)
        return files

    def row_bytes(self, spec: PinchJob) -> int:
        return super().row_bytes(spec) + 2 * int(1.5 * spec.options.render_size ** 2) + 4096


KIND = PinchKind()
