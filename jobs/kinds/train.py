"""``kind: train``: train a model with Ray Train (``facejobs train``, not ``run``).

The loop itself is :mod:`jobs.train`; this module is the spec and the registry entry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.kinds.base import JobKind
from jobs.spec import OutputSpec, StorageSpec, StrictModel, check_uri


class TrainData(StrictModel):
    renders: str  # a render job's output folder: (params, image, mask, landmarks) rows
    # An align job's output: the parser learns them with masks drawn from their
    # landmarks; the regressor with the seed's self-supervised losses.
    photos: str | None = None
    validation_fraction: float = Field(0.1, gt=0, lt=1)  # held out, by key hash
    photo_repeat: int = Field(1, ge=1, le=10000)  # times each photo row appears per epoch
    # expression only: the manifest the `photos` align job ran on, with an
    # `identity` column naming each photo's person: photos of one person become
    # source/target pairs (options.photo_pairs) besides self-reconstruction.
    photo_identities: str | None = None

    @field_validator("renders", "photos", "photo_identities")
    @classmethod
    def _data_uri(cls, value: str | None) -> str | None:
        return value if value is None else check_uri(value, "data")


class RegressorLosses(StrictModel):
    """Loss weights of ``model: regressor`` (0 turns one off); see facecore.training.regressor."""

    supervised: float = Field(1.0, ge=0)  # rig renders with known parameters (all poses)
    landmark: float = Field(1.0, ge=0)  # rig landmarks of the prediction vs the aligned landmarks
    content: float = Field(0.5, ge=0)  # F_seg features of G(prediction) vs of the photo
    identity: float = Field(0.1, ge=0)  # dlib ResNet: G(predicted identity, neutral) vs the photo
    prior: float = Field(0.01, ge=0)  # squared distance from the reference face
    cycle: float = Field(0.1, ge=0)  # re-recognising the neutral / reference-identity renders
    mouth: float = Field(0.02, ge=0)  # the neutral render's mouth vs neutral mouths
    cycle_gamma: float = Field(1.0, ge=0)
    mouth_form: Literal["adversarial", "l1"] = "adversarial"
    landmark_noise: float = Field(0.005, ge=0, le=0.1)  # input-landmark noise on renders, fraction of the side
    frontal_imitator: bool = False  # the imitator learned frontal renders only: show it the reference pose


class ExpressionLosses(StrictModel):
    """Loss weights of ``model: expression`` (SPEC.md §1); see facecore.training.expression."""

    gan: float = Field(0.5, ge=0)  # λ_GAN: fooling D_id and D_e
    l1: float = Field(1.0, ge=0)  # λ_c: ||I_t - Î_t||1 against the pair's true second face
    mismatched_negatives: bool = True  # D_e also learns a real face with another's landmarks is a mismatch


class SwapLosses(StrictModel):
    """Loss weights of ``model: swap`` (SPEC.md §2; 0 turns one off); see facecore.training.swap."""

    mse: float = Field(1.0, ge=0)  # L_MSE: reconstructions of both faces
    perceptual: float = Field(1.0, ge=0)  # L_perc: MobileNetV2 features of the reconstructions
    identity: float = Field(1.0, ge=0)  # L_id: 1 - cos of the dlib descriptors of the swap and the source
    attribute: float = Field(1.0, ge=0)  # L_att: MobileNetV2 levels of the swap vs the target
    truth: float = Field(1.0, ge=0)  # ours: L1 to the rig's ground-truth swap


class TrainOptions(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    learning_rate: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: anneal to 0 over the epochs
    image_size: int = Field(64, ge=16, le=512)  # renders are resized to this
    base_channels: int = Field(32, ge=4)
    seed: int = 0
    # regressor only
    photo_batch_size: int = Field(8, ge=1)  # photos per step beside batch_size renders
    photo_every: int = Field(1, ge=1)  # the photo losses every this many steps (they cost more than renders)
    cnn_channels: int = Field(16, ge=0)  # the full-resolution CNN's first width (0: none)
    hidden: int = Field(512, ge=8)
    discriminator_learning_rate: float = Field(2e-4, gt=0)
    losses: RegressorLosses = RegressorLosses()
    # expression only
    residual_blocks: int = Field(4, ge=0)  # G's bottleneck
    stages: int = Field(3, ge=1, le=6)  # G's down-sampling stages (4 at 128 px: a bottleneck of 8x8)
    discriminator_channels: int = Field(32, ge=4)  # D_id's and D_e's first width
    heatmap_mode: Literal["single", "groups", "points"] = "groups"
    heatmap_sigma: float = Field(1.5, gt=0)  # blob size in pixels at 64 px, scaled with image_size
    pretrain_steps: int = Field(100, ge=0)  # D_id and D_e alone on real pairs before the GAN (the seed's pre-training)
    # The warp G corrects: "face" moves the face and fades to still around it;
    # "warp" is the baseline's frame-anchored piecewise-affine warp.
    flow_prior: Literal["face", "warp"] = "face"
    # With data.photo_identities: the share of each step's photos paired with another
    # photo of their person (when they have one); the rest pair with themselves.
    photo_pairs: float = Field(0.5, ge=0, le=1)
    expression_losses: ExpressionLosses = ExpressionLosses()
    # swap only (base_channels is E's and D's width at the finest level)
    latent_dim: int = Field(128, ge=8)  # length of each layer vector
    max_channels: int = Field(128, ge=4)  # the widest (coarsest) level's width
    # The layers a swap takes from the source (0-based); None: LatentConfig's default.
    identity_layers: list[int] | None = None
    swap_losses: SwapLosses = SwapLosses()
    # The validation figure that picks the `best` checkpoint, and which way is better.
    best_metric: str = "validation"
    best_mode: Literal["min", "max"] = "min"


class RegressorModels(StrictModel):
    # The frozen networks the regressor trains against; None: the shipped presets.
    imitator: str | None = None
    parser: str | None = None

    @field_validator("imitator", "parser")
    @classmethod
    def _model_uri(cls, value: str | None) -> str | None:
        return value if value is None else check_uri(value, "model")


class TrainResources(StrictModel):
    num_workers: int = Field(2, ge=1)  # data-parallel workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0)  # None: fit the cluster, leaving CPU for data reads
    max_failures: int = Field(2, ge=0)  # worker failures Ray Train recovers from (restart from the last checkpoint)


class TrainJob(StrictModel):
    """Train a model with Ray Train; checkpoints and the final model go to output.path."""

    kind: Literal["train"]
    model: Literal["imitator", "parser", "regressor", "expression", "swap"]
    data: TrainData
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    models: RegressorModels = RegressorModels()
    options: TrainOptions = TrainOptions()
    resources: TrainResources = TrainResources()

    @model_validator(mode="after")
    def _identities_need_photos(self) -> "TrainJob":
        if self.data.photo_identities is not None and (self.model != "expression" or self.data.photos is None):
            raise ValueError("data.photo_identities: pairs the photos of data.photos for model: expression; "
                             f"this job has model: {self.model} and data.photos: {self.data.photos}")
        return self


class TrainKind(JobKind):
    name = "train"
    spec_model = TrainJob
    runnable = False


KIND = TrainKind()
