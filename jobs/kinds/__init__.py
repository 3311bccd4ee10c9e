"""Job kinds: one module each, registered here.

Adding a kind: write ``jobs/kinds/<name>.py`` with its spec model, stages and a
``KIND`` (a :class:`jobs.kinds.base.JobKind`), then add it to ``_MODULES`` below.
"""

from __future__ import annotations

from jobs.kinds import align, landmarks, pinch, recognize, render, swap, train, transfer
from jobs.kinds.base import JobKind, StageSpec

_MODULES = (align, render, landmarks, pinch, recognize, train, transfer, swap)

KINDS: dict[str, JobKind] = {module.KIND.name: module.KIND for module in _MODULES}

# Spec classes by name, for ``from jobs.spec import AlignJob`` and the like.
SPEC_NAMES: dict[str, type] = {
    "AlignJob": align.AlignJob,
    "RenderJob": render.RenderJob,
    "RenderOptions": render.RenderOptions,
    "RenderInputSpec": render.RenderInputSpec,
    "LandmarksJob": landmarks.LandmarksJob,
    "PinchJob": pinch.PinchJob,
    "PinchOptions": pinch.PinchOptions,
    "PinchModels": pinch.PinchModels,
    "RecognizeJob": recognize.RecognizeJob,
    "RecognizeOptions": recognize.RecognizeOptions,
    "RecognizeModels": recognize.RecognizeModels,
    "TrainJob": train.TrainJob,
    "TrainData": train.TrainData,
    "TrainOptions": train.TrainOptions,
    "TrainResources": train.TrainResources,
    "TransferJob": transfer.TransferJob,
    "TransferOptions": transfer.TransferOptions,
    "TransferTargets": transfer.TransferTargets,
    "TransferModels": transfer.TransferModels,
    "SwapJob": swap.SwapJob,
    "SwapOptions": swap.SwapOptions,
    "SwapInput": swap.SwapInput,
}


def kind_of(spec) -> JobKind:
    """The kind of a parsed spec."""
    return KINDS[spec.kind]


__all__ = ["KINDS", "SPEC_NAMES", "JobKind", "StageSpec", "kind_of"]
