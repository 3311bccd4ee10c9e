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
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from facecore.face import FacePolicy
from facecore.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE


class SpecError(ValueError):
    """A spec is invalid. The message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Every spec section: unknown fields are errors, values are frozen.
StrictModel = _Strict


def check_uri(value: str, field: str) -> str:
    """A spec field holding a location: local path, file:// or s3://, no credentials."""
    return _check_uri(value, field)


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
    # Manifest uris must start with one of these (after resolving relative paths);
    # empty: any uri on the storage the spec uses (its manifest's and output's schemes).
    allowed_prefixes: list[str] = Field(default_factory=list)

    @field_validator("manifest")
    @classmethod
    def _manifest_uri(cls, value: str) -> str:
        return _check_uri(value, "manifest")

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefix_uris(cls, value: list[str]) -> list[str]:
        return [_check_uri(prefix, "allowed_prefixes") for prefix in value]


class OutputSpec(_Strict):
    path: str  # a folder: Parquet parts + _SUCCESS

    @field_validator("path")
    @classmethod
    def _path_uri(cls, value: str) -> str:
        return _check_uri(value, "path")


class ResourcesSpec(_Strict):
    """Where the stages run. Set by the pipeline builder, never inside a stage.

    A job has a CPU pool (fetch, decode, align; encode and commit) and, for kinds
    with a model, a model pool; each has its own size and CPU share.
    """

    concurrency: int = Field(2, ge=1)  # actors in the CPU pool
    num_cpus: float | None = Field(None, gt=0)  # per CPU-pool actor; None = fit the cluster
    model_concurrency: int | None = Field(None, ge=1)  # actors in the model pool; None = concurrency
    num_gpus: float = Field(0.0, ge=0)  # per model actor; 0 = CPU; fractions allowed
    model_num_cpus: float | None = Field(None, gt=0)  # per model actor; None = 0.25 with a GPU, else fit
    # auto: CUDA when the model actor sees it, else the CPU (with a warning, recorded
    # in _SUCCESS when GPUs were asked for); cuda: no CUDA is an error; cpu: never CUDA.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    batch_size: int = Field(16, ge=1)  # rows per model call in model (GPU) stages
    # Fresh starts of a model actor whose device broke (or whose node was lost)
    # before the job fails; -1: no limit (spot GPU nodes that come and go).
    model_restarts: int = Field(3, ge=-1)
    fetch_threads: int = Field(8, ge=1)  # parallel object reads per fetch call
    # Input rows per CPU-pool call, and so per output part; None: sized by the job
    # (at least 64 rows or the whole small job, at most 256 rows of images or ~128 MB).
    rows_per_block: int | None = Field(None, ge=1)

    @property
    def model_pool_size(self) -> int:
        return self.model_concurrency or self.concurrency

    @model_validator(mode="after")
    def _cuda_needs_gpus(self) -> "ResourcesSpec":
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("device: cuda needs num_gpus > 0 (a GPU share per model actor)")
        return self


class LimitsSpec(_Strict):
    """When a job gives up: systemic failure is loud, not a table of error rows."""

    # Stop when more than this share of the rows checked so far has a systemic
    # status (fetch_error, model_error, bad_uri...; not no_face or decode_error).
    max_error_rate: float = Field(0.5, ge=0, le=1)
    min_rows_checked: int = Field(100, ge=1)  # rows seen before the rate is judged (or the whole job if smaller)


class DetectOptions(_Strict):
    """How photos are read and their faces found: every photo kind has these."""

    faces: str = "largest"  # largest | all | index:N (faces ordered by area)
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


class AlignOptions(DetectOptions):
    """Detection, then the aligned crop."""

    size: int = Field(256, ge=32, le=2048)  # side of the aligned crop
    method: Literal["similarity5", "affine68"] = "similarity5"


class PhotoJob(_Strict):
    """The sections every job over a manifest of photos has; a kind adds ``kind``,
    ``options`` and, if it has models, ``models``."""

    input: InputSpec
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    resources: ResourcesSpec = ResourcesSpec()
    limits: LimitsSpec = LimitsSpec()


# Any job spec: every kind's model has kind, output, storage and resources.
JobSpec = BaseModel


def job_kinds() -> dict:
    """The registered job kinds by name (see :mod:`jobs.kinds`)."""
    from jobs.kinds import KINDS

    return KINDS


_KIND_SPEC_NAMES = frozenset({"AlignJob", "RenderJob", "RenderOptions", "RenderInputSpec", "LandmarksJob",
                               "PinchJob", "PinchOptions", "PinchModels", "TrainJob", "TrainData", "TrainOptions",
                               "TrainResources"})


def __getattr__(name: str):
    # The job models live in their kind's module (jobs.kinds.*); these names
    # stay importable from here for code written before the kinds were split.
    if name in _KIND_SPEC_NAMES:
        from jobs.kinds import SPEC_NAMES

        return SPEC_NAMES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validate a parsed spec document.

    Raises:
        SpecError: naming the first bad field(s) and what was wanted.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a mapping with a 'kind' field, got {type(data).__name__}")
    kind = data.get("kind")
    kinds = job_kinds()
    if kind not in kinds:
        raise SpecError(f"{source}: kind: must be one of {sorted(kinds)}, got {kind!r}")
    try:
        return kinds[kind].spec_model.model_validate(data)  # type: ignore[return-value]
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
        data = anchored_document(data, path.resolve().parent)
    return parse_spec(data, source=str(path))


# Fields holding a location; relative local paths in a spec file are relative to
# the file, so a spec means the same thing from any working directory (and on
# Ray workers, whose working directory is not the driver's).
# Every field of ``models`` and ``data`` is one (kinds add their own names).
_LOCATION_FIELDS = (("input", "manifest"), ("output", "path"), ("options", "rig"))
_LOCATION_SECTIONS = ("models", "data")


def location_fields(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(section, field, value)`` of every location a spec document names."""
    fields = list(_LOCATION_FIELDS)
    for section in _LOCATION_SECTIONS:
        if isinstance(data.get(section), dict):
            fields += [(section, name) for name in data[section]]
    found = []
    for section, field in fields:
        block = data.get(section)
        if isinstance(block, dict) and isinstance(block.get(field), str) and block[field].strip():
            found.append((section, field, block[field].strip()))
    return found


def anchored_document(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The spec document with relative local paths made absolute against ``folder`` (the spec's)."""
    data = dict(data)
    for section, field, value in location_fields(data):
        scheme = urlsplit(value).scheme
        if len(scheme) > 1 or Path(value).is_absolute():
            continue  # URIs (s3://, file://) and absolute paths stand as written
        data[section] = {**data[section], field: os.path.normpath(folder / value)}
    return data


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "spec"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{location}: unknown field"
    if kind == "missing":
        return f"{location}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a check across sections: its message names the fields, the caller the spec
        return message
    given = error.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"{location}: {message} (got {given!r})"
    return f"{location}: {message}"
