"""The models the project ships: a 64-px imitator (every pose, aligned), a face parser, the regressor,
expression transfer's G and face swap's E and D.

Built by ``scripts/train-presets`` (the render, align and ``facejobs train`` specs
in ``presets/``) and committed as config.json + model.safetensors folders. A
pinch, recognize, transfer or swap spec without ``models:`` uses them.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent
PRESETS = ("imitator", "parser", "regressor", "expression", "swap")


def preset_path(name: str) -> str:
    """The folder of a shipped model, checked to exist."""
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r}; presets are {PRESETS}")
    folder = PRESET_DIR / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"preset {name} is missing from {folder}; build it with scripts/train-presets")
    return str(folder)
