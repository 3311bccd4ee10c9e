"""Ray Train loops around facecore's pure training steps.

``train(spec)`` reads a render job's output as a Ray Dataset, splits off a
validation set by key hash, and runs a ``TorchTrainer`` (DDP over
``resources.num_workers``). Every epoch rank 0 reports a checkpoint (the model as
config.json + model.safetensors, the optimiser state, the epoch); a second run
over the same output resumes from the newest one. The finished model is written
to ``<output>/model/``, the folder job specs point at.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import tempfile
import zlib
from typing import Any

import cv2
import numpy as np
import pyarrow.fs as pafs
import torch

from facecore import weights
from facecore.models.imitator import Imitator, ImitatorConfig
from facecore.models.parsing import FaceParser, ParsingConfig
from facecore.training.steps import imitator_eval, imitator_step, parser_eval, parser_step
from jobs.output import PART_PREFIX, PART_SUFFIX, OutputFolder
from jobs.kinds.train import TrainJob
from jobs.manifest import read_identities
from jobs.storage import fsspec_options, locate

log = logging.getLogger(__name__)

MODEL_DIR = "model"
BEST_DIR = "best"  # the regressor's checkpoint with the best validation figure
RUNS_DIR = "runs"


def _model_for(spec: TrainJob, param_dim: int) -> torch.nn.Module:
    if spec.model == "imitator":
        return Imitator(ImitatorConfig(param_dim=param_dim, image_size=spec.options.image_size,
                                       base_channels=spec.options.base_channels))
    return FaceParser(ParsingConfig(base_channels=spec.options.base_channels))


def _to_tensors(raw: dict[str, np.ndarray], size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Decode a batch of render rows (PNG bytes) into model tensors at ``size``."""
    images, masks = [], []
    for data in raw["image"]:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        if image.shape[0] != size:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        images.append(image)
    for data in raw["mask"]:
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if mask.shape[0] != size:
            mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
        masks.append(mask)
    tensors = {
        "image": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).to(device),
        "mask": torch.from_numpy(np.stack(masks).astype(np.int64)).to(device),
    }
    if "params" in raw:  # the parser's data (renders and photos) carries none
        tensors["params"] = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in raw["params"]])).to(device)
    return tensors


def photo_rows(batch: dict[str, np.ndarray], repeat: int = 1) -> dict[str, np.ndarray]:
    """Align-job rows → training rows: the aligned crop and a mask drawn from its landmarks.

    Each row comes out ``repeat`` times (same key, so it stays on one side of the
    validation split).
    """
    from facecore.face.parsing_mask import landmark_mask
    from facecore.images import decode_png, encode_png

    images, masks = [], []
    for data, points in zip(batch["aligned"], batch["aligned_landmarks"]):
        side = decode_png(data).shape[0]
        images.append(data)
        masks.append(encode_png(landmark_mask(np.asarray(points, np.float64).reshape(68, 2), side)))
    rows = {"key": batch["key"], "status": batch["status"],
            "image": np.array(images, dtype=object), "mask": np.array(masks, dtype=object)}
    return {name: np.repeat(values, repeat, axis=0) for name, values in rows.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Shard the data, run the steps, report metrics and checkpoints. Nothing else."""
    import ray.train
    import ray.train.torch

    spec = TrainJob.model_validate(config["spec"])
    torch.manual_seed(spec.options.seed)
    if not spec.resources.use_gpu:
        # oneDNN's AVX-512 1x1-convolution weight-gradient kernel segfaulted inside
        # Ray Train's worker thread here (parser, 64 px); PyTorch's own CPU kernels
        # do not, at a small cost in speed.
        torch.backends.mkldnn.enabled = False
    device = ray.train.torch.get_device()
    model = _model_for(spec, config["param_dim"]).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=spec.options.learning_rate)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = weights.load_model(type(model), os.path.join(folder, MODEL_DIR), device=device)
            model.load_state_dict(restored.state_dict())
            optimiser.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location=device,
                                                 weights_only=True))
            start_epoch = json.loads(open(os.path.join(folder, "state.json")).read())["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    plain = model.module if hasattr(model, "module") else model
    step, name = (imitator_step, "imitator") if spec.model == "imitator" else (parser_step, "parser")
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")
    size = spec.options.image_size
    steps_per_epoch = max(1, config["train_rows"] // (spec.options.batch_size * spec.resources.num_workers))
    for epoch in range(start_epoch, spec.options.epochs):
        losses = []
        for index, raw in enumerate(train_shard.iter_batches(batch_size=spec.options.batch_size,
                                                            batch_format="numpy")):
            if spec.options.schedule == "cosine":
                # Derived from (epoch, step) alone, so a resumed run continues the curve.
                progress = min(1.0, (epoch + index / steps_per_epoch) / spec.options.epochs)
                for group in optimiser.param_groups:
                    group["lr"] = spec.options.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
            metrics = step({name: model}, {name: optimiser}, _to_tensors(raw, size, device))
            losses.append(next(iter(metrics.values())))
        scores = []
        for raw in validation_shard.iter_batches(batch_size=64, batch_format="numpy"):
            batch = _to_tensors(raw, size, device)
            scores.append(imitator_eval(plain, batch)["l1"] if spec.model == "imitator"
                          else parser_eval(plain, batch, plain.config.num_classes)["miou"])
        report = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "validation": float(np.mean(scores)) if scores else float("nan")}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                weights.save_model(plain, os.path.join(folder, MODEL_DIR), extra=report)
                torch.save(optimiser.state_dict(), os.path.join(folder, "optimizer.pt"))
                with open(os.path.join(folder, "state.json"), "w") as handle:
                    json.dump(report, handle)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(report, checkpoint=checkpoint)


def _render_tensors(raw: dict[str, np.ndarray], size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Aligned rows → regressor tensors as the jobs feed it: image, landmarks (scaled to ``size``), params."""
    from facecore.images import decode_png
    from jobs.kinds.recognize import model_inputs

    crops = [decode_png(data) for data in raw["image"]]
    landmarks = np.stack([np.asarray(flat, np.float32).reshape(68, 2) for flat in raw["landmarks"]])
    images, points = model_inputs(crops, landmarks, size, device)
    tensors = {"image": images, "landmarks": points}
    if "params" in raw:
        tensors["params"] = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in raw["params"]])).to(device)
    return tensors


def _photo_tensors(shard, size: int, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Every aligned photo of an align output (a few thousand at most) as tensors, once per worker; with an
    ``identity`` column also ``identity``, (N,) int64 person codes (-1: unknown, pairs with no other)."""
    rows = {"image": [], "landmarks": []}
    names = []
    for raw in shard.iter_batches(batch_size=256, batch_format="numpy"):
        rows["image"].extend(raw["aligned"])
        rows["landmarks"].extend(raw["aligned_landmarks"])
        if "identity" in raw:
            names.extend(raw["identity"])
    if not rows["image"]:
        return None
    tensors = _render_tensors({name: np.array(values, dtype=object) for name, values in rows.items()}, size, device)
    if names:
        codes = {name: code for code, name in enumerate(sorted({str(n) for n in names if n}))}
        tensors["identity"] = torch.tensor([codes[str(n)] if n else -1 for n in names], dtype=torch.int64)
    return tensors


def _with_identity(batch: dict[str, np.ndarray], identities: dict[str, str]) -> dict[str, np.ndarray]:
    """An ``identity`` column from ``{key: person}`` ("" where the key has none)."""
    batch["identity"] = np.array([identities.get(str(key), "") for key in batch["key"]], dtype=object)
    return batch


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The shuffle seed of one rank's epoch: a different order every epoch, a different stream per rank."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def regressor_loop_per_worker(config: dict[str, Any]) -> None:
    """The regressor (and its mouth discriminator) on Ray Train: a TrainState per worker."""
    import ray.train
    import ray.train.torch

    from facecore.models.identity import DlibResNet
    from facecore.models.regressor import regressor_for_rig
    from facecore.presets import preset_path
    from facecore.rig import default_schema
    from facecore.training.regressor import (MouthDiscriminator, MouthDiscriminatorConfig, RegressorLossConfig,
                                             RegressorObjective, regressor_eval, regressor_step)
    from facecore.training.state import TrainState

    spec = TrainJob.model_validate(config["spec"])
    options = spec.options
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # oneDNN stays on here (twice the speed): the segfault train_loop_per_worker
    # avoids is in the weight gradient of 1x1 convolutions, and the regressor's
    # only 1x1 convolutions are in the frozen parser.
    device = ray.train.torch.get_device()
    schema = default_schema()
    parser = weights.load_model(FaceParser, spec.models.parser or preset_path("parser"))
    imitator = weights.load_model(Imitator, spec.models.imitator or preset_path("imitator"))
    torch.manual_seed(options.seed)  # every rank starts from the same weights
    regressor = regressor_for_rig(schema, parser, image_size=options.image_size, cnn_channels=options.cnn_channels,
                                  hidden=options.hidden)
    for weight in regressor.parser.parameters():
        weight.requires_grad_(False)  # F_seg is the pretrained feature extractor
    losses = RegressorLossConfig(**options.losses.model_dump())
    modules: dict[str, torch.nn.Module] = {"regressor": regressor.to(device)}
    optimisers = {"regressor": torch.optim.Adam([w for w in regressor.parameters() if w.requires_grad],
                                                lr=options.learning_rate)}
    if losses.mouth > 0 and losses.mouth_form == "adversarial" and config["photo_rows"]:
        modules["discriminator"] = MouthDiscriminator(MouthDiscriminatorConfig()).to(device)
        optimisers["discriminator"] = torch.optim.Adam(modules["discriminator"].parameters(),
                                                       lr=options.discriminator_learning_rate, betas=(0.5, 0.999))
    steps_per_epoch = max(1, config["train_rows"] // (options.batch_size * spec.resources.num_workers))
    total_steps = steps_per_epoch * options.epochs
    schedule = (lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))) \
        if options.schedule == "cosine" else (lambda step: 1.0)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
                  for name, optimiser in optimisers.items()}
    generator = torch.Generator().manual_seed(_epoch_seed(options.seed, rank, options.epochs + 1))
    state = TrainState(modules, optimisers, schedulers, generator=generator)
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.load(folder, device)
    else:
        # Feature standardisation from the first held-out renders (inputs only, no
        # labels; every worker reads the same ones, and DDP broadcasts rank 0's
        # anyway). Not from the training shard: a second pass over a split shard
        # would start an epoch the other workers are not in.
        sample = next(iter(validation_shard.iter_batches(batch_size=256, batch_format="numpy")))
        sample = _render_tensors(sample, options.image_size, device)
        regressor.calibrate(sample["image"], sample["landmarks"])
    for name in list(state.modules):
        state.modules[name] = ray.train.torch.prepare_model(state.modules[name])
    identity = DlibResNet.from_dat() if losses.identity > 0 and config["photo_rows"] else None
    objective = RegressorObjective(schema, imitator, identity, losses, options.image_size).to(device)
    photos = _photo_tensors(ray.train.get_dataset_shard("photos"), options.image_size, device) \
        if config["photo_rows"] else None
    for epoch in range(state.epoch, options.epochs):
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # per loss: the photo losses are not in every step
        batches = train_shard.iter_batches(batch_size=options.batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=4 * options.batch_size,
                                           local_shuffle_seed=_epoch_seed(options.seed, rank, epoch))
        for raw in batches:
            renders = _render_tensors(raw, options.image_size, device)
            photo_batch = None
            if photos is not None and state.steps["regressor"] % options.photo_every == 0:
                pick = torch.randint(len(photos["image"]), (options.photo_batch_size,), generator=state.generator)
                photo_batch = {name: value[pick.to(value.device)] for name, value in photos.items()}
            metrics = regressor_step(state, objective, renders, photo_batch)
            for scheduler in state.schedulers.values():
                scheduler.step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        scores = [regressor_eval(state.plain("regressor"), schema, _render_tensors(raw, options.image_size, device))
                  for raw in validation_shard.iter_batches(batch_size=64, batch_format="numpy")]
        report = {"epoch": epoch, "train_loss": sums.get("total", float("nan")) / max(counts.get("total", 0), 1),
                  **{f"loss_{name}": value / counts[name] for name, value in sums.items() if name != "total"},
                  **({name: float(np.mean([s[name] for s in scores])) for name in scores[0]} if scores else {})}
        report["validation"] = report.get("mae_ratio", float("nan"))
        state.epoch, state.metrics = epoch + 1, report
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                state.save(os.path.join(folder, "state"))
                checkpoint = ray.train.Checkpoint.from_directory(os.path.join(folder, "state"))
            ray.train.report(report, checkpoint=checkpoint)


def _pair_tensors(raw: dict[str, np.ndarray], config, device: torch.device,
                  with_landmarks: bool = False) -> dict[str, torch.Tensor]:
    """A block of expression pairs (a ``pairs: expression`` render job's rows) as G and its critics take
    them; ``with_landmarks`` adds the (B, 68, 2) ``source_landmarks`` and ``target_landmarks``."""
    from facecore.images import decode_png
    from facecore.models.expression import generator_inputs
    from jobs.kinds.recognize import model_inputs

    batch, landmarks = {}, {}
    for prefix, name in (("", "source"), ("target_", "target")):
        crops = [decode_png(data) for data in raw[f"{prefix}image"]]
        points = np.array([np.asarray(p, np.float32) for p in raw[f"{prefix}landmarks"]]).reshape(len(crops), 68, 2)
        images, landmarks[name] = model_inputs(crops, points, config.image_size)
        batch[name] = images.to(device)
    inputs = generator_inputs(landmarks["source"], landmarks["target"], config)
    if with_landmarks:
        inputs |= {f"{name}_landmarks": points for name, points in landmarks.items()}
    return batch | {name: tensor.to(device) for name, tensor in inputs.items()}


def _photo_pairs(photos: dict[str, torch.Tensor], pick: torch.Tensor, share: float, config,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Photos ``pick`` as (source, target) pairs: the first ``share`` of them with another photo of
    their person when they have one (``photos["identity"]``), the rest with themselves
    (self-reconstruction: target = source, same landmarks)."""
    from facecore.models.expression import generator_inputs

    partner = pick.clone()
    if "identity" in photos:
        identity, everyone = photos["identity"], torch.arange(len(photos["identity"]))
        for i in range(int(round(share * len(pick)))):
            person = identity[pick[i]]
            others = torch.nonzero((identity == person) & (everyone != pick[i]) & (person >= 0)).flatten()
            if len(others):
                partner[i] = others[torch.randint(len(others), (1,), generator=generator)]
    device = photos["image"].device
    pick, partner = pick.to(device), partner.to(device)
    inputs = generator_inputs(photos["landmarks"][pick], photos["landmarks"][partner], config)
    return {"source": photos["image"][pick], "target": photos["image"][partner],
            **{name: t.to(device) for name, t in inputs.items()}}


def expression_loop_per_worker(config: dict[str, Any]) -> None:
    """Expression transfer's G, D_id and D_e on Ray Train (SPEC.md §1): a TrainState per worker.

    The first ``options.pretrain_steps`` updates train the discriminators alone on
    real pairs (the seed's pre-training); the GAN's alternating steps follow. With
    ``data.photos``, every ``photo_every`` steps ``photo_batch_size`` aligned photos
    join the batch as pairs with themselves (self-reconstruction: G must leave a
    face alone when the landmarks do not move, and the critics see real photos as
    real) or, with ``data.photo_identities``, ``photo_pairs`` of them with another
    photo of their person (:func:`_photo_pairs`). Each epoch reports G's L1 on held-out pairs and its ratio to the
    landmark-warp baseline's (``l1_baseline_ratio``, the ``validation`` figure) and
    to copying the source (``l1_copy_ratio``).
    """
    import ray.train
    import ray.train.torch

    import torch.nn.functional as F

    from facecore.models.expression import (ExpressionConfig, ExpressionDiscriminator, ExpressionGenerator,
                                            IdentityDiscriminator, landmark_flow)
    from facecore.training.expression import ExpressionLossConfig, gan_step, generate, pretrain_step
    from facecore.training.state import TrainState

    spec = TrainJob.model_validate(config["spec"])
    options = spec.options
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    model_config = ExpressionConfig(image_size=options.image_size, base_channels=options.base_channels,
                                    residual_blocks=options.residual_blocks, stages=options.stages,
                                    discriminator_channels=options.discriminator_channels,
                                    heatmap_mode=options.heatmap_mode, heatmap_sigma=options.heatmap_sigma,
                                    flow_prior=options.flow_prior)
    baseline_config = dataclasses.replace(model_config, flow_prior="warp")
    losses = ExpressionLossConfig(**options.expression_losses.model_dump())
    torch.manual_seed(options.seed)  # every rank starts from the same weights
    # Channels-last: the convolutions' fastest layout (on 2 CPUs a step is 13 % faster).
    modules = {name: module.to(device, memory_format=torch.channels_last) for name, module in (
        ("generator", ExpressionGenerator(model_config)),
        ("identity_discriminator", IdentityDiscriminator(model_config)),
        ("expression_discriminator", ExpressionDiscriminator(model_config)))}
    optimisers = {name: torch.optim.Adam(module.parameters(), betas=(0.5, 0.999),
                                         lr=options.learning_rate if name == "generator"
                                         else options.discriminator_learning_rate)
                  for name, module in modules.items()}
    steps_per_epoch = max(1, config["train_rows"] // (options.batch_size * spec.resources.num_workers))
    total_steps = steps_per_epoch * options.epochs
    schedule = (lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))) \
        if options.schedule == "cosine" else (lambda step: 1.0)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
                  for name, optimiser in optimisers.items()}
    generator = torch.Generator().manual_seed(_epoch_seed(options.seed, rank, options.epochs + 1))
    state = TrainState(modules, optimisers, schedulers, generator=generator)
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.load(folder, device)
    for name in list(state.modules):
        state.modules[name] = ray.train.torch.prepare_model(state.modules[name])
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")
    photos = _photo_tensors(ray.train.get_dataset_shard("photos"), options.image_size, device) \
        if config["photo_rows"] else None
    for epoch in range(state.epoch, options.epochs):
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        batches = train_shard.iter_batches(batch_size=options.batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=4 * options.batch_size,
                                           local_shuffle_seed=_epoch_seed(options.seed, rank, epoch))
        for raw in batches:
            batch = _pair_tensors(raw, model_config, device)
            if photos is not None and state.steps["identity_discriminator"] % options.photo_every == 0:
                pick = torch.randint(len(photos["image"]), (options.photo_batch_size,), generator=state.generator)
                real = _photo_pairs(photos, pick, options.photo_pairs, model_config, state.generator)
                batch = {name: torch.cat([batch[name], real[name]]) for name in batch}
            batch = {name: tensor.contiguous(memory_format=torch.channels_last) if tensor.ndim == 4 else tensor
                     for name, tensor in batch.items()}
            pretraining = state.steps["identity_discriminator"] < options.pretrain_steps
            metrics = (pretrain_step if pretraining else gan_step)(state, batch, losses)
            for name in (("identity_discriminator", "expression_discriminator") if pretraining else state.schedulers):
                state.schedulers[name].step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        plain = state.plain("generator").eval()
        error = copied = warped = faces = 0.0
        with torch.no_grad():
            for raw in validation_shard.iter_batches(batch_size=32, batch_format="numpy"):
                batch = _pair_tensors(raw, model_config, device, with_landmarks=True)
                result, _ = generate(plain, batch)
                # The baseline is the frame-anchored piecewise-affine warp, whatever flow G starts from.
                flow = landmark_flow(batch["source_landmarks"], batch["target_landmarks"], baseline_config)
                baseline = F.grid_sample(batch["source"], plain.grid + flow.permute(0, 2, 3, 1),
                                         mode="bilinear", padding_mode="border", align_corners=True)
                error += float((result - batch["target"]).abs().mean()) * len(result)
                copied += float((batch["source"] - batch["target"]).abs().mean()) * len(result)
                warped += float((baseline - batch["target"]).abs().mean()) * len(result)
                faces += len(result)
        report = {"epoch": epoch, **{name if name.endswith("accuracy") else f"loss_{name}": value / counts[name]
                                     for name, value in sums.items()}}
        if faces:
            report.update(l1=error / faces, l1_copy_ratio=error / max(copied, 1e-12),
                          l1_baseline_ratio=error / max(warped, 1e-12))
        report["validation"] = report.get("l1_baseline_ratio", float("nan"))
        state.epoch, state.metrics = epoch + 1, report
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                state.save(os.path.join(folder, "state"))
                checkpoint = ray.train.Checkpoint.from_directory(os.path.join(folder, "state"))
            ray.train.report(report, checkpoint=checkpoint)


def latent_config_for(options) -> "LatentConfig":  # noqa: F821  (imported inside: torch-only module)
    """E's and D's shape from a train job's options."""
    from facecore.models.latent import LatentConfig

    extra = {} if options.identity_layers is None else {"identity_layers": tuple(options.identity_layers)}
    return LatentConfig(image_size=options.image_size, latent_dim=options.latent_dim, channels=options.base_channels,
                        max_channels=options.max_channels, **extra)


def _swap_tensors(raw: dict[str, np.ndarray], size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A block of swap pairs (a ``pairs: swap`` render job's rows) as E, D and the losses take them."""
    from facecore.images import decode_png
    from jobs.kinds.recognize import model_inputs

    from facecore.methods.latent_swap import prior_flows

    batch = {}
    for prefix, name in (("", "source"), ("target_", "target"), ("truth_", "truth")):
        crops = [decode_png(data) for data in raw[f"{prefix}image"]]
        points = np.array([np.asarray(p, np.float32) for p in raw[f"{prefix}landmarks"]]).reshape(len(crops), 68, 2)
        images, points = model_inputs(crops, points, size)
        batch[name] = images.to(device)
        batch[f"{name}_landmarks"] = points.to(device)
    # The warp the swap starts from: the target's face onto the truth's landmarks (the target's with the
    # source's face shape; a job estimates them with the regressor, facecore.methods.latent_swap).
    batch["prior"] = prior_flows(batch["target_landmarks"].cpu().numpy(), batch.pop("truth_landmarks").cpu().numpy(),
                                 size).to(device)
    batch["has_truth"] = torch.ones(len(batch["source"]), device=device)
    # The rig's targets are avatars: no source layer (see facecore.methods.latent_swap.regressed_guides).
    batch["source_layer"] = torch.zeros(len(batch["source"]), 4, size, size, device=device)
    return batch


def _photo_swaps(photos: dict[str, torch.Tensor], pick: torch.Tensor) -> dict[str, torch.Tensor]:
    """Photos ``pick`` as swap pairs, each with the next one picked as its target; no ground truth."""
    from facecore.methods.latent_swap import source_layers

    partner = torch.roll(pick, 1)
    device = photos["image"].device
    source, target = photos["image"][pick.to(device)], photos["image"][partner.to(device)]
    source_landmarks, target_landmarks = photos["landmarks"][pick.to(device)], photos["landmarks"][partner.to(device)]
    return {"source": source, "target": target, "truth": target,
            "source_landmarks": source_landmarks, "target_landmarks": target_landmarks,
            "prior": torch.zeros(len(pick), 2, *source.shape[2:], device=device),  # no face shape known
            # ...so the source layer is the source's face on the target's landmarks.
            "source_layer": source_layers(source, source_landmarks.cpu().numpy(), target,
                                          target_landmarks.cpu().numpy()),
            "has_truth": torch.zeros(len(pick), device=device)}


def swap_loop_per_worker(config: dict[str, Any]) -> None:
    """Face swap's E and D on Ray Train (SPEC.md §2): a TrainState per worker.

    Each step is ``batch_size`` rig pairs with their ground truth and, every
    ``photo_every`` steps, ``photo_batch_size`` aligned photos swapped among
    themselves (no truth: the seed's four losses only). Each epoch reports, on
    held-out rig pairs, the swap's L1 to the truth (``l1_truth``, the
    ``validation`` figure), its ratio to copying the target (``l1_target_ratio``),
    the reconstructions' MSE and the dlib cosine of swap and source
    (``identity_similarity``).
    """
    import ray.train
    import ray.train.torch

    import torch.nn.functional as F

    from facecore.models.identity import IdentityScorer
    from facecore.models.latent import LayeredEncoder, StyledDecoder, composite, mix_layers
    from facecore.models.mobilenet import MobileNetV2Features
    from facecore.training.state import TrainState
    from facecore.training.swap import SwapCritics, SwapLossConfig, swap_step

    spec = TrainJob.model_validate(config["spec"])
    options = spec.options
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    model_config = latent_config_for(options)
    losses = SwapLossConfig(**options.swap_losses.model_dump())
    torch.manual_seed(options.seed)  # every rank starts from the same weights
    modules = {"encoder": LayeredEncoder(model_config).to(device), "decoder": StyledDecoder(model_config).to(device)}
    optimisers = {name: torch.optim.Adam(module.parameters(), lr=options.learning_rate, betas=(0.9, 0.99))
                  for name, module in modules.items()}
    steps_per_epoch = max(1, config["train_rows"] // (options.batch_size * spec.resources.num_workers))
    total_steps = steps_per_epoch * options.epochs
    schedule = (lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))) \
        if options.schedule == "cosine" else (lambda step: 1.0)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
                  for name, optimiser in optimisers.items()}
    generator = torch.Generator().manual_seed(_epoch_seed(options.seed, rank, options.epochs + 1))
    state = TrainState(modules, optimisers, schedulers, generator=generator)
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.load(folder, device)
    for name in list(state.modules):
        state.modules[name] = ray.train.torch.prepare_model(state.modules[name])
    identity = IdentityScorer(device=device) if losses.identity > 0 else None
    critics = SwapCritics(MobileNetV2Features.pretrained().to(device), identity)
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")
    photos = _photo_tensors(ray.train.get_dataset_shard("photos"), options.image_size, device) \
        if config["photo_rows"] else None
    for epoch in range(state.epoch, options.epochs):
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        batches = train_shard.iter_batches(batch_size=options.batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=4 * options.batch_size,
                                           local_shuffle_seed=_epoch_seed(options.seed, rank, epoch))
        for raw in batches:
            batch = _swap_tensors(raw, options.image_size, device)
            if photos is not None and len(photos["image"]) > 1 and state.steps["encoder"] % options.photo_every == 0:
                pick = torch.randperm(len(photos["image"]), generator=state.generator)[:options.photo_batch_size]
                real = _photo_swaps(photos, pick)
                batch = {name: torch.cat([batch[name], real[name]]) for name in batch}
            metrics = swap_step(state, batch, critics, losses)
            for scheduler in state.schedulers.values():
                scheduler.step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        encoder, decoder = state.plain("encoder").eval(), state.plain("decoder").eval()
        figures = {"l1": 0.0, "l1_target": 0.0, "mse": 0.0, "similarity": 0.0}
        faces = 0
        with torch.no_grad():
            for raw in validation_shard.iter_batches(batch_size=32, batch_format="numpy"):
                batch = _swap_tensors(raw, options.image_size, device)
                codes = encoder(torch.cat([batch["source"], batch["target"]]))
                source_codes, target_codes = codes.chunk(2)
                images, placement = decoder(torch.cat([codes, mix_layers(source_codes, target_codes,
                                                                         model_config.identity_layers)]), placed=True)
                inputs, count = torch.cat([batch["source"], batch["target"]]), len(batch["source"])
                swap = composite(images[2 * count:], placement[2 * count:], batch["target"], batch["prior"])
                figures["l1"] += float((swap - batch["truth"]).abs().mean()) * count
                figures["l1_target"] += float((batch["target"] - batch["truth"]).abs().mean()) * count
                figures["mse"] += float((images[:2 * count] - inputs).pow(2).mean()) * count
                if identity is not None:
                    embedded = identity.embed(torch.cat([swap, batch["source"]]) * 255.0, torch.cat(
                        [batch["target_landmarks"], batch["source_landmarks"]]).cpu().numpy())
                    figures["similarity"] += float(F.cosine_similarity(*embedded.chunk(2), dim=1).sum())
                faces += count
        report = {"epoch": epoch, "train_loss": sums.get("total", float("nan")) / max(counts.get("total", 0), 1),
                  **{f"loss_{name}": value / counts[name] for name, value in sums.items() if name != "total"}}
        if faces:
            report.update(l1_truth=figures["l1"] / faces, reconstruction_mse=figures["mse"] / faces,
                          l1_target_ratio=figures["l1"] / max(figures["l1_target"], 1e-12))
            if identity is not None:
                report["identity_similarity"] = figures["similarity"] / faces
        report["validation"] = report.get("l1_truth", float("nan"))
        state.epoch, state.metrics = epoch + 1, report
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                state.save(os.path.join(folder, "state"))
                checkpoint = ray.train.Checkpoint.from_directory(os.path.join(folder, "state"))
            ray.train.report(report, checkpoint=checkpoint)


def _parts(location, field: str) -> list[str]:
    """Paths of a job output's committed parts (listed afresh, as a resume lists them)."""
    if not location.fs.exists(location.path):
        raise FileNotFoundError(f"{field}: {location.uri} does not exist")
    parts = OutputFolder(location).parts()
    if not parts:
        raise FileNotFoundError(f"{field}: no {PART_PREFIX}*{PART_SUFFIX} files in {location.uri}")
    return parts


def _complete(filesystem: pafs.FileSystem, folder: str) -> bool:
    """A checkpoint folder holds every file it should: the TrainState manifest, or (older runs) the model's config."""
    manifest = posixpath.join(folder, "state.json")
    if filesystem.get_file_info(manifest).type != pafs.FileType.File:
        return False
    with filesystem.open_input_stream(manifest) as handle:
        try:
            files = json.loads(handle.read()).get("files")
        except ValueError:
            return False
    if files is None:
        return filesystem.get_file_info(posixpath.join(folder, MODEL_DIR, weights.CONFIG)).type == pafs.FileType.File
    infos = filesystem.get_file_info([posixpath.join(folder, name) for name in files])
    return all(info.type == pafs.FileType.File and info.size == size for info, size in zip(infos, files.values()))


def _latest_checkpoint(storage: str, name: str, filesystem: pafs.FileSystem):
    """The newest complete checkpoint an earlier run of this job left (a half-copied one is skipped)."""
    import ray.train

    folder = posixpath.join(storage, name)
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return None
    complete = sorted(e.path for e in entries if e.type == pafs.FileType.Directory
                      and posixpath.basename(e.path).startswith("checkpoint_") and _complete(filesystem, e.path))
    return ray.train.Checkpoint(complete[-1], filesystem=filesystem) if complete else None


def _checkpoint_state(checkpoint) -> dict[str, Any]:
    """The last epoch's report of a checkpoint (``epoch`` is that epoch's index)."""
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "state.json")) as handle:
            state = json.load(handle)
    return state["metrics"] if "files" in state else state


def train(spec: TrainJob, address: str | None = None) -> dict[str, Any]:
    """Run a training job; return the last epoch's metrics and where the model is."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from facecore.rig import default_schema
    from jobs.pipeline import init_ray

    if not ray.is_initialized():
        init_ray(address)
    location = locate(spec.data.renders, spec.storage)
    parts = _parts(location, "data.renders")
    # Reading is I/O: small CPU claims, so that the training workers, which hold
    # most of the CPUs, never starve the tasks that feed them.
    io = {"num_cpus": 0.25}
    columns = {"imitator": ["key", "status", "params", "image", "mask"], "parser": ["key", "status", "image", "mask"],
               "regressor": ["key", "status", "params", "image", "landmarks"],
               "expression": ["key", "status", "image", "landmarks", "target_image", "target_landmarks"],
               "swap": ["key", "status", "image", "landmarks", "target_image", "target_landmarks", "truth_image",
                        "truth_landmarks"]}[spec.model]
    if spec.model in ("expression", "swap"):
        import pyarrow.parquet as pq

        with location.arrow_fs.open_input_file(parts[0]) as handle:
            names = pq.read_schema(handle).names
        # Which pairs a render holds shows in its columns: truth_* only in swap pairs.
        held = "swap" if "truth_image" in names else "expression" if "target_image" in names else None
        if held != spec.model:
            what = {None: "single renders", "expression": "expression pairs", "swap": "swap pairs"}[held]
            raise ValueError(f"data.renders: {location.uri} holds {what}; model: {spec.model} trains on "
                             f"{spec.model} pairs (a render job with options.pairs: {spec.model})")
    dataset = ray.data.read_parquet(parts, filesystem=location.arrow_fs, columns=columns, **io)
    dataset = dataset.filter(lambda row: row["status"] == "ok", **io)
    photo_rows_count, photo_data = 0, None
    if spec.data.photos and spec.model in ("regressor", "expression", "swap"):
        photos = locate(spec.data.photos, spec.storage)
        photo_data = ray.data.read_parquet(_parts(photos, "data.photos"), filesystem=photos.arrow_fs,
                                           columns=["key", "status", "aligned", "aligned_landmarks"], **io)
        photo_data = photo_data.filter(lambda row: row["status"] == "ok", **io).materialize()
        photo_rows_count = photo_data.count()
        if photo_rows_count == 0:
            raise ValueError(f"data.photos: {photos.uri} has no aligned faces (status ok)")
        if spec.data.photo_identities:
            identities = read_identities(spec.data.photo_identities, spec.storage)
            photo_data = photo_data.map_batches(_with_identity, batch_format="numpy",
                                                fn_kwargs={"identities": identities}, **io).materialize()
            named = photo_data.filter(lambda row: bool(row["identity"]), **io).count()
            if named == 0:
                raise ValueError(f"data.photo_identities: none of its keys is a face of data.photos {photos.uri} "
                                 "(is it the manifest the align job ran on?)")
            log.info("photo identities: %d of %d aligned faces named", named, photo_rows_count)
    if spec.data.photos and spec.model == "parser":
        photos = locate(spec.data.photos, spec.storage)
        photo_parts = _parts(photos, "data.photos")
        aligned = ray.data.read_parquet(photo_parts, filesystem=photos.arrow_fs,
                                        columns=["key", "status", "aligned", "aligned_landmarks"],
                                        **io)
        aligned = aligned.filter(lambda row: row["status"] == "ok", **io)
        # Real photos are few beside thousands of renders: repeating them keeps
        # the real domain visible in every epoch (the parser step jitters colours).
        dataset = dataset.union(aligned.map_batches(photo_rows, batch_format="numpy",
                                                    fn_kwargs={"repeat": spec.data.photo_repeat}, **io))
    threshold = int(spec.data.validation_fraction * 1000)
    holdout = lambda row: zlib.crc32(row["key"].encode()) % 1000 < threshold  # noqa: E731
    # Materialised before the workers start: with the workers holding the CPUs,
    # Ray Data's streaming read inside Ray Train was left no resources and hung
    # here. The encoded renders are small (a few KB each at 64 px).
    train_rows = dataset.filter(lambda row: not holdout(row), **io).materialize()
    validation_rows = dataset.filter(holdout, **io).materialize()
    output = locate(spec.output.path, spec.storage)
    output.fs.makedirs(output.path, exist_ok=True)
    storage_path = posixpath.join(output.path, RUNS_DIR)
    output.arrow_fs.create_dir(storage_path, recursive=True)
    name = f"train-{spec.model}"
    cpus = spec.resources.cpus_per_worker
    if cpus is None:
        # Workers that claim every CPU starve the Ray Data tasks that feed them.
        total = ray.cluster_resources().get("CPU", 1.0)
        cpus = max(0.1, min(1.0, (total - 0.5) / spec.resources.num_workers))
    resume = _latest_checkpoint(storage_path, name, output.arrow_fs)
    done = _checkpoint_state(resume) if resume is not None else None
    if done is not None and done["epoch"] + 1 >= spec.options.epochs:
        # Every epoch is already in the output (e.g. a rerun of a finished job):
        # export the last checkpoint instead of starting workers for nothing.
        log.info("all %d epochs already trained in %s", spec.options.epochs, storage_path)
        checkpoint, metrics = resume, done
    else:
        datasets = {"train": train_rows, "validation": validation_rows}
        if photo_data is not None:
            datasets["photos"] = photo_data  # not split: every worker draws from all of them
        execution = ray.data.ExecutionOptions()
        execution.preserve_order = True  # a fixed seed gives a fixed data order (exact resume)
        on_state = spec.model in ("regressor", "expression", "swap")  # TrainState loops: best and last checkpoints
        loop = {"regressor": regressor_loop_per_worker, "expression": expression_loop_per_worker,
                "swap": swap_loop_per_worker}
        trainer = TorchTrainer(
            loop.get(spec.model, train_loop_per_worker),
            # Ray Train V2 dropped resume_from_checkpoint: the loop loads the newest
            # complete checkpoint of an earlier run itself.
            train_loop_config={"spec": spec.model_dump(), "param_dim": default_schema().vector_size,
                               "train_rows": train_rows.count(), "photo_rows": photo_rows_count,
                               "resume_from": resume},
            scaling_config=ray.train.ScalingConfig(num_workers=spec.resources.num_workers,
                                                   use_gpu=spec.resources.use_gpu, resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=output.arrow_fs,
                # A failed worker is restarted from the last reported checkpoint.
                failure_config=ray.train.FailureConfig(max_failures=spec.resources.max_failures),
                # Ray keeps the latest checkpoint besides the best one(s).
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=spec.options.best_metric,
                    checkpoint_score_order=spec.options.best_mode) if on_state else None),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=execution),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        checkpoint, metrics = result.checkpoint, dict(result.metrics or {})
    exported = {MODEL_DIR: (checkpoint, metrics)}
    if spec.model in ("regressor", "expression", "swap"):
        best = _best_checkpoint(storage_path, name, output.arrow_fs, spec.options.best_metric, spec.options.best_mode)
        if best is not None:
            exported[BEST_DIR] = best
    for folder_name, (source, figures) in exported.items():
        with source.as_directory() as folder:
            model = _load_trained(spec.model, folder)
        destination = output.join(folder_name).uri
        weights.save_model(model, destination, extra=figures,
                           storage_options=fsspec_options(spec.storage, destination))
    return {"metrics": metrics, "model": output.join(MODEL_DIR).uri}


def _load_trained(model: str, folder: str) -> torch.nn.Module:
    from facecore.models.regressor import Regressor

    if model == "regressor":
        return weights.load_model(Regressor, os.path.join(folder, "regressor"))
    if model == "expression":
        from facecore.models.expression import ExpressionGenerator

        return weights.load_model(ExpressionGenerator, os.path.join(folder, "generator"))
    if model == "swap":
        from facecore.models.latent import LatentSwapper, LayeredEncoder, StyledDecoder

        encoder = weights.load_model(LayeredEncoder, os.path.join(folder, "encoder"))
        swapper = LatentSwapper(encoder.config)
        swapper.encoder.load_state_dict(encoder.state_dict())
        swapper.decoder.load_state_dict(weights.load_model(StyledDecoder, os.path.join(folder, "decoder")).state_dict())
        return swapper
    return weights.load_model(Imitator if model == "imitator" else FaceParser, os.path.join(folder, MODEL_DIR))


def _best_checkpoint(storage: str, name: str, filesystem: pafs.FileSystem, metric: str, mode: str):
    """(checkpoint, its metrics) with the best ``metric`` among the complete checkpoints kept."""
    import ray.train

    folder = posixpath.join(storage, name)
    entries = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    scored = []
    for entry in entries:
        if entry.type == pafs.FileType.Directory and posixpath.basename(entry.path).startswith("checkpoint_") \
                and _complete(filesystem, entry.path):
            with filesystem.open_input_stream(posixpath.join(entry.path, "state.json")) as handle:
                figures = json.loads(handle.read()).get("metrics", {})
            value = figures.get(metric)
            if isinstance(value, (int, float)) and not math.isnan(value):
                scored.append((value if mode == "min" else -value, entry.path, figures))
    if not scored:
        return None
    _, path, figures = min(scored)
    return ray.train.Checkpoint(path, filesystem=filesystem), figures
