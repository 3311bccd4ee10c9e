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
    scheme = pc.extract_regex(uris, r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://").field("scheme")
    scheme = pc.fill_null(pc.utf8_lower(scheme), "")
    scheme = pc.if_else(pc.equal(scheme, "s3a"), "s3", scheme)
    allowed = pc.is_in(scheme, value_set=pa.array(sorted(allowed_schemes), pa.string()))
    userinfo = pc.match_substring_regex(uris, r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/]*@")
    good = pc.and_(allowed, pc.invert(userinfo))
    reason = pc.if_else(userinfo, "uri carries user info or credentials",
                        pc.binary_join_element_wise(
                            "uri scheme '", pc.if_else(pc.equal(scheme, ""), "local path", scheme),
                            f"' is not allowed for this job (allowed: {', '.join(_scheme_names(allowed_schemes))})",
                            ""))
    if allowed_prefixes:
        under = pc.starts_with(uris, allowed_prefixes[0])
        for prefix in allowed_prefixes[1:]:
            under = pc.or_(under, pc.starts_with(uris, prefix))
        reason = pc.if_else(good, f"uri is outside input.allowed_prefixes {allowed_prefixes}", reason)
        good = pc.and_(good, under)
    status = pc.if_else(good, "ok", "bad_uri")
    error = pc.if_else(good, pa.scalar(None, pa.string()), reason)
    return rows.append_column("status", status.cast(pa.string())).append_column("error", error.cast(pa.string()))


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

    def cpu_stages(self, spec: JobSpec) -> list[StageSpec]:
        from jobs.stages import AlignStage, FetchStage

        return [
            StageSpec(FetchStage, {"storage": spec.storage, "max_bytes": spec.options.max_bytes,
                                   "threads": spec.resources.fetch_threads}),
            StageSpec(AlignStage, {"options": spec.options}),
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
