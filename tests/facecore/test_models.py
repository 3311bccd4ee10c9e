"""Imitator, parser, checkpoints and training steps, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facecore import weights
from facecore.face.parsing_mask import UNKNOWN
from facecore.models.imitator import Imitator, ImitatorConfig
from facecore.models.parsing import FaceParser, ParsingConfig
from facecore.rig import Renderer, default_schema
from facecore.training.steps import imitator_eval, imitator_step, parser_eval, parser_step


def _renders(count: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    schema, renderer = default_schema(), Renderer()
    samples = schema.sample(np.random.default_rng(seed), count, fixed={"yaw": 0.5, "pitch": 0.5, "roll": 0.5})
    renders = [renderer.render(values, size) for values in samples]
    return {
        "params": torch.from_numpy(np.stack([schema.encode(v) for v in samples])),
        "image": torch.from_numpy(np.stack([r.image for r in renders])).permute(0, 3, 1, 2).float() / 255.0,
        "mask": torch.from_numpy(np.stack([r.mask for r in renders]).astype(np.int64)),
    }


def test_shapes_and_errors():
    dim = default_schema().vector_size
    imitator = Imitator(ImitatorConfig(param_dim=dim, image_size=32, base_channels=8))
    images = imitator(torch.rand(2, dim))
    assert images.shape == (2, 3, 32, 32) and 0.0 <= images.min() and images.max() <= 1.0
    parser = FaceParser(ParsingConfig(base_channels=8, stages=3))
    assert parser(images).shape == (2, 11, 32, 32)
    assert [f.shape[1] for f in parser.features(images)] == [16, 32, 64]
    with pytest.raises(ValueError, match="power of two"):
        ImitatorConfig(param_dim=dim, image_size=48)
    with pytest.raises(ValueError, match=f"\\(B, {dim}\\)"):
        imitator(torch.rand(2, 3))
    with pytest.raises(ValueError, match="multiples of 8"):
        parser(torch.rand(1, 3, 20, 20))


def test_checkpoint_round_trip(tmp_path):
    model = Imitator(ImitatorConfig(param_dim=7, image_size=16, base_channels=4)).eval()
    weights.save_model(model, str(tmp_path / "ckpt"), extra={"epoch": 3})
    loaded = weights.load_model(Imitator, str(tmp_path / "ckpt")).eval()
    assert loaded.config == model.config
    x = torch.rand(2, 7)
    assert torch.equal(model(x), loaded(x))
    assert weights.read_extra(str(tmp_path / "ckpt")) == {"epoch": 3}
    with pytest.raises(weights.CheckpointError, match="holds a Imitator, not a FaceParser"):
        weights.load_model(FaceParser, str(tmp_path / "ckpt"))
    with pytest.raises(weights.CheckpointError, match="config.json is missing"):
        weights.load_model(Imitator, str(tmp_path / "nothing"))


class _Predicts(torch.nn.Module):
    """A parser that answers a fixed label map, whatever the image."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.labels, self.num_classes = labels, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.labels, self.num_classes).permute(0, 3, 1, 2).float()


def test_parser_eval_miou_is_exact():
    # Truth: class 1 in columns 0-1, class 2 in columns 2-3. Guess: class 1 in
    # columns 0-2, class 2 in column 3.
    truth = torch.tensor([[1, 1, 2, 2]] * 4).unsqueeze(0)
    guess = torch.tensor([[1, 1, 1, 2]] * 4).unsqueeze(0)
    images = torch.zeros(1, 3, 4, 4)
    num_classes = 11  # classes absent from the truth are left out of the mean, not counted as 0
    assert parser_eval(_Predicts(truth, num_classes), {"image": images, "mask": truth}, num_classes)["miou"] == 1.0
    # Class 1: 8 / 12 pixels; class 2: 4 / 8.
    partial = parser_eval(_Predicts(guess, num_classes), {"image": images, "mask": truth}, num_classes)["miou"]
    assert partial == pytest.approx((8 / 12 + 4 / 8) / 2)
    # With the disputed column marked unknown, what is left agrees perfectly.
    ignored = truth.clone()
    ignored[..., 2] = UNKNOWN
    assert parser_eval(_Predicts(guess, num_classes), {"image": images, "mask": ignored}, num_classes)["miou"] == 1.0


def test_steps_improve_both_models():
    torch.manual_seed(0)
    train, held_out = _renders(64, 32, 0), _renders(32, 32, 1)
    dim = default_schema().vector_size
    imitator = Imitator(ImitatorConfig(param_dim=dim, image_size=32, base_channels=16))
    parser = FaceParser(ParsingConfig(base_channels=8, stages=3))
    models = {"imitator": imitator, "parser": parser}
    opts = {name: torch.optim.Adam(m.parameters(), lr=3e-3) for name, m in models.items()}
    before_l1 = imitator_eval(imitator, held_out)["l1"]
    before_iou = parser_eval(parser, held_out, 11)["miou"]
    for _ in range(60):
        for start in range(0, 64, 16):
            batch = {k: v[start:start + 16] for k, v in train.items()}
            imitator_step(models, opts, batch)
            parser_step(models, opts, batch)
    after_l1 = imitator_eval(imitator, held_out)["l1"]
    after_iou = parser_eval(parser, held_out, 11)["miou"]
    print(f"imitator L1 {before_l1:.3f} -> {after_l1:.3f}; parser mIoU {before_iou:.3f} -> {after_iou:.3f}")
    assert after_l1 < 0.9 * before_l1  # 64 renders teach the mean face and its layout, not detail
    assert after_iou > before_iou + 0.2
