"""The regressor, its losses and TrainState checkpoints, on tiny models without Ray."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from facecore import weights
from facecore.models.imitator import Imitator, ImitatorConfig
from facecore.models.parsing import FaceParser, ParsingConfig
from facecore.models.regressor import Regressor, regressor_for_rig
from facecore.rig import default_schema
from facecore.training.regressor import (LOSSES, MouthDiscriminator, MouthDiscriminatorConfig, RegressorLossConfig,
                                         RegressorObjective, regressor_eval, regressor_step)
from facecore.training.state import TrainState, is_complete, read_state

SIZE = 64


def aligned_renders(count: int, seed: int, size: int = SIZE) -> dict[str, torch.Tensor]:
    """Rig renders at random poses, aligned like photos, as model tensors."""
    from jobs.samples import aligned_renders as renders

    images, landmarks, params = renders(count, seed, size)
    return {"image": torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
            "landmarks": torch.from_numpy(landmarks), "params": torch.from_numpy(params)}


@pytest.fixture(scope="module")
def data():
    return aligned_renders(16, seed=0)


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    schema = default_schema()
    imitator = Imitator(ImitatorConfig(param_dim=schema.vector_size, image_size=32, base_channels=8))
    parser = FaceParser(ParsingConfig(base_channels=8, stages=3))
    from facecore.models.identity import DlibResNet

    return schema, imitator, parser, DlibResNet.from_dat()


def test_landmark_samples_see_the_brow_style_and_follow_the_landmarks():
    from facecore.models.regressor import LANDMARK_SAMPLES, landmark_samples
    from facecore.rig import Renderer, reference_face

    schema, renderer = default_schema(), Renderer()
    reference = schema.reference_vector().astype(np.float32)
    landmarks = torch.from_numpy(reference_face(128).landmarks).float()[None].repeat(5, 1, 1)
    styles = schema.group_slice("brow_style")
    vectors = []
    for choice in range(styles.stop - styles.start):
        vector = reference.copy()
        vector[styles] = np.eye(styles.stop - styles.start)[choice]
        vectors.append(vector)
    smile = reference.copy()
    smile[schema.continuous_names.index("smile")] = 1.0
    vectors.append(smile)
    images = torch.from_numpy(np.stack([renderer.render(v, 128).image for v in vectors])).permute(0, 3, 1, 2) / 255.0
    samples = landmark_samples(images.float(), landmarks)
    assert samples.shape == (5, LANDMARK_SAMPLES)
    brows = samples[:, -2 * 81:]
    # every pair of brow styles differs in the strips by far more than a smile does
    smile_change = (brows[4] - brows[0]).abs().mean()
    style_changes = [(brows[a] - brows[b]).abs().mean() for a in range(4) for b in range(a + 1, 4)]
    assert smile_change < 0.01 and min(style_changes) > 0.02, (smile_change, style_changes)
    # the samples move with the face: shift image and landmarks by whole pixels, same samples
    shifted = torch.roll(images.float(), shifts=(3, -2), dims=(2, 3))
    moved = landmark_samples(shifted, landmarks + torch.tensor([-2.0, 3.0]))
    assert torch.allclose(moved[:, -2 * 81:], brows, atol=1e-5)


def _state(schema, parser, seed=0, lr=3e-3, discriminator=True):
    torch.manual_seed(seed)
    regressor = regressor_for_rig(schema, parser, image_size=SIZE, parser_size=32, cnn_channels=4, hidden=32)
    for weight in regressor.parser.parameters():
        weight.requires_grad_(False)
    modules = {"regressor": regressor}
    optimisers = {"regressor": torch.optim.Adam([w for w in regressor.parameters() if w.requires_grad], lr=lr)}
    if discriminator:
        modules["discriminator"] = MouthDiscriminator(MouthDiscriminatorConfig(channels=8))
        optimisers["discriminator"] = torch.optim.Adam(modules["discriminator"].parameters(), lr=lr)
    return TrainState(modules, optimisers, generator=torch.Generator().manual_seed(seed))


def test_shapes_vectors_and_errors(frozen, data, tmp_path):
    schema, _, parser, _ = frozen
    regressor = _state(schema, parser).modules["regressor"]
    continuous, logits = regressor(data["image"][:3], data["landmarks"][:3])
    assert continuous.shape == (3, schema.continuous_size) and 0 <= float(continuous.detach().min())
    assert [block.shape[1] for block in logits] == [g.size for g in schema.discrete]
    vectors, confidence = regressor.vectors(data["image"][:3], data["landmarks"][:3])
    assert vectors.shape == (3, schema.vector_size) and confidence.shape == (3, len(schema.discrete))
    for group in schema.discrete:  # snapped one-hots
        assert torch.all(vectors[:, schema.group_slice(group.name)].sum(dim=1) == 1)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\)"):
        regressor(data["image"][:2, :, :32, :32], data["landmarks"][:2])
    with pytest.raises(ValueError, match="expected landmarks of shape"):
        regressor(data["image"][:2], data["landmarks"][:1])
    weights.save_model(regressor, str(tmp_path / "r"))
    again = weights.load_model(Regressor, str(tmp_path / "r"))
    assert torch.equal(again.vectors(data["image"][:3], data["landmarks"][:3])[0], vectors)


@pytest.mark.parametrize("loss", [name for name in LOSSES if name != "mouth"] + ["mouth_l1"])
def test_each_loss_lowers_on_a_tiny_run(frozen, data, loss):
    schema, imitator, parser, identity = frozen
    name, form = ("mouth", "l1") if loss == "mouth_l1" else (loss, "adversarial")
    weights_only = {other: 0.0 for other in LOSSES} | {name: 1.0}
    config = RegressorLossConfig(**weights_only, mouth_form=form, landmark_noise=0.0)
    objective = RegressorObjective(schema, imitator, identity, config, SIZE)
    state = _state(schema, parser, discriminator=False)
    renders = {k: v[:8] for k, v in data.items()}
    photos = {k: v[8:] for k, v in data.items() if k != "params"}
    history = [regressor_step(state, objective, renders, photos)[name] for _ in range(15)]
    print(loss, [round(h, 4) for h in history])
    assert np.mean(history[-3:]) < 0.97 * history[0], history


def test_mouth_discriminator_and_regressor_each_learn_their_side(frozen, data):
    schema, imitator, parser, _ = frozen
    config = RegressorLossConfig(**({other: 0.0 for other in LOSSES} | {"mouth": 1.0}))
    objective = RegressorObjective(schema, imitator, None, config, SIZE)
    photos = {k: v[8:] for k, v in data.items() if k != "params"}
    state = _state(schema, parser)
    for group in state.optimisers["regressor"].param_groups:
        group["lr"] = 0.0  # the discriminator's turn: the regressor stands still
    d_losses = [regressor_step(state, objective, None, photos)["discriminator"] for _ in range(40)]
    assert np.mean(d_losses[-3:]) < 0.93 * d_losses[0], d_losses
    for group in state.optimisers["regressor"].param_groups:
        group["lr"] = 3e-3
    for group in state.optimisers["discriminator"].param_groups:
        group["lr"] = 0.0  # the regressor's turn against a fixed discriminator
    r_losses = [regressor_step(state, objective, None, photos)["mouth"] for _ in range(15)]
    assert np.mean(r_losses[-3:]) < 0.97 * r_losses[0], r_losses
    assert state.steps == {"regressor": 55, "discriminator": 55}


def test_trained_regressor_beats_its_untrained_self_on_held_out_renders(frozen):
    schema, imitator, parser, _ = frozen
    train, held_out = aligned_renders(192, seed=1), aligned_renders(48, seed=2)
    config = RegressorLossConfig(**({other: 0.0 for other in LOSSES} | {"supervised": 1.0, "landmark": 1.0}))
    objective = RegressorObjective(schema, imitator, None, config, SIZE)
    state = _state(schema, parser, discriminator=False)
    state.modules["regressor"].calibrate(train["image"][:128], train["landmarks"][:128])  # as jobs.train does
    untrained = regressor_eval(state.modules["regressor"], schema, held_out)
    for epoch in range(15):
        for start in range(0, 192, 32):
            regressor_step(state, objective, {k: v[start:start + 32] for k, v in train.items()}, None)
    trained = regressor_eval(state.modules["regressor"], schema, held_out)
    print(f"held-out mae_ratio: untrained {untrained['mae_ratio']:.3f}, trained {trained['mae_ratio']:.3f}")
    assert trained["mae_ratio"] < 0.9 * untrained["mae_ratio"]


def test_checkpoint_restores_everything_exactly(frozen, data, tmp_path):
    schema, imitator, parser, identity = frozen
    objective = RegressorObjective(schema, imitator, identity, RegressorLossConfig(), SIZE)
    renders = {k: v[:8] for k, v in data.items()}
    photos = {k: v[8:12] for k, v in data.items() if k != "params"}

    def steps(state, count):
        for _ in range(count):
            regressor_step(state, objective, renders, photos)
            for scheduler in state.schedulers.values():
                scheduler.step()

    def fresh():
        state = _state(schema, parser)
        state.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
                            for name, opt in state.optimisers.items()}
        return state

    straight = fresh()
    steps(straight, 6)
    first = fresh()
    steps(first, 3)
    first.epoch = 1
    first.save(str(tmp_path / "ckpt"))
    assert is_complete(str(tmp_path / "ckpt")) and read_state(str(tmp_path / "ckpt"))["steps"]["regressor"] == 3
    torch.manual_seed(123)  # the resumed process's global RNG differs until restored
    resumed = fresh()
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.epoch == 1 and resumed.steps == {"regressor": 3, "discriminator": 3}
    steps(resumed, 3)
    for name in straight.modules:
        for (key, a), b in zip(straight.plain(name).state_dict().items(), resumed.plain(name).state_dict().values()):
            assert torch.allclose(a, b, rtol=0.0, atol=1e-6), (name, key)

    # A half-written checkpoint is recognised as such, whichever file is short or missing.
    target = tmp_path / "ckpt" / "regressor" / weights.WEIGHTS
    target.write_bytes(target.read_bytes()[:-10])
    assert not is_complete(str(tmp_path / "ckpt"))
    os.remove(target)
    assert not is_complete(str(tmp_path / "ckpt"))
    with pytest.raises(weights.CheckpointError, match="not a complete training checkpoint"):
        fresh().load(str(tmp_path / "ckpt"))


def test_loss_config_rejects_negative_weights():
    with pytest.raises(ValueError, match="loss weight cycle must be >= 0"):
        RegressorLossConfig(cycle=-1.0)
    assert dataclasses.asdict(RegressorLossConfig())["mouth_form"] == "adversarial"
