"""Everything a training run needs to stop and go on exactly: :class:`TrainState`.

A GAN trains several networks at once, each with its own optimiser, schedule and
update count; a resumed run must continue every one of them, and the random
streams that pick noise and augmentations, from where they were. A TrainState
holds them all and writes them as one checkpoint folder:

- ``<module>/config.json + model.safetensors`` per network (``facecore.weights``:
  no pickle; the folder of the main network is what jobs export);
- ``<module>.optimizer.pt`` / ``<module>.scheduler.pt``: plain state dicts of
  tensors and numbers (loaded with ``weights_only=True``);
- ``rng.pt``: the run's torch generator and the global torch RNG;
- ``state.json``, written last: epoch, step counters, metrics, and the size of
  every other file. A folder whose files do not all match it is incomplete (an
  upload cut short, a crash mid-write) and :func:`is_complete` says so, whatever
  order a copy wrote the files in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from facecore import weights

STATE = "state.json"
RNG = "rng.pt"


def _plain(module: nn.Module) -> nn.Module:
    """The network inside a DDP (or similar) wrapper."""
    return module.module if hasattr(module, "module") else module


@dataclass
class TrainState:
    """Networks, optimisers, schedulers, step counters and random streams of one run.

    Attributes:
        modules: name → network (DDP-wrapped or not); the first is the main one.
        optimisers: name → optimiser, same names as the modules they update.
        schedulers: name → LR scheduler (optional per module).
        steps: name → updates applied to that module so far.
        epoch: epochs finished.
        generator: the run's own random stream (noise, augmentation choices);
            seeded per rank by the caller.
        metrics: the last reported figures (saved with the checkpoint).
    """

    modules: dict[str, nn.Module]
    optimisers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted((set(self.optimisers) | set(self.schedulers)) - set(self.modules))
        if unknown:
            raise ValueError(f"optimisers/schedulers for unknown modules: {unknown}")
        for name in self.modules:
            self.steps.setdefault(name, 0)

    def plain(self, name: str) -> nn.Module:
        return _plain(self.modules[name])

    def save(self, folder: str) -> None:
        """Write the checkpoint into ``folder`` (created), atomically on a local disk.

        Files go to a sibling temporary folder that is renamed into place, and
        ``state.json`` lists every file's size, so even a copy that lands file by
        file elsewhere (Ray Train's upload) is recognisably complete or not.
        """
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".partial-", dir=parent)
        try:
            for name in self.modules:
                weights.save_model(self.plain(name), os.path.join(staging, name))
            for name, optimiser in self.optimisers.items():
                torch.save(optimiser.state_dict(), os.path.join(staging, f"{name}.optimizer.pt"))
            for name, scheduler in self.schedulers.items():
                torch.save(scheduler.state_dict(), os.path.join(staging, f"{name}.scheduler.pt"))
            torch.save({"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
                       os.path.join(staging, RNG))
            files = {}
            for root, _, names in os.walk(staging):
                for name in names:
                    path = os.path.join(root, name)
                    files[os.path.relpath(path, staging)] = os.path.getsize(path)
            with open(os.path.join(staging, STATE), "w") as handle:
                json.dump({"epoch": self.epoch, "steps": self.steps, "metrics": self.metrics,
                           "modules": list(self.modules), "files": files}, handle, indent=2, sort_keys=True)
            if os.path.exists(folder):
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def load(self, folder: str, device: torch.device | str = "cpu") -> None:
        """Restore everything :meth:`save` wrote; the modules keep their wrappers."""
        if not is_complete(folder):
            raise weights.CheckpointError(f"{folder} is not a complete training checkpoint")
        with open(os.path.join(folder, STATE)) as handle:
            state = json.load(handle)
        missing = sorted(set(self.modules) - set(state["modules"]))
        if missing:
            raise weights.CheckpointError(f"{folder} has no state for modules {missing}")
        for name in self.modules:
            plain = self.plain(name)
            restored = weights.load_model(type(plain), os.path.join(folder, name), device=device)
            plain.load_state_dict(restored.state_dict())
        for name, optimiser in self.optimisers.items():
            optimiser.load_state_dict(torch.load(os.path.join(folder, f"{name}.optimizer.pt"),
                                                 map_location=device, weights_only=True))
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(torch.load(os.path.join(folder, f"{name}.scheduler.pt"), weights_only=True))
        rng = torch.load(os.path.join(folder, RNG), weights_only=True)
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        self.epoch = int(state["epoch"])
        self.steps = {name: int(state["steps"].get(name, 0)) for name in self.modules}
        self.metrics = dict(state.get("metrics", {}))


def read_state(folder: str) -> dict[str, Any]:
    """``state.json`` of a checkpoint folder (epoch, steps, metrics, files)."""
    with open(os.path.join(folder, STATE)) as handle:
        return json.load(handle)


def is_complete(folder: str) -> bool:
    """True when ``folder`` holds a whole checkpoint: its state file and every file it lists, at its size."""
    try:
        files = read_state(folder)["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


@contextlib.contextmanager
def no_sync(*modules: nn.Module | None):
    """Backward passes inside neither synchronise nor (under DDP) all-reduce the gradients of ``modules``.

    For the networks a phase does not update (a GAN's discriminators in the
    generator's step, and back): their gradients are dropped afterwards, so
    synchronising them would be wasted traffic. Modules that are not DDP-wrapped,
    and None, are passed over.
    """
    with contextlib.ExitStack() as stack:
        for module in modules:
            if module is not None and hasattr(module, "no_sync"):
                stack.enter_context(module.no_sync())
        yield
