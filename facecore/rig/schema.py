"""The rig's parameter schema: names, groups, one-hot style groups, the flat vector.

A rig is described by a schema file (YAML). Everything downstream — renderer,
models, jobs — reads sizes and names from a :class:`RigSchema`, never from a
hard-coded count, so a studio's own game rig plugs in as its own schema file.

The flat vector models use is the continuous block (schema order) followed by one
one-hot block per discrete group (schema order).
"""

from __future__ import annotations

import functools
import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import yaml

ParamGroup = Literal["identity", "expression", "pose", "appearance"]
PARAM_GROUPS: tuple[str, ...] = ("identity", "expression", "pose", "appearance")


class SchemaError(ValueError):
    """A schema file, or values checked against a schema, are invalid."""


@dataclass(frozen=True)
class ContinuousParam:
    """A named parameter in [0, 1].

    Attributes:
        name: unique name.
        group: identity | expression | pose | appearance.
        neutral: value in the reference face.
        region: what it moves (free text for user rigs; see default_rig.yaml).
        visible: False when the renderer barely shows it at the sizes models work
            at (see bench/rig_visibility.py): models still output it, quality
            figures report it apart, and nobody should expect to recover it.
    """

    name: str
    group: str
    neutral: float = 0.5
    region: str = ""
    visible: bool = True


@dataclass(frozen=True)
class StyleGroup:
    """A discrete choice fed to models as a one-hot block."""

    name: str
    choices: tuple[str, ...]
    default: str

    @property
    def size(self) -> int:
        return len(self.choices)


@dataclass(frozen=True, eq=False)
class RigSchema:
    """Names, groups and layout of a rig's parameters."""

    name: str
    continuous: tuple[ContinuousParam, ...]
    discrete: tuple[StyleGroup, ...]
    exclusive: tuple[tuple[str, str], ...] = ()
    # Named expressions (``smile``, ``surprise``...): expression parameters away
    # from neutral; every expression parameter not listed stays at its neutral.
    expressions: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [p.name for p in self.continuous] + [g.name for g in self.discrete]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SchemaError(f"schema {self.name}: names used twice: {repeated}")
        for param in self.continuous:
            if param.group not in PARAM_GROUPS:
                raise SchemaError(f"schema {self.name}: {param.name}.group must be one of {PARAM_GROUPS}, "
                                  f"got {param.group!r}")
            if not 0.0 <= param.neutral <= 1.0:
                raise SchemaError(f"schema {self.name}: {param.name}.neutral must be in [0, 1], got {param.neutral}")
        for group in self.discrete:
            if len(group.choices) < 2 or len(set(group.choices)) != len(group.choices):
                raise SchemaError(f"schema {self.name}: {group.name} needs two or more distinct choices")
            if group.default not in group.choices:
                raise SchemaError(f"schema {self.name}: {group.name}.default {group.default!r} "
                                  f"is not one of {list(group.choices)}")
        continuous = set(self.continuous_names)
        for pair in self.exclusive:
            if len(pair) != 2 or not set(pair) <= continuous:
                raise SchemaError(f"schema {self.name}: exclusive pair {list(pair)} must name two continuous params")
        expression = {p.name for p in self.continuous if p.group == "expression"}
        for label, values in self.expressions.items():
            strangers = sorted(set(values) - expression)
            if strangers:
                raise SchemaError(f"schema {self.name}: expressions.{label} sets {strangers}, "
                                  f"which are not expression parameters")
            outside = sorted(name for name, value in values.items() if not 0.0 <= value <= 1.0)
            if outside:
                raise SchemaError(f"schema {self.name}: expressions.{label}: {outside} must be in [0, 1]")

    # -- layout -----------------------------------------------------------------

    @functools.cached_property
    def continuous_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.continuous)

    @property
    def continuous_size(self) -> int:
        return len(self.continuous)

    @property
    def vector_size(self) -> int:
        """Length of the flat vector: continuous block + every one-hot block."""
        return self.continuous_size + sum(g.size for g in self.discrete)

    @functools.cached_property
    def vector_names(self) -> tuple[str, ...]:
        """A name for every slot of the flat vector (``group=choice`` for one-hots)."""
        return self.continuous_names + tuple(f"{g.name}={c}" for g in self.discrete for c in g.choices)

    def group_slice(self, name: str) -> slice:
        """Slice of the flat vector holding a discrete group's one-hot block."""
        start = self.continuous_size
        for group in self.discrete:
            if group.name == name:
                return slice(start, start + group.size)
            start += group.size
        raise SchemaError(f"no discrete group named {name!r} (have {[g.name for g in self.discrete]})")

    def indices(self, group: str) -> np.ndarray:
        """Positions in the continuous block of one parameter group (e.g. "expression")."""
        if group not in PARAM_GROUPS:
            raise SchemaError(f"group must be one of {PARAM_GROUPS}, got {group!r}")
        return np.array([i for i, p in enumerate(self.continuous) if p.group == group], dtype=np.int64)

    @functools.cached_property
    def visible_indices(self) -> np.ndarray:
        """Positions of the continuous parameters not marked ``visible: false``."""
        return np.array([i for i, p in enumerate(self.continuous) if p.visible], dtype=np.int64)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.continuous_names)}

    @functools.cached_property
    def _groups(self) -> dict[str, StyleGroup]:
        return {g.name: g for g in self.discrete}

    # -- values -----------------------------------------------------------------

    def neutral(self) -> dict[str, Any]:
        """The reference face: every parameter at its neutral value, default styles."""
        values: dict[str, Any] = {p.name: p.neutral for p in self.continuous}
        values.update({g.name: g.default for g in self.discrete})
        return values

    def reference_vector(self) -> np.ndarray:
        return self.encode(self.neutral())

    def complete(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Neutral values overridden by ``values`` (validated)."""
        merged = self.neutral()
        merged.update(values)
        self.encode(merged)  # validates
        return merged

    def encode(self, values: Mapping[str, Any]) -> np.ndarray:
        """Named values → flat float32 vector. Every name must be given.

        Raises:
            SchemaError: unknown or missing names, values outside [0, 1], unknown
                choices, or both sides of an exclusive pair active.
        """
        unknown = sorted(set(values) - set(self.continuous_names) - set(self._groups))
        if unknown:
            raise SchemaError(f"unknown parameters {unknown} for rig {self.name}")
        missing = [n for n in list(self.continuous_names) + list(self._groups) if n not in values]
        if missing:
            raise SchemaError(f"missing parameters {missing[:8]}{'...' if len(missing) > 8 else ''} "
                              f"for rig {self.name}")
        vector = np.zeros(self.vector_size, dtype=np.float32)
        for i, name in enumerate(self.continuous_names):
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise SchemaError(f"{name}: expected a number in [0, 1], got {value!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise SchemaError(f"{name}: {value} is outside [0, 1]")
            vector[i] = float(value)
        for first, second in self.exclusive:
            if values[first] > 0 and values[second] > 0:
                raise SchemaError(f"{first} and {second} are mutually exclusive: "
                                  f"got {values[first]} and {values[second]}")
        for group in self.discrete:
            choice = values[group.name]
            if choice not in group.choices:
                raise SchemaError(f"{group.name}: {choice!r} is not one of {list(group.choices)}")
            vector[self.group_slice(group.name).start + group.choices.index(choice)] = 1.0
        return vector

    def decode(self, vector: np.ndarray) -> dict[str, Any]:
        """Flat vector → named values.

        Tolerant of model outputs: continuous values are clipped to [0, 1], each
        one-hot block (or relaxed soft block) picks its largest entry, and of an
        exclusive pair only the stronger side is kept.
        """
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.vector_size,):
            raise SchemaError(f"expected a vector of {self.vector_size} values for rig {self.name}, "
                              f"got shape {vector.shape}")
        values: dict[str, Any] = {
            name: float(np.clip(vector[i], 0.0, 1.0)) for i, name in enumerate(self.continuous_names)
        }
        for first, second in self.exclusive:
            weaker = second if values[first] >= values[second] else first
            values[weaker] = 0.0
        for group in self.discrete:
            block = vector[self.group_slice(group.name)]
            values[group.name] = group.choices[int(np.argmax(block))]
        return values

    def sample(self, rng: np.random.Generator, count: int,
               fixed: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Random parameter sets: continuous uniform in [0, 1], styles uniform.

        Uniform sampling is what the seeds train the imitator on. Of each
        exclusive pair one side, chosen at random, is set to 0. ``fixed`` holds
        named parameters at given values.
        """
        fixed = dict(fixed or {})
        self.complete(fixed)  # validate the fixed values up front
        continuous = rng.random((count, self.continuous_size))
        sides = rng.integers(0, 2, size=(count, len(self.exclusive)))
        choices = [rng.integers(0, g.size, size=count) for g in self.discrete]
        samples = []
        for row in range(count):
            values: dict[str, Any] = {n: float(continuous[row, i]) for i, n in enumerate(self.continuous_names)}
            for pair_index, pair in enumerate(self.exclusive):
                values[pair[int(sides[row, pair_index])]] = 0.0
            for group, picks in zip(self.discrete, choices):
                values[group.name] = group.choices[int(picks[row])]
            values.update(fixed)
            samples.append(values)
        return samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "continuous": [{"name": p.name, "group": p.group, "neutral": p.neutral, "region": p.region,
                            **({} if p.visible else {"visible": False})} for p in self.continuous],
            "discrete": [{"name": g.name, "choices": list(g.choices), "default": g.default} for g in self.discrete],
            "exclusive": [list(pair) for pair in self.exclusive],
            **({"expressions": {label: dict(values) for label, values in self.expressions.items()}}
               if self.expressions else {}),
        }

    def expression_values(self, label: str) -> dict[str, float]:
        """Every expression parameter of the named expression ``label`` (the unlisted at neutral)."""
        if label not in self.expressions:
            raise KeyError(f"rig {self.name} has no expression {label!r}; it has {sorted(self.expressions)}")
        given = self.expressions[label]
        return {p.name: float(given.get(p.name, p.neutral)) for p in self.continuous if p.group == "expression"}


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {value!r}")
    return value


def schema_from_dict(data: Mapping[str, Any], source: str = "schema") -> RigSchema:
    """Build a schema from its YAML form, naming the bad entry on error."""
    if not isinstance(data, Mapping):
        raise SchemaError(f"{source}: expected a mapping with 'continuous' and 'discrete'")
    unknown = sorted(set(data) - {"name", "version", "continuous", "discrete", "exclusive", "expressions"})
    if unknown:
        raise SchemaError(f"{source}: unknown fields {unknown}")
    continuous = []
    for i, entry in enumerate(data.get("continuous") or []):
        try:
            continuous.append(ContinuousParam(
                name=str(entry["name"]),
                group=str(entry.get("group", "identity")),
                neutral=float(entry.get("neutral", 0.5)),
                region=str(entry.get("region", "")),
                visible=_flag(entry.get("visible", True), "visible"),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"{source}: continuous[{i}]: {exc!r}") from None
    discrete = []
    for i, entry in enumerate(data.get("discrete") or []):
        try:
            choices = tuple(str(c) for c in entry["choices"])
            discrete.append(StyleGroup(name=str(entry["name"]), choices=choices,
                                       default=str(entry.get("default", choices[0]))))
        except (KeyError, TypeError, IndexError) as exc:
            raise SchemaError(f"{source}: discrete[{i}]: {exc!r}") from None
    if not continuous:
        raise SchemaError(f"{source}: a rig needs at least one continuous parameter")
    exclusive = tuple(tuple(str(n) for n in pair) for pair in data.get("exclusive") or [])
    expressions = {}
    for label, values in (data.get("expressions") or {}).items():
        try:
            expressions[str(label)] = {str(name): float(value) for name, value in dict(values).items()}
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"{source}: expressions.{label}: {exc!r}") from None
    return RigSchema(name=str(data.get("name", source)), continuous=tuple(continuous),
                     discrete=tuple(discrete), exclusive=exclusive,  # type: ignore[arg-type]
                     expressions=expressions)


def load_schema(path: str | Path) -> RigSchema:
    """Read a rig schema YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SchemaError(f"cannot read rig schema {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SchemaError(f"{path}: not valid YAML: {exc}") from None
    return schema_from_dict(data, source=str(path))


@functools.cache
def default_schema() -> RigSchema:
    """The built-in rig drawn by :class:`facecore.rig.Renderer`."""
    text = resources.files("facecore.rig").joinpath("default_rig.yaml").read_text()
    return schema_from_dict(yaml.safe_load(text), source="default_rig.yaml")
