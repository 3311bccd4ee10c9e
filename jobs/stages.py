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
import json
import logging
import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from facecore.face import DetectorConfig, FaceDetector, FacePolicy, mean_face_reference
from facecore.images import DecodeLimits, ImageError, decode, encode_png
from jobs.output import SYSTEMIC_STATUSES, OutputFolder
from jobs.spec import AlignOptions, DetectOptions, StorageSpec
from jobs.storage import ObjectNotFound, StorageError, locate, read_object

log = logging.getLogger(__name__)

Batch = pa.Table | Mapping[str, Any]

OK = "ok"

# A column the model pool adds so that the commit can report where the model ran
# (``_SUCCESS`` records devices per pool); the commit drops it from the part.
DEVICE_COLUMN = "_device"

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

    Input columns: ``key``, ``uri``, and optionally ``status``/``error`` from
    planning (rows not "ok" are not fetched and keep them); any other column
    passes through. Output adds ``data``
    (bytes or null), ``status`` ("ok", "fetch_error", "too_large"...) and ``error``.
    """

    def __init__(self, storage: StorageSpec | None = None, max_bytes: int = 64 * 1024 * 1024,
                 threads: int = 8) -> None:
        self.storage = storage or StorageSpec()
        self.max_bytes = max_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

    def _fetch(self, uri: str | None) -> tuple[bytes | None, str, str | None]:
        if uri is None:
            return None, OK, None
        try:
            data = read_object(locate(uri, self.storage), self.max_bytes)
        except StorageError as exc:  # transient failures were retried inside
            reason = "object not found" if isinstance(exc, ObjectNotFound) else exc.reason.replace("_", " ")
            return None, exc.status, f"{reason}: {exc}"
        except Exception as exc:  # anything else about one object stays with its row
            return None, "fetch_error", f"{type(exc).__name__}: {exc}"
        if len(data) > self.max_bytes:
            return None, "too_large", f"file is larger than max_bytes={self.max_bytes}"
        return data, OK, None

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        planned = cols.get("status") or [OK] * _num_rows(cols)
        results = list(self._pool.map(self._fetch, [u if s == OK else None for u, s in zip(cols["uri"], planned)]))
        # Rows refused at planning (bad_uri) keep their status and are not fetched.
        results = [r if s == OK else (None, s, e) for r, s, e in
                   zip(results, planned, cols.get("error") or [None] * len(planned))]
        table = pa.table(
            {
                "key": pa.array(cols["key"], pa.string()),
                "uri": pa.array(cols["uri"], pa.string()),
                "data": pa.array([r[0] for r in results], pa.binary()),
                "status": pa.array([r[1] for r in results], pa.string()),
                "error": pa.array([r[2] for r in results], pa.string()),
            }
        )
        # Other planned columns (a transfer job's zip driver) ride along to the next stage.
        for name in cols.keys() - set(table.column_names):
            table = table.append_column(name, pa.array(cols[name]))
        return table


class AlignStage:
    """Decode, detect, landmark and align; one output row per kept face.

    Input columns: ``key``, ``uri``, ``data``, ``status``, ``error``. Rows whose
    status is not "ok" pass through as one row. A decodable image with no face
    (or no face at the requested index) becomes one ``no_face`` row.
    """

    def __init__(self, options: DetectOptions = AlignOptions()) -> None:
        self.options = options
        self.policy = FacePolicy.parse(options.faces)
        self.limits = DecodeLimits(max_pixels=options.max_pixels, min_side=options.min_side)
        crop = options if isinstance(options, AlignOptions) else AlignOptions()  # detection-only kinds
        self.detector = FaceDetector(
            DetectorConfig(
                detector=options.detector,
                detect_max_side=options.detect_max_side,
                upsample=options.upsample,
                min_score=options.min_score,
            ),
            reference=mean_face_reference(crop.size),
            align_method=crop.method,
        )

    # The output schema; a subclass that writes other per-face columns sets its own.
    schema = ALIGN_SCHEMA

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        rows: list[dict[str, Any]] = []
        for i in range(_num_rows(cols)):
            key, uri = cols["key"][i], cols["uri"][i]
            if cols["status"][i] != OK:
                rows.append({"key": key, "uri": uri, "status": cols["status"][i], "error": cols["error"][i]})
                continue
            rows.extend(self._align_one(key, uri, cols["data"][i]))
        return pa.Table.from_pylist(rows, schema=self.schema)

    @staticmethod
    def detection_columns(face) -> dict[str, Any]:
        """What the detector says of one face: score, box, 68 landmarks."""
        return {"score": face.score, "box": face.box.as_list(),
                "landmarks": face.landmarks.astype(np.float32).ravel().tolist()}

    def face_row(self, rgb: np.ndarray, face) -> dict[str, Any]:
        """The columns of one kept face beyond key, status, size and ranks."""
        aligned = self.detector.align(rgb, face.landmarks)
        return {
            **self.detection_columns(face),
            "aligned_landmarks": aligned.landmarks.astype(np.float32).ravel().tolist(),
            "matrix": aligned.matrix.ravel().tolist(),
            "aligned": encode_png(aligned.image),
        }

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
            return [{**base, **size, "status": OK, "error": None, "face_index": faces.index(face),
                     "face_count": len(faces), **self.face_row(image.rgb, face)} for face in kept]
        except Exception as exc:  # a per-image failure inside dlib/OpenCV
            log.warning("align failed for %s: %s", uri, exc)
            return [{**base, **size, "status": "align_error", "error": f"{type(exc).__name__}: {exc}"}]


COMMIT_SCHEMA = pa.schema([
    pa.field("part", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("keys", pa.int64()),
    pa.field("statuses", pa.string()),  # JSON {status: rows}
    pa.field("systemic", pa.int64()),  # keys whose rows have a systemic status
    pa.field("sample_error", pa.string()),  # the first systemic error of the part
    pa.field("devices", pa.string()),  # JSON list: where the model pool ran these rows
    pa.field("placement", pa.string()),  # JSON {pool: [node ids]}, filled in by the pipeline's Chain
])


class CommitStage:
    """Commit a batch of output rows as one part of the job's output folder.

    Returns one small record per part (its name, row, key and status counts)
    instead of the rows themselves, so the images never travel through the object
    store. Safe to run twice on the same rows: the part name is a hash of their keys.
    """

    def __init__(self, output_uri: str, storage: StorageSpec | None = None,
                 metadata: dict[str, str] | None = None, run_id: str | None = None) -> None:
        self.folder = OutputFolder(locate(output_uri, storage), run_id=run_id)
        self.metadata = metadata or {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return COMMIT_SCHEMA.empty_table()
        devices: list[str] = []
        if DEVICE_COLUMN in batch.column_names:
            devices = sorted({d for d in batch.column(DEVICE_COLUMN).to_pylist() if d})
            batch = batch.drop_columns([DEVICE_COLUMN])
        table = batch.replace_schema_metadata({**(batch.schema.metadata or {}), **self.metadata})
        name = self.folder.commit(table)
        keys = table.column("key").to_pylist()
        statuses = table.column("status").to_pylist()
        errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * len(keys)
        systemic = [(key, error) for key, status, error in zip(keys, statuses, errors) if status in SYSTEMIC_STATUSES]
        sample = next((f"{status}: {error}" for status, error in zip(statuses, errors)
                       if status in SYSTEMIC_STATUSES), None)
        counts: dict[str, int] = {}
        for status in statuses:
            counts[status] = counts.get(status, 0) + 1
        return pa.table({"part": [name], "rows": [table.num_rows], "keys": [len(set(keys))],
                         "statuses": [json.dumps(counts, sort_keys=True)],
                         "systemic": [len({key for key, _ in systemic})], "sample_error": [sample],
                         "devices": [json.dumps(devices)], "placement": ["{}"]}, schema=COMMIT_SCHEMA)


# -- model stages ------------------------------------------------------------

# Errors that say the device itself is unusable, not the batch; see ModelStage.
_CUDA_FATAL = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert")


def exit_process(code: int) -> None:
    """End this worker process at once (no cleanup that could touch the broken device)."""
    os._exit(code)


class ModelFailure(RuntimeError):
    """The model cannot work at all (no device, fails on every batch): the job stops."""


def pick_device(preference: str = "auto", wants_gpu: bool = False):
    """The torch device of a model actor and a label for ``_SUCCESS``.

    Args:
        preference: ``auto`` (CUDA when visible), ``cuda`` (required) or ``cpu``.
        wants_gpu: the spec gave the actor a GPU share; with ``auto`` and no CUDA
            the actor runs on the CPU and says so in its label.

    Raises:
        ModelFailure: ``cuda`` was required and none is visible.
    """
    import torch

    visible = torch.cuda.is_available()
    if preference == "cuda" and not visible:
        raise ModelFailure("resources.device: cuda, but the model actor sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if preference != "cpu" and visible:
        return torch.device("cuda"), f"cuda ({torch.cuda.get_device_name(0)})"
    if wants_gpu and preference == "auto":
        log.warning("resources.num_gpus > 0 but no CUDA device is visible: the model runs on the CPU")
        return torch.device("cpu"), "cpu (fallback: GPUs asked, no CUDA visible)"
    return torch.device("cpu"), "cpu"


class ModelStage:
    """Base of the model stages: batching, retries, and a loud end for a broken model.

    Subclasses load their models in ``__init__`` (after calling this one, which
    picks ``self.device``) and implement :meth:`infer`. A block's rows whose
    status is "ok" go to ``infer`` in sub-batches of ``batch_size``; the others
    pass through. A sub-batch that raises (out of memory, a bad input) is retried
    in halves down to single rows, and only a row that fails alone becomes
    ``model_error``. A CUDA error that breaks the device ends the actor's process,
    so that the block is retried on a fresh actor. A model that fails every row
    of ``failed_blocks_limit`` blocks in a row raises :class:`ModelFailure`,
    which stops the job.

    Attributes:
        output_schema: the schema of the rows this stage returns (without
            :data:`DEVICE_COLUMN`, which is added).
    """

    output_schema: pa.Schema
    failed_blocks_limit = 3

    def __init__(self, batch_size: int = 16, device: str = "auto", wants_gpu: bool = False,
                 cpu_threads: int | None = None) -> None:
        import torch

        self.batch_size = batch_size
        self.device, self.device_label = pick_device(device, wants_gpu)
        if self.device.type == "cpu" and cpu_threads:
            torch.set_num_threads(min(cpu_threads, os.cpu_count() or 1))
        self._failed_blocks = 0
        self._last_error = ""

    def infer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The model's columns for each row (all with status "ok"), in order."""
        raise NotImplementedError

    def __call__(self, batch: Batch) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(dict(batch))
        rows = table.to_pylist()
        ready = [row for row in rows if row["status"] == OK]
        failed = sum(self._run(ready[start:start + self.batch_size])
                     for start in range(0, len(ready), self.batch_size))
        if ready and failed == len(ready):
            self._failed_blocks += 1
            if self._failed_blocks >= self.failed_blocks_limit:
                raise ModelFailure(f"the model failed on every row of {self._failed_blocks} blocks in a row; "
                                   f"last error: {self._last_error}")
        elif ready:
            self._failed_blocks = 0
        schema = self.output_schema.append(pa.field(DEVICE_COLUMN, pa.string()))
        return pa.Table.from_pylist([{**row, DEVICE_COLUMN: self.device_label} for row in rows], schema=schema)

    def _run(self, rows: list[dict[str, Any]]) -> int:
        """Infer ``rows`` in place, halving on failure; returns how many ended as model_error."""
        if not rows:
            return 0
        try:
            updates = self.infer(rows)
        except Exception as exc:  # noqa: BLE001 - any failure of a batch is retried smaller
            self._last_error = f"{type(exc).__name__}: {exc}"
            if any(marker in str(exc) for marker in _CUDA_FATAL):
                # The CUDA context is broken: no later batch in this process can
                # work. End the process: Ray starts a fresh actor and gives it this
                # block again (stages are safe to run twice); after
                # resources.model_restarts fresh actors the job fails.
                log.error("the device failed (%s): restarting this model actor", self._last_error)
                exit_process(1)
            self._release_memory()  # an out-of-memory batch leaves cached blocks behind
            if len(rows) == 1:
                log.warning("model failed on row %s: %s", rows[0].get("key"), self._last_error)
                rows[0].update(status="model_error", error=self._last_error)
                return 1
            half = len(rows) // 2
            log.warning("model failed on a batch of %d (%s); retrying in halves", len(rows), self._last_error)
            return self._run(rows[:half]) + self._run(rows[half:])
        for row, update in zip(rows, updates):
            row.update(update)
        return 0

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
