"""What a job kind declares, and the parts every photo kind shares.

A kind is one module under ``jobs/kinds/`` holding one :class:`JobKind`: its spec
model, its input rows, its stages and its output columns. The pipeline builder
(:mod:`jobs.pipeline`) asks the kind for these and wires the same chain for all:

    input rows -> CPU pool (``cpu_stages``) -> model pool (``model_stage``, if any)
               -> CPU pool (``finish_stages`` + commit) -> Parquet parts

Each stage is a callable class (see :mod:`jobs.stages`) named here with its
constructor arguments, so it is built once per actor, on the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.spec import JobSpec


@dataclass(frozen=True)
class StageSpec:
    """A stage class and its constructor arguments."""

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)


class JobKind:
    """One job kind. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    spec_model: ClassVar[type]
    output_schema: ClassVar[pa.Schema | None] = None
    field_docs: ClassVar[dict[str, str]] = {}
    # False for kinds that do not run as a batch job (train runs with `facejobs train`).
    runnable: ClassVar[bool] = True

    def input_rows(self, spec: JobSpec) -> pa.Table:
        """Every row the job must output: ``key`` and the columns its first stage reads.

        A ``status`` column, when present, marks rows refused at planning
        (``bad_uri``...): they skip every stage and are committed as they are.
        """
        raise NotImplementedError

    def cpu_stages(self, spec: JobSpec) -> list[StageSpec]:
        """Stages before the model (fetch, decode, align), on the CPU pool."""
        raise NotImplementedError

    def model_stage(self, spec: JobSpec) -> StageSpec | None:
        """The model stage, run on the model pool (GPUs when the spec asks); None: no model."""
        return None

    def finish_stages(self, spec: JobSpec) -> list[StageSpec]:
        """CPU work after the model (PNG encoding, rig renders), before the commit."""
        return []

    def schema_metadata(self, spec: JobSpec) -> dict[str, str]:
        """Extra Parquet schema metadata (e.g. the names of a vector's slots)."""
        return {}

    def model_files(self, spec: JobSpec) -> dict[str, str]:
        """Weights the job's results depend on, by name: a local path or URI of each file.

        Their sha256 goes into ``_SUCCESS`` and into the spec fingerprint that
        guards reruns, so a rerun with other weights is a spec change.
        """
        return {}

    def row_bytes(self, spec: JobSpec) -> int:
        """About how many bytes one output row takes, to size parts."""
        return 1024

    def result_options(self, spec: JobSpec) -> dict[str, Any]:
        """The options that decide a row's content (the spec fingerprint's share)."""
        return spec.options.model_dump(mode="json")


# -- photo kinds: a manifest of image uris, fetched and aligned on the CPU pool --

def refuse_bad_uris(rows: pa.Table, allowed_schemes: set[str], allowed_prefixes: list[str]) -> pa.Table:
    """Add ``status``/``error``: ``bad_uri`` for rows that must not be fetched.

    Only the schemes of the storage the spec uses are allowed (a local manifest
    cannot send a worker to ``http://169.254.169.254/`` or an S3 one to
    ``/etc/passwd``), no credentials or user info in a uri, and, when given, only
    uris under ``allowed_prefixes``. Arrow compute, no Python object per row.
    """
    uris = rows.column("uri").combine_chunks()
    # Boolean columns only over all rows (each string copy of 10 M uris is half a
    # gigabyte); the messages are made for the refused rows alone.
    has_scheme = pc.match_substring_regex(uris, _SCHEME)
    allowed = pc.invert(has_scheme) if "" in allowed_schemes else pa.array(np.zeros(len(uris), bool))
    for scheme in allowed_schemes - {""}:
        for spelling in {scheme, "s3a"} if scheme == "s3" else {scheme}:
            allowed = pc.or_(allowed, pc.match_substring_regex(uris, f"^{spelling}://", ignore_case=True))
    userinfo = pc.match_substring_regex(uris, _SCHEME + r"[^/]*@")
    good = pc.and_(allowed, pc.invert(userinfo))
    under = None
    if allowed_prefixes:
        under = pc.starts_with(uris, allowed_prefixes[0])
        for prefix in allowed_prefixes[1:]:
            under = pc.or_(under, pc.starts_with(uris, prefix))
    fine = good if under is None else pc.and_(good, under)
    status = pc.if_else(fine, "ok", "bad_uri").cast(pa.string())
    error = pa.nulls(len(uris), pa.string())
    refused = pc.invert(fine)
    if pc.any(refused).as_py():
        allowed_names = ", ".join(_scheme_names(allowed_schemes))
        messages = []
        for uri, scheme_ok, has_userinfo in zip(uris.filter(refused).to_pylist(), allowed.filter(refused).to_pylist(),
                                                 userinfo.filter(refused).to_pylist()):
            if has_userinfo:
                messages.append("uri carries user info or credentials")
            elif not scheme_ok:
                scheme = uri.split("://", 1)[0].lower() if "://" in uri else "local path"
                messages.append(f"uri scheme '{scheme}' is not allowed for this job (allowed: {allowed_names})")
            else:
                messages.append(f"uri is outside input.allowed_prefixes {allowed_prefixes}")
        error = pc.replace_with_mask(error, refused, pa.array(messages, pa.string()))
    return rows.append_column("status", status).append_column("error", error)


_SCHEME = r"^[A-Za-z][A-Za-z0-9+.\-]*://"


def _scheme_names(schemes: set[str]) -> list[str]:
    return sorted("local path" if s == "" else s for s in schemes)


def storage_schemes(*uris: str) -> set[str]:
    """The schemes a job's own locations use; ``""`` stands for local files."""
    from jobs.storage import scheme_of

    return {"s3" if scheme_of(u) == "s3a" else scheme_of(u) for u in uris}


class PhotoKind(JobKind):
    """A kind whose rows are photos from a manifest, fetched and aligned first."""

    def input_rows(self, spec: JobSpec) -> pa.Table:
        from jobs.manifest import read_manifest

        rows = read_manifest(spec.input.manifest, spec.storage)
        schemes = storage_schemes(spec.input.manifest, spec.output.path)
        return refuse_bad_uris(rows, schemes, spec.input.allowed_prefixes)

    # The stage that decodes, detects and writes each face's row (an AlignStage or a subclass).
    face_stage: ClassVar[type | None] = None

    def cpu_stages(self, spec: JobSpec) -> list[StageSpec]:
        from jobs.stages import AlignStage, FetchStage

        return [
            StageSpec(FetchStage, {"storage": spec.storage, "max_bytes": spec.options.max_bytes,
                                   "threads": spec.resources.fetch_threads}),
            StageSpec(self.face_stage or AlignStage, {"options": spec.options}),
        ]

    def model_files(self, spec: JobSpec) -> dict[str, str]:
        from facecore.face.dlib_models import CNN_DETECTOR, SHAPE_68, model_path

        files = {"dlib_landmarks68": str(model_path(SHAPE_68))}
        if spec.options.detector == "cnn":
            files["dlib_cnn_detector"] = str(model_path(CNN_DETECTOR))
        return files

    def row_bytes(self, spec: JobSpec) -> int:
        # A PNG face crop takes about 1.5 bytes a pixel.
        return int(1.5 * spec.options.size ** 2) + 2048
