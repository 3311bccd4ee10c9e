"""The shipped models load, fit the rig, and are trained (not merely present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facecore import weights
from facecore.models.imitator import Imitator
from facecore.models.parsing import FaceParser
from facecore.presets import preset_path
from facecore.rig import Renderer, default_schema
from facecore.training.steps import imitator_eval, parser_eval


@pytest.fixture(scope="module")
def renders():
    schema, renderer = default_schema(), Renderer()
    values = schema.sample(np.random.default_rng(2024), 48, fixed={"yaw": 0.5, "pitch": 0.5, "roll": 0.5})
    drawn = [renderer.render(v, 64) for v in values]
    return {
        "params": torch.from_numpy(np.stack([schema.encode(v) for v in values])).float(),
        "image": torch.from_numpy(np.stack([r.image for r in drawn])).permute(0, 3, 1, 2).float() / 255.0,
        "mask": torch.from_numpy(np.stack([r.mask for r in drawn]).astype(np.int64)),
    }


def test_presets_fit_the_rig():
    imitator = weights.load_model(Imitator, preset_path("imitator"))
    assert imitator.config.param_dim == default_schema().vector_size and imitator.config.image_size == 64
    weights.load_model(FaceParser, preset_path("parser"))
    with pytest.raises(ValueError, match="no preset 'gan'"):
        preset_path("gan")


def test_imitator_preset_imitates_the_renderer():
    # What it learned: renders at every pose aligned like photos, 128 px resized to 64.
    import cv2

    from tests.facecore.test_regressor import aligned_renders

    drawn = aligned_renders(48, seed=2024, size=128)
    small = np.stack([cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
                      for image in (drawn["image"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)])
    renders = {"params": drawn["params"], "image": torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255.0}
    imitator = weights.load_model(Imitator, preset_path("imitator")).eval()
    torch.manual_seed(0)
    untrained = Imitator(imitator.config).eval()
    trained_l1, untrained_l1 = imitator_eval(imitator, renders)["l1"], imitator_eval(untrained, renders)["l1"]
    assert trained_l1 < 0.06 and trained_l1 < 0.3 * untrained_l1, (trained_l1, untrained_l1)


def test_parser_preset_parses_renders(renders):
    parser = weights.load_model(FaceParser, preset_path("parser")).eval()
    assert parser_eval(parser, renders, parser.config.num_classes)["miou"] > 0.7
