"""``kind: render``: draw avatars from sampled or given rig parameters.

No photos and no model: the CPU pool renders each block and commits it. Row i of
a sampled job is drawn from (seed, i) alone, so any sharding or retry renders the
same pixels.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator

from facecore.images import encode_png
from jobs.kinds.base import JobKind, StageSpec
from jobs.spec import LimitsSpec, OutputSpec, ResourcesSpec, StorageSpec, StrictModel, check_uri
from jobs.stages import OK, Batch, _num_rows, columns


class RenderOptions(StrictModel):
    count: int = Field(1000, ge=1)  # renders to sample (ignored with an input manifest)
    size: int = Field(256, ge=16, le=1024)  # image side in pixels
    seed: int = Field(0, ge=0)  # sampling seed: row i is drawn from (seed, i)
    rig: str | None = None  # rig schema YAML; default: the built-in rig
    fixed: dict[str, float | str] = Field(default_factory=dict)  # hold parameters at a value
    # "affine68": each render (image, mask, landmarks) is warped onto the rig's
    # reference face by a 68-point affine fit on its own landmarks, as photos are
    # aligned for pinch and recognize: training data that looks like their inputs
    # at every pose.
    align: Literal["none", "affine68"] = "none"
    # "expression": each row is a pair of one identity (facecore.rig.pairs): the
    # render above and a `target_*` render with the expression drawn afresh and
    # the pose moved by up to ±pose_jitter; expression transfer's training data.
    # "swap": each row is two people, the render above (the source) and a `target_*`
    # render, and the swap's ground truth `truth_*`: the target drawn with the
    # source's identity parameters (facecore.rig.pairs.swap_pairs); face swap's
    # training data. With align, source and target are each aligned on their own
    # landmarks and the truth through the target's transform (a swap's result
    # shares its target's crop).
    pairs: Literal["none", "expression", "swap"] = "none"
    pose_jitter: float = Field(0.05, ge=0.0, le=1.0)
    # pairs: expression: the share of pairs whose pose does not move at all, as a
    # transfer job's targets keep their source's pose.
    pose_still: float = Field(0.0, ge=0.0, le=1.0)
    # With align: where a pair's target is aligned. "source": through the source's
    # transform, so both share one frame, as a transfer job's result shares the
    # source's aligned crop (what G is trained and judged on). "target": by a fit on
    # its own landmarks, as two photos of one person are each aligned; the frame
    # then changes with the expression (an open jaw shrinks the whole crop).
    pair_frame: Literal["source", "target"] = "source"

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


class RenderInputSpec(StrictModel):
    # Optional: a table of parameter sets, one column per parameter name (discrete
    # groups as their choice), or one `params` column holding flat vectors.
    manifest: str

    @field_validator("manifest")
    @classmethod
    def _manifest_uri(cls, value: str) -> str:
        return check_uri(value, "manifest")


class RenderJob(StrictModel):
    """Render avatars from sampled or given rig parameters."""

    kind: Literal["render"]
    input: RenderInputSpec | None = None
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    options: RenderOptions = RenderOptions()
    resources: ResourcesSpec = ResourcesSpec()
    limits: LimitsSpec = LimitsSpec()

    @model_validator(mode="after")
    def _pairs_are_sampled(self) -> "RenderJob":
        if self.options.pairs != "none" and self.input is not None:
            raise ValueError("options.pairs draws each pair from the seed; it cannot be used with an input manifest")
        return self


RENDER_FIELD_DOCS = {
    "params": "flat rig vector; slot names in facejobs.params",
    "image": "PNG bytes of the render",
    "mask": "PNG bytes of the parsing mask, one Helen class index per pixel (facejobs.mask_classes)",
    "landmarks": "68 iBUG landmarks in pixels, flattened x0,y0,x1,y1,...",
    "size": "image side in pixels",
    "target_params": "options.pairs only: the pair's second face, the same person with another expression",
    "target_image": "options.pairs only: PNG of the second face's render",
    "target_landmarks": "options.pairs only: the second face's 68 landmarks, flattened x0,y0,x1,y1,...",
    "truth_params": "options.pairs: swap only: the swap's ground truth, the target with the source's identity",
    "truth_image": "options.pairs: swap only: PNG of the ground truth's render, in the target's frame",
    "truth_landmarks": "options.pairs: swap only: the ground truth's 68 landmarks, flattened x0,y0,x1,y1,...",
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


RENDER_PAIR_SCHEMA = pa.schema(list(RENDER_SCHEMA) + [
    pa.field("target_params", pa.list_(pa.float32())),
    pa.field("target_image", pa.binary()),
    pa.field("target_landmarks", pa.list_(pa.float32())),
])

RENDER_SWAP_SCHEMA = pa.schema(list(RENDER_PAIR_SCHEMA) + [
    pa.field("truth_params", pa.list_(pa.float32())),
    pa.field("truth_image", pa.binary()),
    pa.field("truth_landmarks", pa.list_(pa.float32())),
])


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
        self._reference = None

    def _alignment(self, landmarks: np.ndarray) -> np.ndarray:
        """The 2x3 affine taking a render onto the reference face by a fit on its 68 landmarks."""
        from facecore.face.detector import alignment_matrix
        from facecore.rig import reference_face

        if self._reference is None:
            self._reference = reference_face(self.options.size)
        return alignment_matrix(landmarks, self._reference, "affine68")

    def _aligned(self, image: np.ndarray, mask: np.ndarray, landmarks: np.ndarray, matrix: np.ndarray):
        import cv2

        from facecore.face import transform

        size = self.options.size
        # The rig's background is flat: replicating its edge fills what the warp uncovers.
        image = transform.warp(image, matrix, size, border=cv2.BORDER_REPLICATE)
        mask = cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
        return image, mask, transform.apply(matrix, landmarks)

    def params_for(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.options.seed, index])
        return self.schema.encode(self.schema.sample(rng, 1, self.options.fixed)[0])

    def pair_for(self, index: int) -> tuple[np.ndarray, ...]:
        """Row ``index``'s (source, target) vectors, and for ``pairs: swap`` the truth's, drawn from
        (seed, index) alone."""
        from facecore.rig.pairs import expression_pairs, swap_pairs

        rng = np.random.default_rng([self.options.seed, index])
        if self.options.pairs == "swap":
            drawn = swap_pairs(self.schema, rng, 1, self.options.fixed)
        else:
            drawn = expression_pairs(self.schema, rng, 1, self.options.pose_jitter, self.options.fixed,
                                     self.options.pose_still)
        return tuple(self.schema.encode(values) for (values,) in drawn)

    def _draw(self, vector: np.ndarray, matrix: np.ndarray | None = None):
        """(image, mask, landmarks, alignment) of one render; with ``align``, warped by ``matrix`` when
        given, else by a fit on its own landmarks (the alignment is None without ``align``)."""
        render = self.renderer.render(vector, self.options.size)
        image, mask, landmarks = render.image, render.mask, render.landmarks
        if self.options.align == "affine68":
            matrix = self._alignment(landmarks) if matrix is None else matrix
            image, mask, landmarks = self._aligned(image, mask, landmarks, matrix)
        return image, mask, landmarks, matrix

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        rows = []
        for i in range(_num_rows(cols)):
            key = cols["key"][i]
            if cols["status"][i] != OK:
                rows.append({"key": key, "status": cols["status"][i], "error": cols["error"][i]})
                continue
            given = cols["params"][i]
            target = truth = drawn_target = drawn_truth = None
            if given is not None:
                vector = np.asarray(given, np.float32)
            elif self.options.pairs == "expression":
                vector, target = self.pair_for(int(cols["index"][i]))
            elif self.options.pairs == "swap":
                vector, target, truth = self.pair_for(int(cols["index"][i]))
            else:
                vector = self.params_for(int(cols["index"][i]))
            try:
                image, mask, landmarks, alignment = self._draw(vector)
                if truth is not None:  # two people: each aligned on its own, the truth in the target's frame
                    drawn_target = self._draw(target)
                    drawn_truth = self._draw(truth, drawn_target[3])
                elif target is not None:
                    drawn_target = self._draw(target, alignment if self.options.pair_frame == "source" else None)
            except Exception as exc:  # a parameter set the renderer cannot draw
                rows.append({"key": key, "status": "render_error", "error": f"{type(exc).__name__}: {exc}",
                             "params": vector.tolist()})
                continue
            row = {
                "key": key,
                "status": OK,
                "error": None,
                "params": vector.tolist(),
                "image": encode_png(image),
                "mask": encode_png(mask),
                "landmarks": np.asarray(landmarks).ravel().tolist(),
                "size": self.options.size,
            }
            for prefix, vector_of, drawn in (("target_", target, drawn_target), ("truth_", truth, drawn_truth)):
                if drawn is not None:
                    row.update({f"{prefix}params": vector_of.tolist(), f"{prefix}image": encode_png(drawn[0]),
                                f"{prefix}landmarks": np.asarray(drawn[2]).ravel().tolist()})
            rows.append(row)
        schema = {"none": RENDER_SCHEMA, "expression": RENDER_PAIR_SCHEMA, "swap": RENDER_SWAP_SCHEMA}
        return pa.Table.from_pylist(rows, schema=schema[self.options.pairs])



def rig_schema(spec: RenderJob):
    """The rig a render job draws: its ``options.rig`` file or the built-in one."""
    from facecore.rig import default_schema, load_schema

    return load_schema(spec.options.rig) if spec.options.rig else default_schema()


def rig_metadata(schema) -> dict[str, str]:
    """The names of the ``params`` slots and the whole rig, for outputs holding rig vectors."""
    return {"facejobs.params": json.dumps(list(schema.vector_names)), "facejobs.rig": json.dumps(schema.to_dict())}


class RenderKind(JobKind):
    name = "render"
    spec_model = RenderJob
    # Every column a render job can write; target_* only with options.pairs, truth_* with pairs: swap.
    output_schema = RENDER_SWAP_SCHEMA
    field_docs = RENDER_FIELD_DOCS

    def input_rows(self, spec: RenderJob) -> pa.Table:
        from jobs.manifest import read_param_manifest, sampled_render_rows

        if spec.input is not None:
            return read_param_manifest(spec.input.manifest, rig_schema(spec), spec.storage)
        return sampled_render_rows(spec.options.count, spec.options.seed)

    def cpu_stages(self, spec: RenderJob) -> list[StageSpec]:
        return [StageSpec(RenderStage, {"options": spec.options})]

    def schema_metadata(self, spec: RenderJob) -> dict[str, str]:
        from facecore.rig import HELEN_CLASSES

        return {**rig_metadata(rig_schema(spec)), "facejobs.mask_classes": json.dumps(list(HELEN_CLASSES))}

    def result_options(self, spec: RenderJob) -> dict:
        # How many renders a job samples does not change any one of them.
        return spec.options.model_dump(mode="json", exclude={"count"})

    def row_bytes(self, spec: RenderJob) -> int:
        return int(2.0 * spec.options.size ** 2) + 2048  # image and mask PNGs


KIND = RenderKind()
