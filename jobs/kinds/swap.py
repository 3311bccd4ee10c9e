"""``kind: swap``: face swap in latent space (SPEC.md §2), one row per (source, target) pair.

Input: a pair manifest (``source_uri``, ``target_uri``, optional ``key``), or a
manifest of sources and one of targets paired by ``input.pairing`` (zip, cross,
or ``sample:K`` targets per source). The targets may be a ``facejobs render``
output folder: game avatars, whose landmarks the render knows.

CPU pool: fetch both sides, decode, detect and align each with the 68-point
affine (as E learned). A side that fails makes the pair's row say which side
(``failed_side``) and why. Model pool: the regressor finds both faces' rig
vectors, and so the target's landmarks with the source's face shape, the warp
the swap starts from; E encodes both, the source's identity layers and the
target's others are decoded, each pair's decoder copy is tuned
(``options.tune``, :mod:`facecore.methods.latent_swap`), dlib's ResNet scores the
result against both faces. CPU pool again: PNG, dlib's landmarks of the result
against the target's, the result colour-matched and pasted back into the target
photo, the commit.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from facecore.images import decode_png, encode_png
from jobs.kinds.base import PhotoKind, StageSpec, refuse_bad_uris, storage_schemes
from jobs.kinds.recognize import model_uri, weights_file
from jobs.spec import AlignOptions, LimitsSpec, OutputSpec, ResourcesSpec, StorageSpec, StrictModel, check_uri
from jobs.stages import DEVICE_COLUMN, OK, AlignStage, Batch, FetchStage, ModelStage, columns

log = logging.getLogger(__name__)

MAX_RENDER_TARGETS = 100_000  # render targets travel with the plan (a few KB each)
_SAMPLE = re.compile(r"^sample:(\d+)$")


class SwapInput(StrictModel):
    """Pairs: ``manifest`` alone, or ``sources`` and ``targets`` with ``pairing``."""

    manifest: str | None = None  # source_uri, target_uri and optionally key
    sources: str | None = None  # a manifest of source photos (uri, optional key)
    targets: str | None = None  # a manifest of target photos, or a render job's output folder
    pairing: str = "zip"  # zip: row i with row i; cross: every source with every target; sample:K
    seed: int = 0  # sample:K's draws depend on (seed, source key) alone
    allowed_prefixes: list[str] = Field(default_factory=list)  # as input.allowed_prefixes of photo jobs

    @field_validator("manifest", "sources", "targets")
    @classmethod
    def _manifest_uri(cls, value: str | None) -> str | None:
        return value if value is None else check_uri(value, "manifest")

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefix_uris(cls, value: list[str]) -> list[str]:
        return [check_uri(prefix, "allowed_prefixes") for prefix in value]

    @field_validator("pairing")
    @classmethod
    def _pairing(cls, value: str) -> str:
        match = _SAMPLE.match(value)
        if value not in ("zip", "cross") and not (match and int(match.group(1)) >= 1):
            raise ValueError(f"pairing must be zip, cross or sample:K with K >= 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> "SwapInput":
        if self.manifest is not None and (self.sources is not None or self.targets is not None):
            raise ValueError("give either manifest (a pair manifest) or sources and targets, not both")
        if self.manifest is None and (self.sources is None or self.targets is None):
            raise ValueError("give manifest (a pair manifest with source_uri and target_uri) or both sources "
                             "and targets")
        return self

    @property
    def sample(self) -> int | None:
        match = _SAMPLE.match(self.pairing)
        return int(match.group(1)) if match else None


class TuneOptions(StrictModel):
    """Per-pair decoder tuning (facecore.methods.latent_swap.TuneConfig); max_steps 0 turns it off.

    The thresholds are what bench/swap_quality.py measured: untuned, the preset's swaps of two
    photos of one person, and of rig avatars, have L_id 0.03-0.09; of two people, 0.15-0.19; at
    0.05 dlib's nearest person is the source in every photo pair of the bench. L_att of untuned
    swaps is at most 0.6: its threshold only stops a tuning that wanders off the target.
    """

    max_steps: int = Field(30, ge=0, le=10000)
    id_threshold: float = 0.05  # L_id = 1 - cos(dlib(result), dlib(source)) at most this...
    att_threshold: float = Field(0.75, ge=0)  # ...and L_att (MobileNetV2 levels vs the target) at most this
    learning_rate: float = Field(2e-3, gt=0)


class SwapOptions(AlignOptions):
    """Align options (68-point affine, as E learned) plus the swap's."""

    method: Literal["similarity5", "affine68"] = "affine68"
    size: int = Field(128, ge=32, le=2048)  # side of the aligned crops and of the result
    tune: TuneOptions = TuneOptions()
    identity_layers: list[int] | None = None  # None: the model's own
    paste_back: bool = True  # write `frame`: the target photo with the result pasted back
    feather: float = Field(0.04, ge=0, le=0.25)  # blur of the pasted region's edge, fraction of the crop side


class SwapModels(StrictModel):
    swap: str | None = None  # a `model: swap` training output's model folder; None: the shipped preset
    # The regressor whose rig vectors give the source's face shape on the target (the warp the swap
    # starts from); None: the shipped preset.
    regressor: str | None = None

    @field_validator("swap", "regressor")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return model_uri(value)


class SwapJob(StrictModel):
    """Pairs of faces → the source's identity on the target (SPEC.md §2)."""

    kind: Literal["swap"]
    input: SwapInput
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    resources: ResourcesSpec = ResourcesSpec()
    limits: LimitsSpec = LimitsSpec()
    models: SwapModels = SwapModels()
    options: SwapOptions = SwapOptions()


SWAP_FIELD_DOCS = {
    "source_uri": "the photo whose identity is given",
    "target_uri": "the photo (or render: <folder>#<key>) that keeps its pose, expression, lighting, hair, background",
    "failed_side": "source or target: which side of the pair failed (null when ok or both fine)",
    "source_aligned": "PNG of the source's aligned face crop",
    "source_landmarks": "the source's 68 landmarks in source_aligned, flattened",
    "aligned": "PNG of the target's aligned face crop",
    "aligned_landmarks": "the target's 68 landmarks in aligned, flattened",
    "matrix": "2x3 affine target photo -> aligned, row-major",
    "result": "PNG of the swap: the source's identity in the target's frame, the size of aligned",
    "frame": "PNG of the target photo with the result pasted back, colour-matched and feathered",
    "id_distance_source": "dlib descriptor distance of result to the source (same person below 0.6)",
    "id_distance_target": "dlib descriptor distance of result to the target",
    "landmark_nme_target": "dlib's landmarks of the result vs the target's, over the eye-corner distance; null "
                           "when dlib finds no face in the result",
    "tune_steps": "Adam steps of this pair's decoder copy (0: untuned or passed at once)",
    "tune_identity_loss": "the final L_id = 1 - cos of the dlib descriptors of result and source",
    "tune_attribute_loss": "the final L_att: MobileNetV2 levels of result vs target",
}

SWAP_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("source_uri", pa.string()),
    pa.field("target_uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("failed_side", pa.string()),
    pa.field("source_aligned", pa.binary()),
    pa.field("source_landmarks", pa.list_(pa.float32())),
    pa.field("aligned", pa.binary()),
    pa.field("aligned_landmarks", pa.list_(pa.float32())),
    pa.field("matrix", pa.list_(pa.float64())),
    pa.field("result", pa.binary()),
    pa.field("frame", pa.binary()),
    pa.field("id_distance_source", pa.float32()),
    pa.field("id_distance_target", pa.float32()),
    pa.field("landmark_nme_target", pa.float32()),
    pa.field("tune_steps", pa.int32()),
    pa.field("tune_identity_loss", pa.float32()),
    pa.field("tune_attribute_loss", pa.float32()),
])

# Columns that travel between the stages and are dropped before the commit.
_TARGET_PHOTO = "target_photo"  # the target's bytes (photo or render PNG), for the paste-back
_RENDER_LANDMARKS = "render_landmarks"  # a render target's own 68 landmarks (no detection)
_RENDER_PARAMS = "render_params"  # a render target's rig vector (its face shape, known)
_PLAN_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("source_uri", pa.string()),
                          pa.field("target_uri", pa.string()), pa.field(_TARGET_PHOTO, pa.binary()),
                          pa.field(_RENDER_LANDMARKS, pa.list_(pa.float32())),
                          pa.field(_RENDER_PARAMS, pa.list_(pa.float32()))])
_WORK_SCHEMA = (SWAP_SCHEMA.append(pa.field(_TARGET_PHOTO, pa.binary()))
                .append(pa.field(_RENDER_PARAMS, pa.list_(pa.float32())))
                .append(pa.field("result_side", pa.int32())))


# --- planning: the pairs ---------------------------------------------------------


def _read_pair_manifest(uri: str, storage: StorageSpec) -> pa.Table:
    """A pair manifest as (key, source_uri, target_uri); errors name ``input.manifest``."""
    from jobs.manifest import ManifestError, _read_table, duplicate_values, resolve_uris, stable_keys
    from jobs.storage import Location, locate

    location = locate(uri, storage)
    if not location.fs.exists(location.path):
        raise ManifestError(f"input.manifest: {uri} does not exist")
    table = _read_table(location, columns=("key", "source_uri", "target_uri"))
    missing = [name for name in ("source_uri", "target_uri") if name not in table.column_names]
    if missing:
        raise ManifestError(f"input.manifest: {uri} has no {missing} column (columns: {table.column_names})")
    folder = location.path if location.fs.isdir(location.path) else location.path.rsplit("/", 1)[0]
    base = Location(location.fs, folder, location.scheme)
    sides = {}
    for name in ("source_uri", "target_uri"):
        values = pc.utf8_trim_whitespace(table.column(name).cast(pa.string()).combine_chunks())
        empty = pc.fill_null(pc.equal(values, ""), True)
        if pc.any(empty).as_py():
            rows = np.flatnonzero(empty.to_numpy(zero_copy_only=False))[:5].tolist()
            raise ManifestError(f"input.manifest: {uri}: empty {name} in rows {rows}")
        sides[name] = resolve_uris(values, base)
    if "key" in table.column_names:
        keys = table.column("key").cast(pa.string()).combine_chunks()
        if pc.any(pc.fill_null(pc.equal(keys, ""), True)).as_py():
            raise ManifestError(f"input.manifest: {uri}: empty key")
    else:
        keys = stable_keys(pc.binary_join_element_wise(sides["source_uri"], sides["target_uri"], "\n"))
    duplicates = duplicate_values(keys)
    if duplicates:
        raise ManifestError(f"input.manifest: {uri}: duplicate keys {duplicates} (the same pair twice?)")
    return pa.table({"key": keys, **sides})


def is_render_output(uri: str, storage: StorageSpec) -> bool:
    """Whether ``uri`` is a job output folder (render targets) rather than a manifest file."""
    from jobs.output import SUCCESS
    from jobs.storage import locate

    location = locate(uri, storage)
    return location.fs.isdir(location.path) and location.fs.exists(location.join(SUCCESS).path)


def _read_render_targets(uri: str, storage: StorageSpec) -> pa.Table:
    """A render job's ok rows as targets: key, target_uri (<folder>#<key>), the PNG and its landmarks."""
    import pyarrow.parquet as pq

    from jobs.manifest import ManifestError
    from jobs.output import OutputFolder
    from jobs.storage import locate

    location = locate(uri, storage)
    tables = []
    for part in OutputFolder(location).parts():
        with location.arrow_fs.open_input_file(part) as handle:
            table = pq.read_table(handle, columns=["key", "status", "image", "landmarks", "params"])
        tables.append(table.filter(pc.equal(table.column("status"), OK)))
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise ManifestError(f"input.targets: {uri} is a job output with no ok render rows")
    table = pa.concat_tables(tables)
    if table.num_rows > MAX_RENDER_TARGETS:
        raise ManifestError(f"input.targets: {table.num_rows} render targets; at most {MAX_RENDER_TARGETS}")
    keys = table.column("key").combine_chunks()
    return pa.table({"key": keys, "uri": pc.binary_join_element_wise(uri.rstrip("/"), keys, "#"),
                     _TARGET_PHOTO: table.column("image").combine_chunks(),
                     _RENDER_LANDMARKS: table.column("landmarks").combine_chunks(),
                     _RENDER_PARAMS: table.column("params").combine_chunks()})


def _pair_indices(sources: int, targets: int, source_keys: list[str], pairing: str, sample: int | None,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which (source row, target row) pairs the job makes."""
    import zlib

    if pairing == "zip":
        return np.arange(sources), np.arange(sources)
    if pairing == "cross":
        return np.repeat(np.arange(sources), targets), np.tile(np.arange(targets), sources)
    count = min(sample, targets)
    picks = [np.random.default_rng([seed, zlib.crc32(key.encode())]).choice(targets, count, replace=False)
             for key in source_keys]
    return np.repeat(np.arange(sources), count), np.concatenate(picks) if picks else np.zeros(0, np.int64)


def _with_side_checks(pairs: pa.Table, schemes: set[str], prefixes: list[str]) -> pa.Table:
    """``status``/``error``/``failed_side`` from the bad-uri rules applied to each side's uri."""
    status = pa.array([OK] * pairs.num_rows, pa.string())
    error = pa.nulls(pairs.num_rows, pa.string())
    side = pa.nulls(pairs.num_rows, pa.string())
    for name in ("target", "source"):  # the source's failure is the one reported when both fail
        uris = pairs.column(f"{name}_uri")
        checked = refuse_bad_uris(pa.table({"uri": uris}), schemes, prefixes)
        if name == "target" and _TARGET_PHOTO in pairs.column_names:
            rendered = pc.is_valid(pairs.column(_TARGET_PHOTO))
            checked = checked.set_column(1, "status", pc.if_else(rendered, OK, checked.column("status")))
        bad = pc.not_equal(checked.column("status"), OK)
        status = pc.if_else(bad, checked.column("status"), status)
        error = pc.if_else(bad, pc.binary_join_element_wise(f"{name}: ", checked.column("error"), ""), error)
        side = pc.if_else(bad, pa.scalar(name), side)
    return pairs.append_column("status", status).append_column("error", error).append_column("failed_side", side)


def plan_pairs(spec: SwapJob) -> pa.Table:
    """Every pair the job outputs: key, source_uri, target_uri, the render target's bytes and landmarks
    (null for photos), and status/error/failed_side for pairs refused before fetching."""
    from jobs.manifest import ManifestError, read_manifest

    given = spec.input
    if given.manifest is not None:
        pairs = _read_pair_manifest(given.manifest, spec.storage)
        pairs = pairs.append_column(_TARGET_PHOTO, pa.nulls(pairs.num_rows, pa.binary()))
        pairs = pairs.append_column(_RENDER_LANDMARKS, pa.nulls(pairs.num_rows, pa.list_(pa.float32())))
        pairs = pairs.append_column(_RENDER_PARAMS, pa.nulls(pairs.num_rows, pa.list_(pa.float32())))
        schemes = storage_schemes(given.manifest, spec.output.path)
    else:
        try:
            sources = read_manifest(given.sources, spec.storage)
        except ManifestError as exc:
            raise ManifestError(str(exc).replace("input.manifest", "input.sources")) from None
        if is_render_output(given.targets, spec.storage):
            targets = _read_render_targets(given.targets, spec.storage)
        else:
            try:
                targets = read_manifest(given.targets, spec.storage)
            except ManifestError as exc:
                raise ManifestError(str(exc).replace("input.manifest", "input.targets")) from None
            targets = targets.append_column(_TARGET_PHOTO, pa.nulls(targets.num_rows, pa.binary()))
            targets = targets.append_column(_RENDER_LANDMARKS, pa.nulls(targets.num_rows, pa.list_(pa.float32())))
            targets = targets.append_column(_RENDER_PARAMS, pa.nulls(targets.num_rows, pa.list_(pa.float32())))
        if given.pairing == "zip" and sources.num_rows != targets.num_rows:
            raise ManifestError(f"input.pairing: zip pairs row i with row i; input.sources has {sources.num_rows} "
                                f"rows and input.targets {targets.num_rows}")
        source_keys = sources.column("key").to_pylist()
        left, right = _pair_indices(sources.num_rows, targets.num_rows, source_keys, given.pairing, given.sample,
                                    given.seed)
        chosen_sources, chosen_targets = sources.take(left), targets.take(right)
        keys = pc.binary_join_element_wise(chosen_sources.column("key"), chosen_targets.column("key"), "~")
        pairs = pa.table({"key": keys, "source_uri": chosen_sources.column("uri"),
                          "target_uri": chosen_targets.column("uri"),
                          _TARGET_PHOTO: chosen_targets.column(_TARGET_PHOTO),
                          _RENDER_LANDMARKS: chosen_targets.column(_RENDER_LANDMARKS),
                          _RENDER_PARAMS: chosen_targets.column(_RENDER_PARAMS)})
        schemes = storage_schemes(given.sources, given.targets, spec.output.path)
    pairs = pairs.cast(_PLAN_SCHEMA)
    return _with_side_checks(pairs, schemes, given.allowed_prefixes)


# --- stages ------------------------------------------------------------------------


class SwapFetchStage(FetchStage):
    """Both sides' bytes: ``source_data`` and ``target_photo`` (a render target's is already there)."""

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        count = len(cols["key"])
        status, error, side = list(cols["status"]), list(cols["error"]), list(cols["failed_side"])
        wanted = [uri if s == OK else None for uri, s in zip(cols["source_uri"], status)]
        sources = list(self._pool.map(self._fetch, wanted))
        targets_wanted = [uri if s == OK and photo is None else None
                          for uri, s, photo in zip(cols["target_uri"], status, cols[_TARGET_PHOTO])]
        targets = list(self._pool.map(self._fetch, targets_wanted))
        photos = list(cols[_TARGET_PHOTO])
        for i in range(count):
            for name, (data, fetched, reason) in (("source", sources[i]), ("target", targets[i])):
                if status[i] == OK and fetched != OK:
                    status[i], error[i], side[i] = fetched, f"{name}: {reason}", name
            if targets_wanted[i] is not None:
                photos[i] = targets[i][0]
        return pa.table({"key": cols["key"], "source_uri": cols["source_uri"], "target_uri": cols["target_uri"],
                         "status": pa.array(status, pa.string()), "error": pa.array(error, pa.string()),
                         "failed_side": pa.array(side, pa.string()),
                         "source_data": pa.array([s[0] for s in sources], pa.binary()),
                         _TARGET_PHOTO: pa.array(photos, pa.binary()),
                         _RENDER_LANDMARKS: pa.array(cols[_RENDER_LANDMARKS], pa.list_(pa.float32())),
                         _RENDER_PARAMS: pa.array(cols[_RENDER_PARAMS], pa.list_(pa.float32()))})


class SwapAlignStage(AlignStage):
    """Each side's largest face, aligned; a render target is aligned on its own landmarks."""

    def __init__(self, options: SwapOptions) -> None:
        super().__init__(options.model_copy(update={"faces": "largest"}))
        self.keep_photo = options.paste_back

    def _side(self, key: str, uri: str, data: bytes, landmarks: list[float] | None) -> dict[str, Any]:
        if landmarks is None:
            return self._align_one(key, uri, data)[0]
        from facecore.images import ImageError, decode

        try:
            image = decode(data, self.limits)
        except ImageError as exc:
            return {"status": exc.status, "error": str(exc)}
        aligned = self.detector.align(image.rgb, np.asarray(landmarks, np.float64).reshape(68, 2))
        return {"status": OK, "aligned": encode_png(aligned.image), "matrix": aligned.matrix.ravel().tolist(),
                "aligned_landmarks": aligned.landmarks.astype(np.float32).ravel().tolist()}

    def __call__(self, batch: Batch) -> pa.Table:
        cols = columns(batch)
        rows = []
        for i, key in enumerate(cols["key"]):
            row = {name: cols[name][i] for name in ("key", "source_uri", "target_uri", "status", "error",
                                                    "failed_side")}
            if row["status"] == OK:
                source = self._side(key, row["source_uri"], cols["source_data"][i], None)
                target = self._side(key, row["target_uri"], cols[_TARGET_PHOTO][i], cols[_RENDER_LANDMARKS][i])
                for name, face in (("source", source), ("target", target)):
                    if row["status"] == OK and face["status"] != OK:
                        row.update(status=face["status"], error=f"{name}: {face['error']}", failed_side=name)
                if row["status"] == OK:
                    row.update(source_aligned=source["aligned"], source_landmarks=source["aligned_landmarks"],
                               aligned=target["aligned"], aligned_landmarks=target["aligned_landmarks"],
                               matrix=target["matrix"],
                               **{_TARGET_PHOTO: cols[_TARGET_PHOTO][i] if self.keep_photo else None,
                                  _RENDER_PARAMS: cols[_RENDER_PARAMS][i]})
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=_WORK_SCHEMA)


def load_swapper(uri: str | None, storage: StorageSpec | None, device):
    """The swap model at ``uri`` (None: the shipped preset), in eval mode."""
    from facecore import weights
    from facecore.models.latent import LatentSwapper
    from facecore.presets import preset_path
    from jobs.storage import fsspec_options

    uri = uri or preset_path("swap")
    return weights.load_model(LatentSwapper, uri, device, fsspec_options(storage, uri)).eval()


class SwapStage(ModelStage):
    """E, the mix, D with per-pair tuning, and the identity distances, ``batch_size`` pairs at a time."""

    output_schema = _WORK_SCHEMA

    def __init__(self, swap_uri: str | None, options: SwapOptions, storage: StorageSpec | None = None,
                 batch_size: int = 16, device: str = "auto", wants_gpu: bool = False,
                 cpu_threads: int | None = None, regressor_uri: str | None = None) -> None:
        from facecore.methods.latent_swap import TuneConfig
        from facecore.models.identity import IdentityScorer
        from facecore.models.mobilenet import MobileNetV2Features
        from facecore.training.swap import SwapCritics

        from facecore.rig import default_schema
        from jobs.kinds.recognize import load_regressor

        super().__init__(batch_size, device, wants_gpu, cpu_threads)
        self.size = options.size
        self.swapper = load_swapper(swap_uri, storage, self.device)
        self.rig = default_schema()
        self.regressor = load_regressor(regressor_uri, storage, self.device, self.rig)
        self.scorer = IdentityScorer(device=self.device)
        self.critics = SwapCritics(MobileNetV2Features.pretrained().to(self.device), self.scorer)
        self.tune = TuneConfig(**options.tune.model_dump())
        self.identity_layers = None if options.identity_layers is None else tuple(options.identity_layers)
        if self.identity_layers is not None:
            bad = [k for k in self.identity_layers if not 0 <= k < self.swapper.config.num_layers]
            if bad:
                raise ValueError(f"options.identity_layers: {bad} are not layers of the model "
                                 f"(it has {self.swapper.config.num_layers})")

    def infer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        from facecore.methods.latent_swap import regressed_guides, swap_faces
        from jobs.kinds.recognize import model_inputs

        side = self.swapper.config.image_size
        crops = {name: [decode_png(row[column]) for row in rows]
                 for name, column in (("source", "source_aligned"), ("target", "aligned"))}
        points = {name: np.array([row[column] for row in rows], np.float32).reshape(len(rows), 68, 2)
                  for name, column in (("source", "source_landmarks"), ("target", "aligned_landmarks"))}
        sources, source_points = model_inputs(crops["source"], points["source"], side, self.device)
        targets, target_points = model_inputs(crops["target"], points["target"], side, self.device)
        rendered = [row.get(_RENDER_PARAMS) for row in rows]
        prior, source_layer = regressed_guides(self.regressor, self.rig, sources, source_points, targets,
                                               target_points, rendered)
        result = swap_faces(self.swapper, sources, source_points, targets, target_points, self.critics, self.tune,
                            self.identity_layers, prior, source_layer,
                            torch.tensor([vector is not None for vector in rendered]))
        with torch.inference_mode():
            images = result.images
            if side != self.size:
                images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                       antialias=side > self.size)
            images = (images.clamp(0, 1) * 255).round()
            embedded = self.scorer.embed(images, points["target"])
            distances = {}
            for name in ("source", "target"):
                crops_t = torch.from_numpy(np.stack(crops[name])).permute(0, 3, 1, 2).float().to(self.device)
                distances[name] = (self.scorer.embed(crops_t, points[name]) - embedded).norm(dim=1).cpu().numpy()
        pixels = images.byte().permute(0, 2, 3, 1).cpu().numpy()
        return [{"result": pixels[i].tobytes(), "result_side": self.size,
                 "id_distance_source": float(distances["source"][i]),
                 "id_distance_target": float(distances["target"][i]), "tune_steps": int(result.tune_steps[i]),
                 "tune_identity_loss": float(result.identity_loss[i]),
                 "tune_attribute_loss": float(result.attribute_loss[i])} for i in range(len(rows))]


class SwapFinishStage:
    """CPU side: the result as PNG, dlib's landmarks of it scored, the paste-back; ride-along columns dropped."""

    def __init__(self, options: SwapOptions) -> None:
        from facecore.face.detector import DetectorConfig, FaceDetector
        from facecore.images import DecodeLimits

        self.options = options
        self.limits = DecodeLimits(max_pixels=options.max_pixels, min_side=options.min_side)
        # Results are aligned crops: the face fills them, no need to shrink before detecting.
        self.detector = FaceDetector(DetectorConfig(detector="hog", detect_max_side=0, upsample=1, min_score=0.0))

    def __call__(self, batch: Batch) -> pa.Table:
        from facecore.face.transform import paste_back
        from facecore.images import decode
        from facecore.methods.expression_transfer import landmark_nme
        from facecore.methods.landmark_swap import face_mask, match_colours

        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(dict(batch))
        rows = table.to_pylist()
        for row in rows:
            photo, side = row.pop(_TARGET_PHOTO, None), row.pop("result_side", None)
            row.pop(_RENDER_PARAMS, None)
            if row.get("result") is None or not side:
                continue
            result = np.frombuffer(row["result"], np.uint8).reshape(side, side, 3)
            wanted = np.asarray(row["aligned_landmarks"], np.float32).reshape(68, 2)
            faces = self.detector(result)
            row["landmark_nme_target"] = landmark_nme(faces[0].landmarks, wanted) if faces else None
            row["result"] = encode_png(result)
            if photo is not None:
                target = decode_png(row["aligned"])
                mask = face_mask(wanted, side, side)
                matched = match_colours(result, target, mask)
                frame = paste_back(decode(photo, self.limits).rgb, matched, np.asarray(row["matrix"]),
                                   feather=max(1, round(self.options.feather * side)), region=mask / 255.0)
                row["frame"] = encode_png(frame)
        schema = SWAP_SCHEMA
        if DEVICE_COLUMN in table.column_names:
            schema = schema.append(pa.field(DEVICE_COLUMN, pa.string()))
        return pa.Table.from_pylist(rows, schema=schema)


class SwapKind(PhotoKind):
    name = "swap"
    spec_model = SwapJob
    output_schema = SWAP_SCHEMA
    field_docs = SWAP_FIELD_DOCS

    def input_rows(self, spec: SwapJob) -> pa.Table:
        return plan_pairs(spec)

    def cpu_stages(self, spec: SwapJob) -> list[StageSpec]:
        return [
            StageSpec(SwapFetchStage, {"storage": spec.storage, "max_bytes": spec.options.max_bytes,
                                       "threads": spec.resources.fetch_threads}),
            StageSpec(SwapAlignStage, {"options": spec.options}),
        ]

    def model_stage(self, spec: SwapJob) -> StageSpec:
        resources = spec.resources
        return StageSpec(SwapStage, {"swap_uri": spec.models.swap, "regressor_uri": spec.models.regressor,
                                     "options": spec.options, "storage": spec.storage,
                                     "batch_size": resources.batch_size, "device": resources.device,
                                     "wants_gpu": resources.num_gpus > 0})

    def finish_stages(self, spec: SwapJob) -> list[StageSpec]:
        return [StageSpec(SwapFinishStage, {"options": spec.options})]

    def model_files(self, spec: SwapJob) -> dict[str, str]:
        from facecore.face.dlib_models import RESNET_RECOGNITION, model_path
        from facecore.models.mobilenet import weights_path

        return {**super().model_files(spec), "dlib_recognition": str(model_path(RESNET_RECOGNITION)),
                "mobilenet_v2": str(weights_path()), "swap": weights_file(spec.models.swap, "swap"),
                "regressor": weights_file(spec.models.regressor, "regressor")}

    def row_bytes(self, spec: SwapJob) -> int:
        frame = 3 * 1024 * 1024 if spec.options.paste_back else 0  # a PNG photo of a few megapixels
        return 3 * int(1.5 * spec.options.size ** 2) + frame + 4096


KIND = SwapKind()
