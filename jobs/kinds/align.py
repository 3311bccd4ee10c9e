"""``kind: align``: detect, landmark and align every face of every photo."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jobs.kinds.base import PhotoKind
from jobs.spec import AlignOptions, PhotoJob
from jobs.stages import ALIGN_FIELD_DOCS, ALIGN_SCHEMA


class AlignJob(PhotoJob):
    """Detect, landmark and align every face of every image."""

    kind: Literal["align"]
    models: dict[str, str] = Field(default_factory=dict)
    options: AlignOptions = AlignOptions()

    @model_validator(mode="after")
    def _no_models(self) -> "AlignJob":
        if self.models:
            raise ValueError(f"models: align uses dlib's packaged models only, got {sorted(self.models)}")
        return self


class AlignKind(PhotoKind):
    name = "align"
    spec_model = AlignJob
    output_schema = ALIGN_SCHEMA
    field_docs = ALIGN_FIELD_DOCS


KIND = AlignKind()
