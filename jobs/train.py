"""Ray Train loops around facecore's pure training steps.

``train(spec)`` reads a render job's output as a Ray Dataset, splits off a
validation set by key hash, and runs a ``TorchTrainer`` (DDP over
``resources.num_workers``). Every epoch rank 0 reports a checkpoint (the model as
config.json + model.safetensors, the optimiser state, the epoch); a second run
over the same output resumes from the newest one. The finished model is written
to ``<output>/model/``, the folder job specs point at.
"""

from __future__ import annotations

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
from jobs.storage import fsspec_options, locate

log = logging.getLogger(__name__)

MODEL_DIR = "model"
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


def _parts(location, field: str) -> list[str]:
    """Paths of a job output's committed parts (listed afresh, as a resume lists them)."""
    if not location.fs.exists(location.path):
        raise FileNotFoundError(f"{field}: {location.uri} does not exist")
    parts = OutputFolder(location).parts()
    if not parts:
        raise FileNotFoundError(f"{field}: no {PART_PREFIX}*{PART_SUFFIX} files in {location.uri}")
    return parts


def _latest_checkpoint(storage: str, name: str, filesystem: pafs.FileSystem):
    import ray.train

    folder = posixpath.join(storage, name)
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return None
    complete = sorted(e.path for e in entries if e.type == pafs.FileType.Directory
                      and posixpath.basename(e.path).startswith("checkpoint_")
                      and filesystem.get_file_info(posixpath.join(e.path, MODEL_DIR, weights.CONFIG)).type
                      == pafs.FileType.File)
    return ray.train.Checkpoint(complete[-1], filesystem=filesystem) if complete else None


def _checkpoint_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "state.json")) as handle:
            return json.load(handle)


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
    columns = ["key", "status", "params", "image", "mask"] if spec.model == "imitator" else \
        ["key", "status", "image", "mask"]
    dataset = ray.data.read_parquet(parts, filesystem=location.arrow_fs, columns=columns, **io)
    dataset = dataset.filter(lambda row: row["status"] == "ok", **io)
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
        trainer = TorchTrainer(
            train_loop_per_worker,
            # Ray Train V2 dropped resume_from_checkpoint: the loop loads the newest
            # complete checkpoint of an earlier run itself.
            train_loop_config={"spec": spec.model_dump(), "param_dim": default_schema().vector_size,
                               "train_rows": train_rows.count(), "resume_from": resume},
            scaling_config=ray.train.ScalingConfig(num_workers=spec.resources.num_workers,
                                                   use_gpu=spec.resources.use_gpu, resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(name=name, storage_path=storage_path, storage_filesystem=output.arrow_fs),
            datasets={"train": train_rows, "validation": validation_rows},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        checkpoint, metrics = result.checkpoint, dict(result.metrics or {})
    with checkpoint.as_directory() as folder:
        model = weights.load_model(Imitator if spec.model == "imitator" else FaceParser,
                                   os.path.join(folder, MODEL_DIR))
    destination = output.join(MODEL_DIR).uri
    weights.save_model(model, destination, extra=metrics, storage_options=fsspec_options(spec.storage, destination))
    return {"metrics": metrics, "model": destination}
