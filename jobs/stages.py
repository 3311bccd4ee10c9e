"""Ray Data stages: callable classes, loaded once in ``__init__``.

Each ``__call__`` takes a batch (a pyarrow Table or a dict of columns) and
returns a pyarrow Table. Stages never raise for a bad row: the row leaves with a
``status`` other than "ok" and an ``error`` message, and later stages pass it
through untouched. They raise only for systemic failure (a model that will not
load). Resources are declared by the pipeline builder, not here, and every stage
can be called on a plain dict in a test without Ray.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pyarrow as pa

from facecore.face import DetectorConfig, FaceDetector, FacePolicy, mean_face_reference
from facecore.images import DecodeLimits, ImageError, decode, encode_png
from jobs.output import OutputFolder
from jobs.spec import AlignOptions, PinchOptions, RenderOptions, StorageSpec
from jobs.storage import fsspec_options, locate

if TYPE_CHECKING:  # torch stays out of the import path of CPU-only stages
    from facecore.methods.pinch import PinchConfig

log = logging.getLogger(__name__)

Batch = pa.Table | Mapping[str, Any]

OK = "ok"

# Column metadata written into the Parquet schema, so readers know the layout.
ALIGN_FIELD_DOCS = {
    "box": "detector box [left, top, right, bottom] in source pixels",
    "landmarks": "68 iBUG landmarks in source pixels, flattened x0,y0,x1,y1,...",
    "aligned_landmarks": "the same 68 landmarks in the aligned frame, flattened",
    "matrix": "2x3 affine source->aligned, row-major [a,b,tx,c,d,ty]",
    "aligned": "PNG bytes of the aligned face crop",
    "width": "source width after EXIF orientation",
    "height": "source height after EXIF orientation",
    "face_index": "rank of this face by box area in the source, 0 = largest",
    "face_count": "faces detected in the source",
}

ALIGN_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("face_index", pa.int32()),
        pa.field("face_count", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("box", pa.list_(pa.float32())),
        pa.field("landmarks", pa.list_(pa.float32())),
        pa.field("aligned_landmarks", pa.list_(pa.float32())),
        pa.field("matrix", pa.list_(pa.float64())),
        pa.field("aligned", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)


def columns(batch: Batch) -> dict[str, list]:
    """A batch as a dict of Python lists, whatever form Ray handed over."""
    if isinstance(batch, pa.Table):
        return batch.to_pydict()
    return {name: list(values) for name, values in batch.items()}


def _num_rows(cols: Mapping[str, list]) -> int:
    return len(next(iter(cols.values()))) if cols else 0


class FetchStage:
    """Read each row's object into a ``data`` column; failures become status rows.

    Input columns: ``key``, ``uri``. Output adds ``data`` (bytes or null),
    ``status`` ("ok" or "fetch_error" / "too_large") and ``error``.
    """

    def __init__(self, storage: StorageSpec | None = None, max_bytes: int = 64 * 1024 * 1024,
                 threads: int = 8) -> None:
        self.storage = storage or StorageSpec()
        self.max_bytes = max_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

    def _fetch(self, uri: str) -> tuple[bytes | None, str, str | None]:
        try:
            location = locate(uri, self.storage)
            with location.fs.open(location.path, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except FileNotFoundError:
            return None, "fetch_error", f"object not found: {uri}"
        except IsADirectoryError:
            return None, "fetch_error", f"is a folder, not an object: {uri}"
        except Exception as exc:  # network, permissions, bad bucket: all per-row
            return None, "fetch_error", f"{type(exc).__name__}: {exc}"
        if len(data) > self.max_bytes:
            return None, "too_large", f"file is larger than max_bytes={self.max_bytes}"
        return data, OK, None

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        results = list(self._pool.map(self._fetch, cols["uri"]))
        return pa.table(
            {
                "key": pa.array(cols["key"], pa.string()),
                "uri": pa.array(cols["uri"], pa.string()),
                "data": pa.array([r[0] for r in results], pa.binary()),
                "status": pa.array([r[1] for r in results], pa.string()),
                "error": pa.array([r[2] for r in results], pa.string()),
            }
        )


class AlignStage:
    """Decode, detect, landmark and align; one output row per kept face.

    Input columns: ``key``, ``uri``, ``data``, ``status``, ``error``. Rows whose
    status is not "ok" pass through as one row. A decodable image with no face
    (or no face at the requested index) becomes one ``no_face`` row.
    """

    def __init__(self, options: AlignOptions = AlignOptions()) -> None:
        self.options = options
        self.policy = FacePolicy.parse(options.faces)
        self.limits = DecodeLimits(max_pixels=options.max_pixels, min_side=options.min_side)
        self.detector = FaceDetector(
            DetectorConfig(
                detector=options.detector,
                detect_max_side=options.detect_max_side,
                upsample=options.upsample,
                min_score=options.min_score,
            ),
            reference=mean_face_reference(options.size),
            align_method=options.method,
        )

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        rows: list[dict[str, Any]] = []
        for i in range(_num_rows(cols)):
            key, uri = cols["key"][i], cols["uri"][i]
            if cols["status"][i] != OK:
                rows.append({"key": key, "uri": uri, "status": cols["status"][i], "error": cols["error"][i]})
                continue
            rows.extend(self._align_one(key, uri, cols["data"][i]))
        return pa.Table.from_pylist(rows, schema=ALIGN_SCHEMA)

    def _align_one(self, key: str, uri: str, data: bytes) -> list[dict[str, Any]]:
        base = {"key": key, "uri": uri}
        try:
            image = decode(data, self.limits)
        except ImageError as exc:
            return [{**base, "status": exc.status, "error": str(exc)}]
        size = {"width": image.width, "height": image.height}
        try:
            faces = self.detector(image.rgb)
            kept = self.policy.select(faces)
            if not kept:
                wanted = "" if self.policy.mode != "index" else f" at index {self.policy.index}"
                return [{**base, **size, "status": "no_face", "face_count": len(faces),
                         "error": f"no face{wanted}: {len(faces)} detected"}]
            rows = []
            for face in kept:
                aligned = self.detector.align(image.rgb, face.landmarks)
                rows.append({
                    **base,
                    **size,
                    "status": OK,
                    "error": None,
                    "face_index": faces.index(face),
                    "face_count": len(faces),
                    "score": face.score,
                    "box": face.box.as_list(),
                    "landmarks": face.landmarks.astype(np.float32).ravel().tolist(),
                    "aligned_landmarks": aligned.landmarks.astype(np.float32).ravel().tolist(),
                    "matrix": aligned.matrix.ravel().tolist(),
                    "aligned": encode_png(aligned.image),
                })
            return rows
        except Exception as exc:  # a per-image failure inside dlib/OpenCV
            log.warning("align failed for %s: %s", uri, exc)
            return [{**base, **size, "status": "align_error", "error": f"{type(exc).__name__}: {exc}"}]


COMMIT_SCHEMA = pa.schema([pa.field("part", pa.string()), pa.field("rows", pa.int64()),
                           pa.field("keys", pa.int64())])


class CommitStage:
    """Commit a batch of output rows as one part of the job's output folder.

    Returns one small record per part (its name, row and key counts) instead of
    the rows themselves, so the images never travel through the object store.
    Safe to run twice on the same rows: the part name is a hash of their keys.
    """

    def __init__(self, output_uri: str, storage: StorageSpec | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = OutputFolder(locate(output_uri, storage))
        self.metadata = metadata or {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return COMMIT_SCHEMA.empty_table()
        table = batch.replace_schema_metadata({**(batch.schema.metadata or {}), **self.metadata})
        name = self.folder.commit(table)
        keys = len(set(table.column("key").to_pylist()))
        return pa.table({"part": [name], "rows": [table.num_rows], "keys": [keys]}, schema=COMMIT_SCHEMA)


RENDER_FIELD_DOCS = {
    "params": "flat rig vector; slot names in facejobs.params",
    "image": "PNG bytes of the render",
    "mask": "PNG bytes of the parsing mask, one Helen class index per pixel (facejobs.mask_classes)",
    "landmarks": "68 iBUG landmarks in pixels, flattened x0,y0,x1,y1,...",
    "size": "image side in pixels",
}

RENDER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("params", pa.list_(pa.float32())),
        pa.field("image", pa.binary()),
        pa.field("mask", pa.binary()),
        pa.field("landmarks", pa.list_(pa.float32())),
        pa.field("size", pa.int32()),
    ]
)


class RenderStage:
    """Render rig parameter sets: given vectors, or sampled per row from (seed, index).

    Input columns: ``key``, ``index``, ``params`` (null = sample), ``status``,
    ``error``. Sampling a row depends only on (seed, index), so any sharding of
    the rows, and any retry, renders the same pixels.
    """

    def __init__(self, options: RenderOptions = RenderOptions()) -> None:
        from facecore.rig import Renderer, default_schema, load_schema

        self.options = options
        self.schema = load_schema(options.rig) if options.rig else default_schema()
        self.renderer = Renderer(self.schema)

    def params_for(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.options.seed, index])
        return self.schema.encode(self.schema.sample(rng, 1, self.options.fixed)[0])

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        rows = []
        for i in range(_num_rows(cols)):
            key = cols["key"][i]
            if cols["status"][i] != OK:
                rows.append({"key": key, "status": cols["status"][i], "error": cols["error"][i]})
                continue
            given = cols["params"][i]
            vector = np.asarray(given, np.float32) if given is not None else self.params_for(int(cols["index"][i]))
            try:
                render = self.renderer.render(vector, self.options.size)
            except Exception as exc:  # a parameter set the renderer cannot draw
                rows.append({"key": key, "status": "render_error", "error": f"{type(exc).__name__}: {exc}",
                             "params": vector.tolist()})
                continue
            rows.append({
                "key": key,
                "status": OK,
                "error": None,
                "params": vector.tolist(),
                "image": encode_png(render.image),
                "mask": encode_png(render.mask),
                "landmarks": render.landmarks.ravel().tolist(),
                "size": self.options.size,
            })
        return pa.Table.from_pylist(rows, schema=RENDER_SCHEMA)


PINCH_FIELD_DOCS = {
    **ALIGN_FIELD_DOCS,
    "params": "flat rig vector found by pinch; slot names in facejobs.params",
    "preview": "PNG of the imitator's rendering of params",
    "render": "PNG of the rig renderer's rendering of params",
    "loss_start": "feature L1 at the reference face",
    "loss_end": "feature L1 at the result",
    "iterations": "optimiser steps taken",
}

PINCH_SCHEMA = pa.schema(list(ALIGN_SCHEMA) + [
    pa.field("params", pa.list_(pa.float32())),
    pa.field("preview", pa.binary()),
    pa.field("render", pa.binary()),
    pa.field("loss_start", pa.float32()),
    pa.field("loss_end", pa.float32()),
    pa.field("iterations", pa.int32()),
])


def pinch_config(options: PinchOptions) -> PinchConfig:
    """The optimiser settings of a pinch spec's options."""
    from facecore.methods.pinch import PinchConfig

    return PinchConfig(max_iterations=options.max_iterations, learning_rate=options.learning_rate,
                       patience=options.patience, min_improvement=options.min_improvement,
                       target_loss=options.target_loss, prior_weight=options.prior_weight,
                       try_styles=options.try_styles, hold=tuple(options.hold))


class PinchStage:
    """Pinch every aligned face of a batch at once; rows that failed upstream pass through.

    Loads the imitator and parser once per actor, on the GPU when the actor has
    one (``num_gpus`` from the spec) and on the CPU otherwise.
    """

    def __init__(self, imitator_uri: str | None, parser_uri: str | None, options: PinchOptions | None = None,
                 storage: StorageSpec | None = None, cpu_threads: int | None = None) -> None:
        import torch

        from facecore import weights
        from facecore.models.imitator import Imitator
        from facecore.models.parsing import FaceParser
        from facecore.presets import preset_path
        from facecore.rig import Renderer, default_schema

        imitator_uri = imitator_uri or preset_path("imitator")
        parser_uri = parser_uri or preset_path("parser")
        self.options = options or PinchOptions()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and cpu_threads:
            torch.set_num_threads(min(cpu_threads, os.cpu_count() or 1))
        self.imitator = weights.load_model(Imitator, imitator_uri, self.device,
                                           fsspec_options(storage, imitator_uri)).eval()
        self.parser = weights.load_model(FaceParser, parser_uri, self.device,
                                         fsspec_options(storage, parser_uri)).eval()
        self.schema = default_schema()
        if self.imitator.config.param_dim != self.schema.vector_size:
            raise ValueError(f"models.imitator takes {self.imitator.config.param_dim} parameters; "
                             f"rig {self.schema.name} has {self.schema.vector_size}")
        self.renderer = Renderer(self.schema)
        self.config = pinch_config(self.options)

    def __call__(self, batch: Batch) -> pa.Table:
        import cv2
        import torch

        from facecore.images import decode_png
        from facecore.methods.pinch import pinch

        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(dict(batch), schema=ALIGN_SCHEMA)
        rows = table.to_pylist()
        ready = [i for i, row in enumerate(rows) if row["status"] == OK]
        if ready:
            size = self.imitator.config.image_size
            crops = []
            for i in ready:
                crop = decode_png(rows[i]["aligned"])
                crops.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
                             if crop.shape[0] != size else crop)
            targets = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0).to(self.device)
            try:
                result = pinch(self.imitator, self.parser, targets, self.schema, self.config)
                with torch.no_grad():
                    previews = self.imitator(torch.from_numpy(result.params).to(self.device))
                previews = (previews.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                for j, i in enumerate(ready):
                    rows[i].update(
                        params=result.params[j].tolist(),
                        preview=encode_png(previews[j]),
                        render=encode_png(self.renderer.render(result.params[j], self.options.render_size).image),
                        loss_start=float(result.loss_start[j]),
                        loss_end=float(result.loss_end[j]),
                        iterations=int(result.iterations[j]),
                    )
            except Exception as exc:  # a batch the models cannot take: its rows say so
                log.warning("pinch failed on a batch of %d: %s", len(ready), exc)
                for i in ready:
                    rows[i].update(status="model_error", error=f"{type(exc).__name__}: {exc}")
        return pa.Table.from_pylist(rows, schema=PINCH_SCHEMA)

