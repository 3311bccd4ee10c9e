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


# -- the regressor: several networks, exact resume, a worker killed mid-run ---------

REGRESSOR_OPTIONS = {"epochs": 3, "batch_size": 16, "photo_batch_size": 2, "image_size": 64, "cnn_channels": 4,
                     "hidden": 32, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def regressor_data(ray_cluster, photos, tmp_path_factory):
    from jobs.manifest import write_manifest

    folder = tmp_path_factory.mktemp("regressor-data")
    run(parse_spec({"kind": "render", "output": {"path": str(folder / "renders")},
                    "options": {"count": 96, "size": 64, "seed": 0, "align": "affine68"}}), progress=False)
    write_manifest([str(p) for p in photos.values()], str(folder / "m.parquet"))
    run(parse_spec({"kind": "align", "input": {"manifest": str(folder / "m.parquet")},
                    "output": {"path": str(folder / "aligned")}, "options": {"size": 64, "method": "affine68"}}),
        progress=False)
    return folder


def _regressor_spec(data: Path, output: Path, workers: int = 1, **resources) -> dict:
    return {"kind": "train", "model": "regressor",
            "data": {"renders": str(data / "renders"), "photos": str(data / "aligned"), "validation_fraction": 0.2},
            "output": {"path": str(output)}, "options": dict(REGRESSOR_OPTIONS),
            "resources": {"num_workers": workers, **resources}}


def _final_regressor(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / MODEL_DIR / weights.WEIGHTS))


def _regressor_checkpoints(output: Path) -> list[dict]:
    folder = output / RUNS_DIR / "train-regressor"
    return [json.loads((p / "state.json").read_text()) for p in sorted(folder.glob("checkpoint_*")) if p.is_dir()]


@pytest.fixture(scope="module")
def uninterrupted(regressor_data, tmp_path_factory):
    """One worker, three epochs straight through: the run the interrupted ones must match."""
    output = tmp_path_factory.mktemp("straight") / "regressor"
    result = train(parse_spec(_regressor_spec(regressor_data, output)))
    return output, result


def test_regressor_trains_every_loss_with_two_workers(regressor_data, tmp_path):
    from facecore.models.regressor import Regressor

    spec = _regressor_spec(regressor_data, tmp_path / "regressor", workers=2)
    spec["options"]["epochs"] = 2
    result = train(parse_spec(spec))
    metrics = result["metrics"]
    for loss in ("supervised", "landmark", "content", "identity", "prior", "cycle", "mouth", "discriminator"):
        assert np.isfinite(metrics[f"loss_{loss}"]), loss
    assert 0 < metrics["mae_ratio"] < 1.2 and 0 <= metrics["discrete_acc"] <= 1
    model = weights.load_model(Regressor, str(tmp_path / "regressor" / MODEL_DIR))
    assert model.config.image_size == 64
    # `best` is the kept checkpoint with the lowest validation figure; `model` the last.
    states = _regressor_checkpoints(tmp_path / "regressor")
    best = min(states, key=lambda state: state["metrics"]["validation"])
    assert weights.read_extra(str(tmp_path / "regressor" / "best"))["validation"] == \
        pytest.approx(best["metrics"]["validation"])
    assert states[-1]["steps"]["regressor"] == states[-1]["steps"]["discriminator"] > 0


class _KillTrainWorker:
    """Kills the training worker (SIGKILL, by PID) once the run has ``after`` complete checkpoints."""

    def __init__(self, output: Path, after: int) -> None:
        import threading

        self.output, self.after, self.killed = output, after, []
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import os
        import signal
        import time

        import ray
        from ray.util.state import list_actors

        from facecore.training.state import is_complete

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            folder = self.output / RUNS_DIR / "train-regressor"
            done = [p for p in folder.glob("checkpoint_*") if is_complete(str(p))] if folder.exists() else []
            if len(done) >= self.after:
                # This test's cluster: another Ray on the machine must not make the state API guess.
                workers = list_actors(address=ray.get_runtime_context().gcs_address,
                                      filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                for actor in workers:
                    os.kill(actor.pid, signal.SIGKILL)
                    self.killed.append(actor.pid)
                return
            time.sleep(0.05)


def test_interrupted_run_resumes_to_the_uninterrupted_weights(regressor_data, uninterrupted, tmp_path):
    from jobs.kinds.train import TrainJob  # noqa: F401  (the spec type the resumed run reads)

    output = tmp_path / "regressor"
    spec = _regressor_spec(regressor_data, output, max_failures=0)
    killer = _KillTrainWorker(output, after=1)
    with pytest.raises(Exception):
        train(parse_spec(spec))  # no retries: the run fails with its worker
    killer.thread.join()
    assert killer.killed
    interrupted = _regressor_checkpoints(output)
    assert 1 <= interrupted[-1]["epoch"] < 3  # stopped part-way
    train(parse_spec(spec))  # a second run of the same spec resumes from the last complete checkpoint
    straight_output, _ = uninterrupted
    straight, resumed = _final_regressor(straight_output), _final_regressor(output)
    worst = max(float((straight[name] - resumed[name]).abs().max()) for name in straight)
    print(f"largest weight difference, resumed vs uninterrupted: {worst:.2e}")
    assert worst <= 1e-6
    steps = [state["steps"]["regressor"] for state in _regressor_checkpoints(output)]
    assert steps == sorted(steps) and steps[-1] == _regressor_checkpoints(straight_output)[-1]["steps"]["regressor"]


def test_killed_worker_is_restarted_from_the_last_checkpoint(regressor_data, uninterrupted, tmp_path):
    output = tmp_path / "regressor"
    killer = _KillTrainWorker(output, after=1)
    result = train(parse_spec(_regressor_spec(regressor_data, output, max_failures=2)))
    killer.thread.join()
    assert killer.killed and result["metrics"]["epoch"] == 2
    epochs = [state["metrics"]["epoch"] for state in _regressor_checkpoints(output)]
    # Restarted from the checkpoint, not from scratch: no epoch trained twice
    # (Ray keeps the last and the best checkpoints, so the list may have gaps).
    assert epochs == sorted(set(epochs)) and epochs[-1] == 2
    straight_output, _ = uninterrupted
    straight, recovered = _final_regressor(straight_output), _final_regressor(output)
    assert max(float((straight[name] - recovered[name]).abs().max()) for name in straight) <= 1e-6


def test_expression_gan_trains_on_rig_pairs_and_photos_with_two_workers(regressor_data, photos, tmp_path):
    from facecore.models.expression import ExpressionGenerator

    pairs = run(parse_spec({"kind": "render", "output": {"path": str(tmp_path / "pairs")},
                            "options": {"count": 96, "size": 64, "seed": 3, "align": "affine68",
                                        "pairs": "expression"}}), progress=False)
    assert pairs.ok_rows == 96
    # The aligned sample photos join every step: the three of one person as pairs
    # of two of his photos, half of the time, the rest with themselves.
    people = pd.DataFrame({"uri": [str(p) for p in photos.values()],
                           "identity": [name.split(".")[0].rstrip("0123456789") for name in photos]})
    people.to_csv(tmp_path / "people.csv", index=False)
    spec = {"kind": "train", "model": "expression", "data": {"renders": str(tmp_path / "pairs"),
                                                             "photos": str(regressor_data / "aligned"),
                                                             "photo_identities": str(tmp_path / "people.csv"),
                                                             "validation_fraction": 0.15},
            "output": {"path": str(tmp_path / "expression")},
            "options": {"epochs": 2, "batch_size": 8, "image_size": 64, "base_channels": 8, "residual_blocks": 1,
                        "pretrain_steps": 3, "learning_rate": 2e-3, "discriminator_learning_rate": 2e-3,
                        "photo_batch_size": 2},
            "resources": {"num_workers": 2}}
    metrics = train(parse_spec(spec))["metrics"]
    for loss in ("l1", "adversarial", "identity_discriminator", "expression_discriminator"):
        assert np.isfinite(metrics[f"loss_{loss}"]), loss
    assert 0 < metrics["l1"] < 0.2 and metrics["l1_copy_ratio"] > 0
    assert metrics["validation"] == metrics["l1_baseline_ratio"] > 0
    assert 0 <= metrics["identity_accuracy"] <= 1 and 0 <= metrics["expression_accuracy"] <= 1
    generator = weights.load_model(ExpressionGenerator, str(tmp_path / "expression" / MODEL_DIR))
    assert generator.config.image_size == 64 and (tmp_path / "expression" / "best").is_dir()
    states = [json.loads((p / "state.json").read_text())
              for p in sorted((tmp_path / "expression" / RUNS_DIR / "train-expression").glob("checkpoint_*"))
              if p.is_dir()]
    last = max(states, key=lambda state: state["epoch"])["steps"]
    # the discriminators' pre-training steps come first, then one of each per GAN step
    assert last["identity_discriminator"] == last["expression_discriminator"] == last["generator"] + 3

    single = tmp_path / "single"
    run(parse_spec({"kind": "render", "output": {"path": str(single)}, "options": {"count": 4, "size": 64}}),
        progress=False)
    with pytest.raises(ValueError, match="options.pairs: expression"):
        train(parse_spec({**spec, "data": {"renders": str(single)}, "output": {"path": str(tmp_path / "no")}}))
    with pytest.raises(FileNotFoundError, match="data.photos"):
        train(parse_spec({**spec, "data": {"renders": str(tmp_path / "pairs"), "photos": str(tmp_path / "none")},
                          "output": {"path": str(tmp_path / "no")}}))
    pd.DataFrame({"uri": ["elsewhere.jpg"], "identity": ["x"]}).to_csv(tmp_path / "strangers.csv", index=False)
    with pytest.raises(ValueError, match="data.photo_identities: none of its keys"):
        train(parse_spec({**spec, "data": {**spec["data"], "photo_identities": str(tmp_path / "strangers.csv")},
                          "output": {"path": str(tmp_path / "no")}}))


@pytest.fixture(scope="module")
def swap_pairs_output(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("swap-pairs")
    result = run(parse_spec({"kind": "render", "output": {"path": str(folder)},
                             "options": {"count": 64, "size": 64, "seed": 5, "align": "affine68", "pairs": "swap"}}),
                 progress=False)
    assert result.ok_rows == 64
    return folder


def _swap_spec(pairs: Path, photos: Path | None, output: Path, workers: int, **options) -> dict:
    data = {"renders": str(pairs), "validation_fraction": 0.2} | ({"photos": str(photos)} if photos else {})
    return {"kind": "train", "model": "swap", "data": data, "output": {"path": str(output)},
            "options": {"epochs": 2, "batch_size": 8, "image_size": 64, "base_channels": 8, "latent_dim": 32,
                        "max_channels": 32, "learning_rate": 2e-3, "photo_batch_size": 2, **options},
            "resources": {"num_workers": workers}}


def _held_out_swaps(pairs: Path, fraction: float) -> dict[str, torch.Tensor]:
    """The pairs the run held out (its key-hash split), as the loop's tensors."""
    from jobs.train import _swap_tensors

    frame = pd.concat(pd.read_parquet(p) for p in sorted(pairs.glob("part-*.parquet")))
    frame = frame[frame["key"].map(lambda key: zlib.crc32(key.encode()) % 1000 < int(fraction * 1000))]
    return _swap_tensors({name: frame[name].to_numpy() for name in frame.columns}, 64, torch.device("cpu"))


def _photo_swap_batch(aligned: Path) -> dict[str, torch.Tensor]:
    """The aligned sample photos, each swapped onto the next, as the loop's photo swaps."""
    from jobs.train import _photo_swaps, _photo_tensors

    class Shard:  # what _photo_tensors reads: numpy batches of an align output
        def iter_batches(self, **_):
            frame = pd.read_parquet(aligned)
            frame = frame[frame.status == "ok"]
            yield {name: frame[name].to_numpy() for name in ("aligned", "aligned_landmarks")}

    photos = _photo_tensors(Shard(), 64, torch.device("cpu"))
    return _photo_swaps(photos, torch.arange(len(photos["image"])))


def test_swap_trains_e_and_d_on_rig_pairs_and_photos_with_two_workers(swap_pairs_output, regressor_data, tmp_path):
    from facecore.models.identity import IdentityScorer
    from facecore.models.latent import LatentSwapper
    from facecore.models.mobilenet import MobileNetV2Features
    from facecore.training.swap import SwapCritics, SwapLossConfig, swap_losses

    # The swap starts as the warped target (D's mask near 0), whose identity is the target's: a few
    # steps move it only with the identity term weighted up.
    spec = _swap_spec(swap_pairs_output, regressor_data / "aligned", tmp_path / "swap", workers=2, epochs=3,
                      swap_losses={"identity": 20.0})
    metrics = train(parse_spec(spec))["metrics"]
    for loss in ("mse", "perceptual", "identity", "attribute", "truth"):
        assert np.isfinite(metrics[f"loss_{loss}"]), loss
    assert metrics["validation"] == metrics["l1_truth"] > 0 and -1 <= metrics["identity_similarity"] <= 1
    trained = weights.load_model(LatentSwapper, str(tmp_path / "swap" / MODEL_DIR))
    assert trained.config.image_size == 64 and (tmp_path / "swap" / "best").is_dir()
    # Against its untrained self (the loop's initial weights: seed 0, E then D), on the held-out pairs.
    torch.manual_seed(0)
    untrained = LatentSwapper(trained.config)
    critics = SwapCritics(MobileNetV2Features.pretrained(), IdentityScorer(device="cpu"))
    batch = _held_out_swaps(swap_pairs_output, 0.2)
    photos = _photo_swap_batch(regressor_data / "aligned")
    with torch.no_grad():
        before, after = (swap_losses(m.encoder, m.decoder, batch, critics, SwapLossConfig())
                         for m in (untrained.eval(), trained.eval()))
        # Identity is measured on the photo swaps (two people, Obama's and Biden's): to dlib every
        # rig face is much like every other (1 - cos about 0.07 between two rig people).
        before_photos, after_photos = (swap_losses(m.encoder, m.decoder, photos, critics, SwapLossConfig())
                                       for m in (untrained, trained))
    print({name: (float(before[name]), float(after[name])) for name in ("mse", "truth")},
          {name: (float(before_photos[name]), float(after_photos[name])) for name in ("mse", "identity")})
    assert float(after["mse"]) < 0.85 * float(before["mse"])
    assert float(after["truth"]) < float(before["truth"])
    assert float(after_photos["mse"]) < 0.95 * float(before_photos["mse"])
    # Not asserted: that these few steps lower L_id. The swap starts as the warped target (D's mask
    # near 0), and 36 steps leave the photo swaps' L_id where it was (0.1213 -> 0.1212 here).
    assert 0 < float(after_photos["identity"]) < 2
    states = [json.loads((p / "state.json").read_text())
              for p in sorted((tmp_path / "swap" / RUNS_DIR / "train-swap").glob("checkpoint_*")) if p.is_dir()]
    last = max(states, key=lambda state: state["epoch"])["steps"]
    assert last["encoder"] == last["decoder"] > 0

    with pytest.raises(ValueError, match="holds single renders; model: swap trains on swap pairs"):
        train(parse_spec(_swap_spec(regressor_data / "renders", None, tmp_path / "no", workers=1)))
    expression = _swap_spec(swap_pairs_output, None, tmp_path / "no", workers=1)
    expression.update(model="expression", options={"image_size": 64})
    with pytest.raises(ValueError, match="holds swap pairs; model: expression trains on expression pairs"):
        train(parse_spec(expression))


def test_swap_training_resumes_to_the_uninterrupted_weights(swap_pairs_output, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = {"schedule": "constant"}  # a cosine schedule's length depends on `epochs`, which the runs change
    train(parse_spec(_swap_spec(swap_pairs_output, None, straight, workers=1, **options)))
    train(parse_spec(_swap_spec(swap_pairs_output, None, resumed, workers=1, **options, epochs=1)))
    train(parse_spec(_swap_spec(swap_pairs_output, None, resumed, workers=1, **options)))
    a, b = _final_regressor(straight), _final_regressor(resumed)
    worst = max(float((a[name] - b[name]).abs().max()) for name in a)
    print(f"largest weight difference, resumed vs uninterrupted: {worst:.2e}")
    assert worst <= 1e-6
