"""``kind: transfer``: photos re-posed with new expressions (SPEC.md §1), one row per face and target.

CPU pool: fetch, decode, 68-point affine alignment onto the rig's reference face,
then one row per (face, target): ``augment`` draws K expressions from the rig,
``expressions`` names them, ``drivers`` takes each driver photo's.
Model pool: the regressor finds each source's rig vector (and each driver's
expression, once per actor); the target landmarks are the source's own moved
by the expression through the rig's geometry
(:mod:`facecore.methods.expression_transfer`); G makes the result; dlib's
ResNet scores how far it is from the source.
CPU pool again: PNG, dlib's landmarks of the result against the target ones,
the result pasted back into the photo, the commit.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from facecore.images import encode_png
from jobs.kinds.base import PhotoKind, StageSpec
from jobs.kinds.recognize import aligned_faces, load_regressor, model_inputs, model_uri, weights_file
from jobs.kinds.render import rig_metadata
from jobs.spec import AlignOptions, PhotoJob, StorageSpec, StrictModel, check_uri
from jobs.stages import ALIGN_FIELD_DOCS, ALIGN_SCHEMA, DEVICE_COLUMN, OK, AlignStage, Batch, ModelStage, columns

log = logging.getLogger(__name__)

MAX_DRIVERS = 1000  # every model actor fetches, aligns and recognises every driver once
G_CPU_CHUNK = 8  # faces per call of G on a CPU (see TransferStage.infer)


class TransferTargets(StrictModel):
    """Which expressions each face is given: exactly one of the three."""

    augment: int | None = Field(None, ge=1, le=1000)  # K random expressions per face, from the rig
    expressions: list[str] | None = None  # named expressions of the rig (smile, surprise, ...)
    drivers: str | None = None  # a manifest of driver photos; their expressions
    pairing: Literal["zip", "cross"] = "cross"  # drivers: row i with driver i, or every row with every driver

    @field_validator("expressions")
    @classmethod
    def _named_in_rig(cls, value: list[str] | None) -> list[str] | None:
        from facecore.rig import default_schema

        if value is None:
            return value
        if not value:
            raise ValueError("name at least one expression")
        known = default_schema().expressions
        unknown = [label for label in value if label not in known]
        if unknown:
            raise ValueError(f"{unknown} are not expressions of the rig; it has {sorted(known)}")
        if len(set(value)) != len(value):
            raise ValueError(f"names an expression twice: {value}")
        return value

    @field_validator("drivers")
    @classmethod
    def _driver_uri(cls, value: str | None) -> str | None:
        return value if value is None else check_uri(value, "manifest")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TransferTargets":
        given = [name for name in ("augment", "expressions", "drivers") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of augment, expressions, drivers (got {given or 'none'})")
        return self

    @property
    def mode(self) -> str:
        return "augment" if self.augment is not None else "expressions" if self.expressions else "drivers"


class TransferOptions(AlignOptions):
    """Align options (68-point affine onto the rig's reference face, as the models learned) plus the targets."""

    method: Literal["similarity5", "affine68"] = "affine68"
    size: int = Field(128, ge=32, le=2048)  # side of the aligned crop and of the result
    targets: TransferTargets = TransferTargets(augment=4)
    seed: int = 0  # augment's draws depend on (seed, key, face) alone
    paste_back: bool = True  # write `frame`: the photo with the result pasted back
    feather: float = Field(0.04, ge=0, le=0.25)  # blur of the pasted region's edge, fraction of the crop side


class TransferModels(StrictModel):
    # Checkpoint folders (config.json + model.safetensors), any URI; None: the
    # models the project ships (facecore.presets).
    expression: str | None = None
    regressor: str | None = None

    @field_validator("expression", "regressor")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return model_uri(value)


class TransferJob(PhotoJob):
    """Photos → the same faces with other expressions (SPEC.md §1), labelled with the expression given."""

    kind: Literal["transfer"]
    models: TransferModels = TransferModels()
    options: TransferOptions = TransferOptions()


TRANSFER_FIELD_DOCS = {
    **ALIGN_FIELD_DOCS,
    "target": "the target's name: augment:<k>, the named expression, or the driver's key",
    "target_params": "the expression parameters given (the augmented dataset's labels); names in "
                     "facejobs.target_params",
    "target_landmarks": "68 landmarks the result was made for, in pixels of the aligned crop, flattened",
    "result": "PNG of the face with the target expression, the frame and size of aligned",
    "frame": "PNG of the photo with the result pasted back, feathered at the seam (options.paste_back)",
    "id_distance": "dlib face-descriptor distance of result to aligned (same person below 0.6)",
    "landmark_nme": "dlib's landmarks of the result vs target_landmarks, over the eye-corner distance; "
                    "null when dlib finds no face in the result",
}

TRANSFER_SCHEMA = pa.schema(list(ALIGN_SCHEMA) + [
    pa.field("target", pa.string()),
    pa.field("target_params", pa.list_(pa.float32())),
    pa.field("target_landmarks", pa.list_(pa.float32())),
    pa.field("result", pa.binary()),
    pa.field("frame", pa.binary()),
    pa.field("id_distance", pa.float32()),
    pa.field("landmark_nme", pa.float32()),
])

# Columns that travel between the stages and are dropped before the commit.
_PHOTO = "photo"  # the fetched bytes, for the paste-back
_WORK_SCHEMA = TRANSFER_SCHEMA.append(pa.field(_PHOTO, pa.binary())).append(pa.field("result_side", pa.int32()))


def read_drivers(spec: TransferJob) -> pa.Table:
    """The driver manifest's ``key``, ``uri``, and ``status``/``error`` of the uris a worker must not
    fetch (the input's rules: the job's own storage schemes, ``input.allowed_prefixes``); errors name
    ``options.targets.drivers``."""
    from jobs.kinds.base import refuse_bad_uris, storage_schemes
    from jobs.manifest import ManifestError, read_manifest

    manifest = spec.options.targets.drivers
    try:
        drivers = read_manifest(manifest, spec.storage)
    except ManifestError as exc:
        raise ManifestError(str(exc).replace("input.manifest", "options.targets.drivers")) from None
    if drivers.num_rows > MAX_DRIVERS:
        raise ManifestError(f"options.targets.drivers: {drivers.num_rows} drivers; at most {MAX_DRIVERS}")
    schemes = storage_schemes(spec.input.manifest, manifest, spec.output.path)
    return refuse_bad_uris(drivers, schemes, spec.input.allowed_prefixes)


class TransferAlignStage(AlignStage):
    """Align, then one row per (face, target); the photo's bytes ride along for the paste-back.

    Args:
        options: the job's options.
        drivers: with ``targets.drivers``: the driver keys, in manifest order.
    """

    schema = _WORK_SCHEMA

    def __init__(self, options: TransferOptions, drivers: list[str] | None = None) -> None:
        from facecore.methods.expression_transfer import named_expressions
        from facecore.rig import default_schema

        super().__init__(options)
        self.targets = options.targets
        self.keep_photo = options.paste_back
        self.seed = options.seed
        self.drivers = drivers or []
        self.rig = default_schema()
        self.named = (named_expressions(self.rig, self.targets.expressions)
                      if self.targets.mode == "expressions" else None)

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        photos = dict(zip(cols["key"], cols["data"]))
        zip_driver = dict(zip(cols["key"], cols["driver"])) if "driver" in cols else {}
        rows = []
        for face in super().__call__(batch).to_pylist():
            if face["status"] != OK:
                rows.append(face)
                continue
            for target, params in self._targets(face, zip_driver.get(face["key"])):
                rows.append({**face, "target": target, "target_params": params,
                             _PHOTO: photos[face["key"]] if self.keep_photo else None})
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _targets(self, face: dict[str, Any], driver: str | None) -> list[tuple[str, list[float] | None]]:
        """(name, expression or None: the model stage fills in a driver's) per target of one face."""
        from facecore.methods.expression_transfer import drawn_expressions

        if self.targets.mode == "augment":
            drawn = drawn_expressions(self.rig, face["key"], face["face_index"], self.targets.augment, self.seed)
            return [(f"augment:{k}", values.tolist()) for k, values in enumerate(drawn)]
        if self.targets.mode == "expressions":
            return [(label, values.tolist()) for label, values in zip(self.targets.expressions, self.named)]
        return [(driver, None)] if self.targets.pairing == "zip" else [(key, None) for key in self.drivers]


def _driver_expressions(drivers: pa.Table, options: TransferOptions, storage: StorageSpec | None, regressor,
                        device) -> dict[str, tuple[list[float] | None, str | None]]:
    """Each driver's expression parameters, or the reason it has none: key -> (values, error)."""
    import torch

    from facecore.methods.expression_transfer import expression_names
    from facecore.rig import default_schema
    from jobs.stages import FetchStage

    rig = default_schema()
    slots = torch.from_numpy(rig.indices("expression"))
    fetched = FetchStage(storage, options.max_bytes)(drivers)
    aligned = AlignStage(options.model_copy(update={"faces": "largest"}))(fetched).to_pylist()
    found: dict[str, tuple[list[float] | None, str | None]] = {}
    ok = [row for row in aligned if row["status"] == OK]
    for row in aligned:
        if row["status"] != OK:
            found[row["key"]] = (None, f"driver {row['uri']}: {row['status']}: {row['error']}")
    if ok:
        crops, landmarks = aligned_faces(ok)
        images, points = model_inputs(crops, landmarks, regressor.config.image_size, device)
        with torch.inference_mode():
            vectors, _ = regressor.vectors(images, points)
        for row, vector in zip(ok, vectors.float().cpu()):
            found[row["key"]] = (vector[slots].tolist(), None)
    log.info("drivers: %d of %d with an expression (%d parameters each)",
             sum(values is not None for values, _ in found.values()), len(found), len(expression_names(rig)))
    return found


class TransferStage(ModelStage):
    """The regressor, the target landmarks, G and the identity score, ``batch_size`` rows at a time."""

    output_schema = _WORK_SCHEMA

    def __init__(self, expression_uri: str | None, regressor_uri: str | None, options: TransferOptions,
                 drivers: list[dict[str, str]] | None = None, storage: StorageSpec | None = None,
                 batch_size: int = 16, device: str = "auto", wants_gpu: bool = False,
                 cpu_threads: int | None = None) -> None:
        from facecore import weights
        from facecore.models.expression import ExpressionGenerator
        from facecore.models.identity import IdentityScorer
        from facecore.presets import preset_path
        from facecore.rig import default_schema
        from jobs.storage import fsspec_options

        super().__init__(batch_size, device, wants_gpu, cpu_threads)
        self.rig = default_schema()
        self.size = options.size
        self.regressor = load_regressor(regressor_uri, storage, self.device, self.rig)
        uri = expression_uri or preset_path("expression")
        self.generator = weights.load_model(ExpressionGenerator, uri, self.device,
                                            fsspec_options(storage, uri)).eval()
        self.scorer = IdentityScorer(device=self.device)
        self.drivers = (_driver_expressions(pa.Table.from_pylist(drivers), options, storage, self.regressor,
                                            self.device) if drivers else {})

    def infer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        from facecore.methods.expression_transfer import target_landmarks
        from facecore.models.expression import generator_inputs

        updates: list[dict[str, Any]] = [{} for _ in rows]
        expressions = []
        for update, row in zip(updates, rows):
            values, error = ((row["target_params"], None) if row["target_params"] is not None
                             else self.drivers.get(row["target"], (None, f"driver {row['target']}: unknown")))
            if values is None:
                update.update(status="bad_driver", error=error)
            expressions.append(values)
        live = [i for i, values in enumerate(expressions) if values is not None]
        if not live:
            return updates
        crops, landmarks = aligned_faces([rows[i] for i in live])
        with torch.inference_mode():
            images, points = model_inputs(crops, landmarks, self.regressor.config.image_size, self.device)
            vectors, _ = self.regressor.vectors(images, points)
            wanted = torch.tensor([expressions[i] for i in live], dtype=torch.float32)
            targets = target_landmarks(landmarks, vectors, wanted, self.rig, self.size)

            side = self.generator.config.image_size
            sources, source_points = model_inputs(crops, landmarks, side, self.device)
            scale = side / self.size
            inputs = generator_inputs(source_points, torch.from_numpy(targets * scale).to(self.device),
                                      self.generator.config)
            # On a CPU, G's throughput falls past a few faces a call (its 128-px activations
            # leave the cache: 54 faces/s in calls of 32 against 90 in calls of 8).
            chunk = len(sources) if self.device.type == "cuda" else G_CPU_CHUNK
            results = torch.cat([self.generator(sources[s:s + chunk], inputs["source_maps"][s:s + chunk],
                                                inputs["target_maps"][s:s + chunk],
                                                inputs["landmark_flow"][s:s + chunk])[0]
                                 for s in range(0, len(sources), chunk)])
            if side != self.size:
                results = F.interpolate(results, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                        antialias=side > self.size)
            results = (results.clamp(0, 1) * 255).round()
            crops_t = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().to(self.device)
            distance = (self.scorer.embed(crops_t, landmarks) - self.scorer.embed(results, targets)).norm(dim=1)
        pixels = results.byte().permute(0, 2, 3, 1).cpu().numpy()
        for j, i in enumerate(live):
            updates[i].update(target_params=list(expressions[i]), target_landmarks=targets[j].ravel().tolist(),
                              result=pixels[j].tobytes(), result_side=self.size, id_distance=float(distance[j]))
        return updates


class TransferFinishStage:
    """CPU side: the result as PNG, dlib's landmarks of it scored, the paste-back; the ride-along columns dropped."""

    def __init__(self, options: TransferOptions) -> None:
        from facecore.face.detector import DetectorConfig, FaceDetector
        from facecore.images import DecodeLimits

        self.options = options
        self.limits = DecodeLimits(max_pixels=options.max_pixels, min_side=options.min_side)
        # Results are aligned crops: the face fills them, no need to shrink before detecting.
        self.detector = FaceDetector(DetectorConfig(detector="hog", detect_max_side=0, upsample=1, min_score=0.0))

    def __call__(self, batch: Batch) -> pa.Table:
        from facecore.face.transform import paste_back
        from facecore.images import decode
        from facecore.methods.expression_transfer import face_region, landmark_nme

        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(dict(batch))
        rows = table.to_pylist()
        photos: dict[str, np.ndarray | None] = {}
        for row in rows:
            photo, side = row.pop(_PHOTO, None), row.pop("result_side", None)
            if row.get("result") is None or not side:
                continue
            result = np.frombuffer(row["result"], np.uint8).reshape(side, side, 3)
            wanted = np.asarray(row["target_landmarks"], np.float32).reshape(68, 2)
            faces = self.detector(result)
            row["landmark_nme"] = landmark_nme(faces[0].landmarks, wanted) if faces else None
            row["result"] = encode_png(result)
            if photo is not None:
                if row["key"] not in photos:
                    photos[row["key"]] = decode(photo, self.limits).rgb
                source = np.asarray(row["aligned_landmarks"], np.float32).reshape(68, 2)
                region = face_region(source, wanted, side)
                frame = paste_back(photos[row["key"]], result, np.asarray(row["matrix"]),
                                   feather=max(1, round(self.options.feather * side)), region=region)
                row["frame"] = encode_png(frame)
        schema = TRANSFER_SCHEMA
        if DEVICE_COLUMN in table.column_names:
            schema = schema.append(pa.field(DEVICE_COLUMN, pa.string()))
        return pa.Table.from_pylist(rows, schema=schema)


class TransferKind(PhotoKind):
    name = "transfer"
    spec_model = TransferJob
    output_schema = TRANSFER_SCHEMA
    field_docs = TRANSFER_FIELD_DOCS

    def input_rows(self, spec: TransferJob) -> pa.Table:
        from jobs.manifest import ManifestError

        rows = super().input_rows(spec)
        targets = spec.options.targets
        if targets.mode == "drivers" and targets.pairing == "zip":
            drivers = read_drivers(spec)
            if drivers.num_rows != rows.num_rows:
                raise ManifestError(f"options.targets.pairing: zip pairs row i with driver i; the input has "
                                    f"{rows.num_rows} rows and options.targets.drivers {drivers.num_rows}")
            rows = rows.append_column("driver", drivers.column("key"))
        return rows

    def _drivers(self, spec: TransferJob) -> pa.Table | None:
        return read_drivers(spec) if spec.options.targets.mode == "drivers" else None

    def cpu_stages(self, spec: TransferJob) -> list[StageSpec]:
        from jobs.stages import FetchStage

        drivers = self._drivers(spec)
        return [
            StageSpec(FetchStage, {"storage": spec.storage, "max_bytes": spec.options.max_bytes,
                                   "threads": spec.resources.fetch_threads}),
            StageSpec(TransferAlignStage, {"options": spec.options, "drivers": None if drivers is None
                                           else drivers.column("key").to_pylist()}),
        ]

    def model_stage(self, spec: TransferJob) -> StageSpec:
        resources = spec.resources
        drivers = self._drivers(spec)
        return StageSpec(TransferStage, {
            "expression_uri": spec.models.expression, "regressor_uri": spec.models.regressor,
            "options": spec.options, "drivers": None if drivers is None else drivers.to_pylist(),
            "storage": spec.storage, "batch_size": resources.batch_size, "device": resources.device,
            "wants_gpu": resources.num_gpus > 0})

    def finish_stages(self, spec: TransferJob) -> list[StageSpec]:
        return [StageSpec(TransferFinishStage, {"options": spec.options})]

    def schema_metadata(self, spec: TransferJob) -> dict[str, str]:
        from facecore.methods.expression_transfer import expression_names
        from facecore.rig import default_schema

        schema = default_schema()
        return {**rig_metadata(schema), "facejobs.target_params": json.dumps(expression_names(schema))}

    def model_files(self, spec: TransferJob) -> dict[str, str]:
        from facecore.face.dlib_models import RESNET_RECOGNITION, model_path

        return {**super().model_files(spec), "dlib_recognition": str(model_path(RESNET_RECOGNITION)),
                "regressor": weights_file(spec.models.regressor, "regressor"),
                "expression": weights_file(spec.models.expression, "expression")}

    def row_bytes(self, spec: TransferJob) -> int:
        frame = 3 * 1024 * 1024 if spec.options.paste_back else 0  # a PNG photo of a few megapixels
        return 2 * super().row_bytes(spec) + frame + 2048


KIND = TransferKind()
