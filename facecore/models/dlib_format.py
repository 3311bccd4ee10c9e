"""Reading dlib's serialised DNN files (``.dat``) without dlib and without pickle.

dlib writes a network recursively: the loss layer, then each layer's version
number from the outermost layer inwards, the input layer, and then each layer's
details (name, hyper-parameters, a parameter tensor) from the input outwards,
each followed by its training state (flags and tensors we skip).

Primitives (dlib/serialize.h, dlib/cuda/tensor.h):
* integer: a control byte (low 4 bits: byte count, 0x80: negative), then the
  magnitude's bytes, little-endian;
* float/double: an integer mantissa and an integer exponent;
* bool: the character '1' or '0'; string: a length, then the bytes;
* tensor (version 2): n, k, nr, nc, then n*k*nr*nc little-endian float32;
  alias tensor (version 1): only n, k, nr, nc (a view into a parameter tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DlibFormatError(ValueError):
    """The file is not a dlib network of the expected form."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def integer(self) -> int:
        if self.pos >= len(self.data):
            raise DlibFormatError("unexpected end of file")
        control = self.data[self.pos]
        size = control & 0x0F
        if size > 8:
            raise DlibFormatError(f"bad integer control byte 0x{control:02x} at offset {self.pos}")
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if control & 0x80 else value

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0**exponent

    def boolean(self) -> bool:
        char = self.data[self.pos:self.pos + 1]
        self.pos += 1
        if char not in (b"0", b"1"):
            raise DlibFormatError(f"expected a bool at offset {self.pos - 1}, got {char!r}")
        return char == b"1"

    def string(self) -> str:
        length = self.integer()
        if not 0 <= length < 1024:
            raise DlibFormatError(f"implausible string length {length} at offset {self.pos}")
        text = self.data[self.pos:self.pos + length]
        self.pos += length
        return text.decode("ascii", errors="replace")

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibFormatError(f"tensor version {version} at offset {self.pos}; expected 2")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        end = self.pos + 4 * count
        if count < 0 or end > len(self.data):
            raise DlibFormatError(f"tensor of shape {shape} runs past the end of the file")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).reshape(shape)
        self.pos = end
        return values.astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.integer()
        if version != 1:
            raise DlibFormatError(f"alias tensor version {version} at offset {self.pos}; expected 1")
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]


@dataclass
class DlibLayer:
    """One layer's details: its dlib name and what it holds."""

    kind: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class DlibNet:
    """A parsed network: the input layer and the layers from input to output."""

    loss: str
    loss_values: tuple[float, ...]
    input_kind: str
    input_mean: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[DlibLayer]  # input side first; tag and skip layers carry no details

    def of_kind(self, kind: str) -> list[DlibLayer]:
        return [layer for layer in self.layers if layer.kind == kind]


def _details(reader: _Reader) -> DlibLayer:
    name = reader.string()
    if name in ("con_4", "con_5", "con_6"):
        params = reader.tensor()
        num_filters = reader.integer()
        rows, cols = reader.integer(), reader.integer()
        stride = (reader.integer(), reader.integer())
        padding = (reader.integer(), reader.integer())
        filters, biases = reader.alias(), reader.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.real()
        use_bias = reader.boolean() if name != "con_4" else True
        if name == "con_6":
            reader.boolean()  # use_relu
        flat = params.reshape(-1)
        weight_count = int(np.prod(filters))
        weight = flat[:weight_count].reshape(filters)
        bias = flat[weight_count:weight_count + int(np.prod(biases))] if use_bias else None
        if weight.shape[0] != num_filters or weight.shape[2:] != (rows, cols):
            raise DlibFormatError(f"{name}: filters {weight.shape} disagree with {num_filters}x{rows}x{cols}")
        return DlibLayer("con", {"weight": weight, "bias": bias, "stride": stride, "padding": padding})
    if name in ("affine_", "affine_2"):
        params = reader.tensor().reshape(-1)
        gamma, beta = reader.alias(), reader.alias()
        mode = reader.integer()
        disabled = reader.boolean() if name == "affine_2" else False
        count = int(np.prod(gamma))
        beta_values = params[count:count + int(np.prod(beta))].copy()
        return DlibLayer("affine", {"gamma": params[:count].copy(), "beta": beta_values,
                                    "mode": mode, "disabled": disabled})
    if name in ("relu_", "relu_2"):
        disabled = reader.boolean() if name == "relu_2" else False
        return DlibLayer("relu", {"disabled": disabled})
    if name in ("max_pool_2", "avg_pool_2"):
        rows, cols = reader.integer(), reader.integer()
        stride = (reader.integer(), reader.integer())
        padding = (reader.integer(), reader.integer())
        return DlibLayer(name[:-2], {"size": (rows, cols), "stride": stride, "padding": padding})
    if name == "add_prev_":
        return DlibLayer("add_prev")
    if name in ("fc_2", "fc_3"):
        outputs, inputs = reader.integer(), reader.integer()
        params = reader.tensor().reshape(-1)
        weights, biases = reader.alias(), reader.alias()
        bias_mode = reader.integer()
        for _ in range(4):
            reader.real()
        use_bias = reader.boolean() if name == "fc_3" else True
        weight = params[:int(np.prod(weights))].reshape(weights[0], weights[1])
        if weight.shape != (inputs, outputs):
            raise DlibFormatError(f"{name}: weights {weight.shape}, expected ({inputs}, {outputs})")
        bias = None
        if bias_mode == 0 and use_bias and np.prod(biases) > 0:
            bias = params[int(np.prod(weights)):int(np.prod(weights)) + int(np.prod(biases))].copy()
        return DlibLayer("fc", {"weight": weight.copy(), "bias": bias})
    raise DlibFormatError(f"layer type {name!r} is not supported")


def read_dlib_net(path: str | Path) -> DlibNet:
    """Parse a dlib DNN ``.dat`` file (metric-loss networks such as dlib's face ResNet)."""
    reader = _Reader(Path(path).read_bytes())
    loss_version = reader.integer()
    loss = reader.string()
    if not loss.startswith("loss_metric"):
        raise DlibFormatError(f"expected a loss_metric network, found {loss!r} (version {loss_version})")
    loss_values = (reader.real(), reader.real())  # margin, distance threshold
    # Layer versions, outermost first: 2 = a layer, 1 = a tag or skip layer, and
    # 2 or 3 for the innermost layer, which holds the input layer.
    versions = []
    while True:
        version = reader.integer()
        versions.append(version)
        if version == 3 or len(versions) > 10_000:
            break
        if reader.data[reader.pos] == 0x01 and reader.data[reader.pos + 1] > 3:
            break  # the next thing is a string: the input layer's name
    input_kind = reader.string()
    if not input_kind.startswith("input_rgb_image"):
        raise DlibFormatError(f"unsupported input layer {input_kind!r}")
    mean = (reader.real(), reader.real(), reader.real())
    size = (reader.integer(), reader.integer()) if input_kind == "input_rgb_image_sized" else (0, 0)
    layers: list[DlibLayer] = []
    innermost = True
    for version in reversed(versions):
        if version == 1:
            continue  # tag/skip: wiring only
        layers.append(_details(reader))
        for _ in range(3):  # setup called, gradient stale, output/gradient disabled
            reader.boolean()
        for _ in range(3):  # x_grad, cached_output, params_grad / grad_final
            reader.tensor()
        if innermost and version == 3:
            reader.integer()  # sample expansion factor
        innermost = False
    return DlibNet(loss=loss, loss_values=loss_values, input_kind=input_kind, input_mean=mean,
                   input_size=size, layers=layers)
