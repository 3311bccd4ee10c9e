"""Ray Train: two-worker DDP training runs, checkpoints, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facecore import weights
from facecore.models.imitator import Imitator
from facecore.training.steps import imitator_eval
from jobs.pipeline import run
from jobs.spec import parse_spec
from jobs.train import MODEL_DIR, RUNS_DIR, train

pytestmark = pytest.mark.ray


def _checkpoints(output: Path) -> list[Path]:
    return sorted(p for p in (output / RUNS_DIR / "train-imitator").glob("checkpoint_*") if p.is_dir())


def test_two_worker_training_improves_and_resumes(ray_cluster, tmp_path):
    renders = run(parse_spec({
        "kind": "render", "output": {"path": str(tmp_path / "renders")},
        "options": {"count": 160, "size": 32, "seed": 0, "fixed": {"yaw": 0.5, "pitch": 0.5, "roll": 0.5}},
    }), progress=False)
    assert renders.ok_rows == 160
    spec = {"kind": "train", "model": "imitator", "data": {"renders": str(tmp_path / "renders")},
            "output": {"path": str(tmp_path / "imitator")},
            "options": {"epochs": 3, "batch_size": 8, "image_size": 32, "base_channels": 16, "learning_rate": 5e-3},
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

    spec["options"]["epochs"] = 4
    second = train(parse_spec(spec))
    assert second["metrics"]["epoch"] == 3  # one more epoch, not four from scratch
    checkpoints = _checkpoints(tmp_path / "imitator")
    assert len(checkpoints) == 4
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["epoch"] == 3

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
    assert result["metrics"]["epoch"] == 1 and 0.0 <= result["metrics"]["validation"] <= 1.0
    assert (tmp_path / "parser" / MODEL_DIR / weights.WEIGHTS).is_file()
