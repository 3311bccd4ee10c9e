"""``kind: train``: train a model with Ray Train (``facejobs train``, not ``run``).

The loop itself is :mod:`jobs.train`; this module is the spec and the registry entry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from jobs.kinds.base import JobKind
from jobs.spec import OutputSpec, StorageSpec, StrictModel, check_uri


class TrainData(StrictModel):
    renders: str  # a render job's output folder: (params, image, mask) rows
    photos: str | None = None  # parser only: an align job's output; masks come from its landmarks
    validation_fraction: float = Field(0.1, gt=0, lt=1)  # held out, by key hash
    photo_repeat: int = Field(1, ge=1, le=10000)  # times each photo row appears per epoch

    @field_validator("renders", "photos")
    @classmethod
    def _data_uri(cls, value: str | None) -> str | None:
        return value if value is None else check_uri(value, "data")


class TrainOptions(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    learning_rate: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: anneal to 0 over the epochs
    image_size: int = Field(64, ge=16, le=512)  # renders are resized to this
    base_channels: int = Field(32, ge=4)
    seed: int = 0


class TrainResources(StrictModel):
    num_workers: int = Field(2, ge=1)  # data-parallel workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0)  # None: fit the cluster, leaving CPU for data reads


class TrainJob(StrictModel):
    """Train a model with Ray Train; checkpoints and the final model go to output.path."""

    kind: Literal["train"]
    model: Literal["imitator", "parser"]
    data: TrainData
    output: OutputSpec
    storage: StorageSpec = StorageSpec()
    options: TrainOptions = TrainOptions()
    resources: TrainResources = TrainResources()


class TrainKind(JobKind):
    name = "train"
    spec_model = TrainJob
    runnable = False


KIND = TrainKind()
