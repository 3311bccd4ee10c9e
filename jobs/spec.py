"""Job specs: typed, validated, and free of secrets.

A spec is a YAML or JSON document whose ``kind`` picks the job. Unknown fields
are errors, and every error names the field it is about, e.g.
``options.faces: face policy must be 'largest', 'all' or 'index:N', got 'most'``.
Credentials never appear in a spec: they come from the environment or the
instance role (``AWS_ACCESS_KEY_ID``... for S3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from facecore.face import FacePolicy
from facecore.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE


class SpecError(ValueError):
    """A spec is invalid. The message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_uri(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{field} must not be empty")
    parts = urlsplit(value)
    if parts.scheme not in ("", "file", "s3", "memory") and len(parts.scheme) > 1:
        raise ValueError(f"{field}: unsupported scheme {parts.scheme!r} (use a local path, file://, s3://)")
    if parts.username or parts.password:
        raise ValueError(f"{field}: credentials must not be embedded in URIs; use the environment")
    return value


class StorageSpec(_Strict):
    """Object storage settings. Credentials come from the environment only."""

    endpoint_url: str | None = None  # any S3-compatible store: MinIO, Ceph, moto
    region: str | None = None
    anon: bool = False  # anonymous access to public buckets


class InputSpec(_Strict):
    manifest: str  # Parquet / CSV / JSONL file (or folder of Parquet) with a `uri` column

    @field_validator("manifest")
    @classmethod
    def _manifest_uri(cls, value: str) -> str:
        return _check_uri(value, "manifest")


class OutputSpec(_Strict):
    path: str  # a folder: Parquet parts + _SUCCESS

    @field_validator("path")
    @classmethod
    def _path_uri(cls, value: str) -> str:
        return _check_uri(value, "path")


class ResourcesSpec(_Strict):
    """Where the stages run. Set by the pipeline builder, never inside a stage."""

    concurrency: int = Field(2, ge=1)  # actors in each model/CPU pool
    num_gpus: float = Field(0.0, ge=0)  # per model actor; 0 = CPU; fractions allowed
    num_cpus: float | None = Field(None, gt=0)  # per CPU actor; None = fit the cluster
    batch_size: int = Field(16, ge=1)  # rows per model call in model (GPU) stages
    fetch_threads: int = Field(8, ge=1)  # parallel object reads per fetch call
    rows_per_block: int = Field(256, ge=1)  # most input rows per CPU-pool call and per output part


class AlignOptions(_Strict):
    faces: str = "largest"  # largest | all | index:N (faces ordered by area)
    size: int = Field(256, ge=32, le=2048)  # side of the aligned crop
    method: Literal["similarity5", "affine68"] = "similarity5"
    detector: Literal["hog", "cnn"] = "hog"
    detect_max_side: int = Field(640, ge=0)  # detect on a copy this size; 0 = full size
    upsample: int = Field(1, ge=0, le=3)
    min_score: float = 0.3
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # refuse larger images from the header
    min_side: int = Field(DEFAULT_MIN_SIDE, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1)  # refuse larger files before reading

    @field_validator("faces")
    @classmethod
    def _face_policy(cls, value: str) -> str:
        return str(FacePolicy.parse(value))


class AlignJob(_Strict):
    """Detect, landmark and align every face of every image."""

    kind: Literal["align"]
    input: InputSpec
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    models: dict[str, str] = Field(default_factory=dict)
    options: AlignOptions = AlignOptions()
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _no_models(self) -> "AlignJob":
        if self.models:
            raise ValueError(f"models: align uses dlib's packaged models only, got {sorted(self.models)}")
        return self


class RenderOptions(_Strict):
    count: int = Field(1000, ge=1)  # renders to sample (ignored with an input manifest)
    size: int = Field(256, ge=16, le=1024)  # image side in pixels
    seed: int = Field(0, ge=0)  # sampling seed: row i is drawn from (seed, i)
    rig: str | None = None  # rig schema YAML; default: the built-in rig
    fixed: dict[str, float | str] = Field(default_factory=dict)  # hold parameters at a value

    @field_validator("rig")
    @classmethod
    def _rig_readable(cls, value: str | None) -> str | None:
        from facecore.rig import load_schema

        if value is not None:
            load_schema(value)  # SchemaError is a ValueError: reported at options.rig
        return value

    @field_validator("fixed")
    @classmethod
    def _fixed_in_schema(cls, value: dict, info: ValidationInfo) -> dict:
        from facecore.rig import default_schema, load_schema

        rig = info.data.get("rig")
        (load_schema(rig) if rig else default_schema()).complete(value)
        return value


class RenderInputSpec(_Strict):
    # Optional: a table of parameter sets, one column per parameter name (discrete
    # groups as their choice), or one `params` column holding flat vectors.
    manifest: str

    @field_validator("manifest")
    @classmethod
    def _manifest_uri(cls, value: str) -> str:
        return _check_uri(value, "manifest")


class RenderJob(_Strict):
    """Render avatars from sampled or given rig parameters."""

    kind: Literal["render"]
    input: RenderInputSpec | None = None
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    options: RenderOptions = RenderOptions()
    resources: ResourcesSpec = ResourcesSpec()


class PinchOptions(AlignOptions):
    """Align options (68-point affine onto the rig's reference face by default) plus the optimiser."""

    method: Literal["similarity5", "affine68"] = "affine68"  # SPEC.md §4 aligns with 68 points
    size: int = Field(128, ge=32, le=2048)  # side of the stored aligned crop
    max_iterations: int = Field(100, ge=0)
    learning_rate: float = Field(0.1, gt=0)
    patience: int = Field(12, ge=1)
    min_improvement: float = Field(2e-3, ge=0)
    target_loss: float = Field(0.0, ge=0)
    prior_weight: float = Field(0.1, ge=0)  # pull towards the reference face; 0 = the seed's plain loss
    try_styles: bool = True  # choose discrete styles by trying each one (start and snap)
    render_size: int = Field(128, ge=32, le=1024)  # side of the rig render of the result
    # Parameters kept at the reference. The shipped models learned frontal renders
    # and photos arrive aligned to the frontal reference, so the pose is held.
    hold: list[str] = Field(default_factory=lambda: ["yaw", "pitch", "roll"])

    @field_validator("hold")
    @classmethod
    def _hold_in_rig(cls, value: list[str]) -> list[str]:
        from facecore.rig import default_schema

        unknown = sorted(set(value) - set(default_schema().continuous_names))
        if unknown:
            raise ValueError(f"{unknown} are not continuous parameters of the rig")
        return value


class PinchModels(_Strict):
    # Checkpoint folders (config.json + model.safetensors), any URI; None: the
    # models the project ships (facecore.presets), found on each worker.
    imitator: str | None = None
    parser: str | None = None

    @field_validator("imitator", "parser")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return value if value is None else _check_uri(value, "model")


class PinchJob(_Strict):
    """Photos → rig parameters by pinch optimisation (SPEC.md §4)."""

    kind: Literal["pinch"]
    input: InputSpec
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    models: PinchModels = PinchModels()
    options: PinchOptions = PinchOptions()
    resources: ResourcesSpec = ResourcesSpec()


class TrainData(_Strict):
    renders: str  # a render job's output folder: (params, image, mask) rows
    photos: str | None = None  # parser only: an align job's output; masks come from its landmarks
    validation_fraction: float = Field(0.1, gt=0, lt=1)  # held out, by key hash
    photo_repeat: int = Field(1, ge=1, le=10000)  # times each photo row appears per epoch

    @field_validator("renders", "photos")
    @classmethod
    def _data_uri(cls, value: str | None) -> str | None:
        return value if value is None else _check_uri(value, "data")


class TrainOptions(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    learning_rate: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: anneal to 0 over the epochs
    image_size: int = Field(64, ge=16, le=512)  # renders are resized to this
    base_channels: int = Field(32, ge=4)
    seed: int = 0


class TrainResources(_Strict):
    num_workers: int = Field(2, ge=1)  # data-parallel workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0)  # None: fit the cluster, leaving CPU for data reads


class TrainJob(_Strict):
    """Train a model with Ray Train; checkpoints and the final model go to output.path."""

    kind: Literal["train"]
    model: Literal["imitator", "parser"]
    data: TrainData
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    options: TrainOptions = TrainOptions()
    resources: TrainResources = TrainResources()


JOB_KINDS: dict[str, type[_Strict]] = {"align": AlignJob, "render": RenderJob, "pinch": PinchJob,
                                       "train": TrainJob}
JobSpec = Union[AlignJob, RenderJob, PinchJob, TrainJob]


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validate a parsed spec document.

    Raises:
        SpecError: naming the first bad field(s) and what was wanted.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a mapping with a 'kind' field, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in JOB_KINDS:
        raise SpecError(f"{source}: kind: must be one of {sorted(JOB_KINDS)}, got {kind!r}")
    try:
        return JOB_KINDS[kind].model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        raise SpecError(f"{source}: " + "; ".join(_describe(error) for error in exc.errors())) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML or JSON spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: not valid YAML/JSON: {exc}") from None
    if isinstance(data, dict):
        data = _anchor_local_paths(data, path.resolve().parent)
    return parse_spec(data, source=str(path))


# Fields holding a location; relative local paths in a spec file are relative to
# the file, so a spec means the same thing from any working directory (and on
# Ray workers, whose working directory is not the driver's).
_LOCATION_FIELDS = (("input", "manifest"), ("output", "path"), ("data", "renders"), ("data", "photos"),
                    ("models", "imitator"), ("models", "parser"), ("options", "rig"))


def _anchor_local_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    data = dict(data)
    for section, field in _LOCATION_FIELDS:
        block = data.get(section)
        if not isinstance(block, dict) or not isinstance(block.get(field), str):
            continue
        value = block[field].strip()
        scheme = urlsplit(value).scheme
        if not value or (len(scheme) > 1) or Path(value).is_absolute():
            continue  # URIs (s3://, file://) and absolute paths stand as written
        data[section] = {**block, field: os.path.normpath(folder / value)}
    return data


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "spec"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{location}: unknown field"
    if kind == "missing":
        return f"{location}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"{location}: {message} (got {given!r})"
    return f"{location}: {message}"
