"""Model checkpoints: ``config.json`` + ``model.safetensors`` in a folder, at any URI.

A checkpoint folder rebuilds its model from the config (the constructor's frozen
dataclass) and loads tensors with safetensors, so no file is ever unpickled. The
folder may be local or on object storage (anything fsspec opens: ``s3://``...).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any, TypeVar

import fsspec
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

CONFIG = "config.json"
WEIGHTS = "model.safetensors"

ModelT = TypeVar("ModelT", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or for another model."""


def _config_dict(config: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"a model's config must be a dataclass, got {type(config).__name__}")
    return dataclasses.asdict(config)


def _tuples(value: Any) -> Any:
    # JSON has no tuples; frozen configs use them for hashable sequences.
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def save_model(model: nn.Module, uri: str, extra: dict[str, Any] | None = None,
               storage_options: dict[str, Any] | None = None) -> None:
    """Write ``model.config`` and its state dict into the folder ``uri``."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    document = {"class": type(model).__name__, "config": _config_dict(model.config), "extra": extra or {}}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with fs.open(posixpath.join(path, WEIGHTS), "wb") as handle:
        handle.write(save_tensors(state))
    # The config goes last: a folder with a config.json is a complete checkpoint.
    with fs.open(posixpath.join(path, CONFIG), "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)


def load_model(cls: type[ModelT], uri: str, device: str | torch.device = "cpu",
               storage_options: dict[str, Any] | None = None) -> ModelT:
    """Rebuild a model of class ``cls`` from the checkpoint folder ``uri``."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    config_path = posixpath.join(path, CONFIG)
    if not fs.exists(config_path):
        raise CheckpointError(f"no checkpoint at {uri}: {CONFIG} is missing")
    document = json.loads(fs.cat_file(config_path))
    if document.get("class") != cls.__name__:
        raise CheckpointError(f"{uri} holds a {document.get('class')}, not a {cls.__name__}")
    config_type = _config_type(cls)
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(document["config"]) - fields)
    if unknown:
        raise CheckpointError(f"{uri}: config fields {unknown} are unknown to {config_type.__name__}")
    config = config_type(**{k: _tuples(v) for k, v in document["config"].items()})
    model = cls(config)
    state = load_tensors(fs.cat_file(posixpath.join(path, WEIGHTS)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{uri}: weights do not fit {cls.__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.to(device)


def read_extra(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``extra`` dict saved beside a checkpoint (e.g. training step, metrics)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return json.loads(fs.cat_file(posixpath.join(path, CONFIG))).get("extra", {})


def _config_type(cls: type[nn.Module]) -> type:
    annotation = cls.__init__.__annotations__.get("config")
    if isinstance(annotation, str):
        import sys

        annotation = getattr(sys.modules[cls.__module__], annotation, None)
    if annotation is None or not dataclasses.is_dataclass(annotation):
        raise TypeError(f"{cls.__name__}.__init__ must take a dataclass `config` argument")
    return annotation
