"""Ray Train: two-worker DDP training runs, checkpoints, and resumes."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from facecore import weights
from facecore.models.imitator import Imitator
from facecore.models.parsing import FaceParser
from facecore.training.steps import imitator_eval, parser_eval
from jobs.pipeline import run
from jobs.spec import parse_spec
from jobs.train import MODEL_DIR, RUNS_DIR, _to_tensors, photo_rows, train

pytestmark = pytest.mark.ray


def _checkpoints(output: Path) -> list[Path]:
    return sorted(p for p in (output / RUNS_DIR / "train-imitator").glob("checkpoint_*") if p.is_dir())


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / MODEL_DIR / weights.WEIGHTS))


def _optimiser_steps(checkpoint: Path) -> int:
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return int(state[0]["step"])


def test_two_worker_training_improves_and_resumes(ray_cluster, tmp_path):
    renders = run(parse_spec({
        "kind": "render", "output": {"path": str(tmp_path / "renders")},
        "options": {"count": 160, "size": 32, "seed": 0, "fixed": {"yaw": 0.5, "pitch": 0.5, "roll": 0.5}},
    }), progress=False)
    assert renders.ok_rows == 160
    spec = {"kind": "train", "model": "imitator", "data": {"renders": str(tmp_path / "renders")},
            "output": {"path": str(tmp_path / "imitator")},
            "options": {"epochs": 3, "batch_size": 8, "image_size": 32, "base_channels": 16, "learning_rate": 5e-3,
                        "schedule": "cosine"},
            "resources": {"num_workers": 2}}
    first = train(parse_spec(spec))
    assert first["metrics"]["epoch"] == 2
    assert len(_checkpoints(tmp_path / "imitator")) == 3
    model = weights.load_model(Imitator, str(tmp_path / "imitator" / MODEL_DIR))

    # Trained beats untrained on renders it never saw.
    from tests.facecore.test_models import _renders

    held_out = _renders(32, 32, seed=99)
    untrained = Imitator(model.config)
    trained_l1, untrained_l1 = imitator_eval(model, held_out)["l1"], imitator_eval(untrained, held_out)["l1"]
    print(f"held-out L1: untrained {untrained_l1:.4f}, trained {trained_l1:.4f}")
    assert trained_l1 < 0.95 * untrained_l1

    first_checkpoints = _checkpoints(tmp_path / "imitator")
    resume_point = _weights(first_checkpoints[-1])
    torch.manual_seed(0)  # the run's seed: the weights its first epoch started from
    fresh = Imitator(model.config).state_dict()
    assert max(float((fresh[name] - value).abs().max()) for name, value in resume_point.items()) > 1e-2

    # One more epoch at a vanishing learning rate (the cosine schedule takes it
    # from the spec): a run that resumed keeps the checkpoint's weights, one that
    # silently restarted would keep its fresh initialisation.
    spec["options"]["epochs"] = 4
    spec["options"]["learning_rate"] = 1e-12
    second = train(parse_spec(spec))
    assert second["metrics"]["epoch"] == 3  # one more epoch, not four from scratch
    checkpoints = _checkpoints(tmp_path / "imitator")
    assert len(checkpoints) == 4
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["epoch"] == 3
    resumed = _weights(checkpoints[-1])
    assert resumed.keys() == resume_point.keys()
    for name, value in resume_point.items():
        assert torch.allclose(resumed[name], value, rtol=0.0, atol=1e-9), name
    first_state = json.loads((first_checkpoints[-1] / "state.json").read_text())
    assert state["validation"] == pytest.approx(first_state["validation"], rel=1e-5)
    # The optimiser was restored too: its step count goes on from the checkpoint's.
    steps_per_epoch = _optimiser_steps(first_checkpoints[0])
    assert steps_per_epoch > 0
    assert _optimiser_steps(checkpoints[-1]) == _optimiser_steps(first_checkpoints[-1]) + steps_per_epoch

    finished = train(parse_spec(spec))  # a rerun of a finished job exports, trains nothing
    assert finished["metrics"]["epoch"] == 3 and len(_checkpoints(tmp_path / "imitator")) == 4


def test_parser_trains_on_renders_and_landmark_masked_photos(ray_cluster, photos, tmp_path):
    from jobs.manifest import write_manifest

    run(parse_spec({"kind": "render", "output": {"path": str(tmp_path / "renders")},
                    "options": {"count": 48, "size": 32, "seed": 1}}), progress=False)
    write_manifest([str(p) for p in photos.values()], str(tmp_path / "m.parquet"))
    run(parse_spec({"kind": "align", "input": {"manifest": str(tmp_path / "m.parquet")},
                    "output": {"path": str(tmp_path / "aligned")}, "options": {"size": 64, "method": "affine68"}}),
        progress=False)
    result = train(parse_spec({
        "kind": "train", "model": "parser",
        "data": {"renders": str(tmp_path / "renders"), "photos": str(tmp_path / "aligned"),
                 "validation_fraction": 0.2, "photo_repeat": 3},
        "output": {"path": str(tmp_path / "parser")},
        "options": {"epochs": 2, "batch_size": 8, "image_size": 32, "base_channels": 8},
        "resources": {"num_workers": 2},
    }))
    assert result["metrics"]["epoch"] == 1
    assert (tmp_path / "parser" / MODEL_DIR / weights.WEIGHTS).is_file()

    # The reported validation mIoU is the exported parser's on the held-out rows,
    # and it beats the same parser before training (same config, same seed).
    validation = _validation_batch(tmp_path / "renders", tmp_path / "aligned", fraction=0.2, photo_repeat=3, size=32)
    assert 0 < len(validation["mask"]) <= 64  # one validation batch, as the run scored it
    parser = weights.load_model(FaceParser, str(tmp_path / "parser" / MODEL_DIR))
    torch.manual_seed(0)
    untrained = FaceParser(parser.config)
    trained_miou = parser_eval(parser, validation, parser.config.num_classes)["miou"]
    untrained_miou = parser_eval(untrained, validation, parser.config.num_classes)["miou"]
    print(f"validation mIoU: untrained {untrained_miou:.4f}, trained {trained_miou:.4f}, "
          f"reported {result['metrics']['validation']:.4f}")
    assert result["metrics"]["validation"] == pytest.approx(trained_miou, abs=0.01)
    # Two short epochs teach mostly the layout (measured: 0.011 -> 0.049), not the detail.
    assert trained_miou > untrained_miou + 0.02


def _validation_batch(renders: Path, aligned: Path, fraction: float, photo_repeat: int,
                      size: int) -> dict[str, torch.Tensor]:
    """The rows a parser run holds out (by key hash, as jobs.train does), as one tensor batch."""
    frame = pd.read_parquet(renders, columns=["key", "status", "image", "mask"])
    frame = frame[frame.status == "ok"]
    photos = pd.read_parquet(aligned, columns=["key", "status", "aligned", "aligned_landmarks"])
    photos = photos[photos.status == "ok"]
    rows = photo_rows({name: photos[name].to_numpy() for name in photos.columns}, repeat=photo_repeat)
    keys = np.concatenate([frame.key.to_numpy(), rows["key"]])
    held = np.array([zlib.crc32(key.encode()) % 1000 < int(fraction * 1000) for key in keys])
    raw = {name: np.concatenate([frame[name].to_numpy(), rows[name]])[held] for name in ("image", "mask")}
    return _to_tensors(raw, size, torch.device("cpu"))
