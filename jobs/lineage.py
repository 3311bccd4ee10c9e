"""Lineage: what made an output, and whether a rerun may add to it.

``_SUCCESS`` records the spec (specs hold no secrets: credentials come from the
environment), its sha256, the versions of facejobs and its engines, every model
file with its sha256, times, nodes and devices. Each part carries the run id and
the spec hash in its Parquet metadata.

The *fingerprint* covers what decides a row's content: the kind, its options and
the sha256 of every model file. ``_JOB`` in the output folder keeps the
fingerprint the output was made with; a rerun with another one is refused,
naming what differs, unless the run allows a spec change (then ``_JOB`` lists
the runs and the fingerprint each wrote with).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from jobs.output import OutputFolder
from jobs.spec import JobSpec, StorageSpec

JOB_FILE = "_JOB"


class SpecChanged(ValueError):
    """The output was written by a job with other settings."""


def canonical(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def spec_document(spec: JobSpec) -> dict[str, Any]:
    """The spec as JSON values, every default filled in."""
    return spec.model_dump(mode="json")


def spec_sha256(spec: JobSpec) -> str:
    return sha256_text(canonical(spec_document(spec)))


@lru_cache(maxsize=64)
def _file_sha256(uri: str, storage_json: str, size: int | None, mtime: float | None) -> str:
    from jobs.storage import locate

    location = locate(uri, StorageSpec.model_validate_json(storage_json))
    digest = hashlib.sha256()
    with location.fs.open(location.path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(uri: str, storage: StorageSpec | None = None) -> str:
    """sha256 of a file's bytes (cached per process for unchanged local files)."""
    storage = storage or StorageSpec()
    size = mtime = None
    if os.path.exists(uri):
        stat = os.stat(uri)
        size, mtime = stat.st_size, stat.st_mtime
    return _file_sha256(uri, storage.model_dump_json(), size, mtime)


def model_hashes(files: dict[str, str], storage: StorageSpec | None = None) -> dict[str, dict[str, str]]:
    """Every model file of a job with its sha256."""
    return {name: {"uri": uri, "sha256": file_sha256(uri, storage)} for name, uri in sorted(files.items())}


def fingerprint_settings(spec: JobSpec, options: dict[str, Any], models: dict[str, dict[str, str]]) -> dict:
    """What decides a row's content: kind, options, model weights (not where they live)."""
    return {"kind": spec.kind, "options": options,
            "models": {name: entry["sha256"] for name, entry in models.items()}}


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON documents differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    if old != new:
        return [f"{prefix or 'spec'}: {old!r} -> {new!r}"]
    return []


def check_rerun(folder: OutputFolder, settings: dict, allow_change: bool) -> str | None:
    """Refuse to add to an output made with other settings, unless allowed.

    Returns:
        A note on the change when it was allowed, else None.

    Raises:
        SpecChanged: naming the settings that differ.
    """
    recorded = folder.read_json(JOB_FILE)
    if recorded is not None:
        old = recorded["settings"]
    else:
        metadata = folder.part_metadata()
        if metadata is None or "facejobs.kind" not in metadata:
            return None  # a new output, or parts that say nothing of what made them
        # An output from before _JOB existed: its parts still say kind and options.
        old = {"kind": metadata.get("facejobs.kind"),
               "options": json.loads(metadata.get("facejobs.options", "{}"))}
        settings = {"kind": settings["kind"], "options": settings["options"]}
    changed = differences(old, settings)
    if not changed:
        return None
    summary = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
    if not allow_change:
        raise SpecChanged(f"{folder.location.uri} was written by a job with other settings ({summary}); "
                          "use a new output path, or rerun with --allow-spec-change to add rows made "
                          "with the new settings")
    return f"spec changed and allowed: {summary}"


def record_run(folder: OutputFolder, settings: dict, run: dict[str, Any]) -> None:
    """Add this run to ``_JOB`` (created on the first run); the newest settings lead."""
    recorded = folder.read_json(JOB_FILE) or {"runs": []}
    fingerprint = sha256_text(canonical(settings))
    runs = recorded.get("runs", []) + [{**run, "fingerprint": fingerprint}]
    folder.write_json(JOB_FILE, {"settings": settings, "fingerprint": fingerprint, "runs": runs})


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """facejobs and the engines under it; the git commit when run from a checkout."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name, distribution in (("facejobs", "facejobs"), ("ray", "ray"), ("torch", "torch"), ("dlib", "dlib-bin"),
                               ("pyarrow", "pyarrow"), ("numpy", "numpy")):
        try:
            found[name] = importlib_metadata.version(distribution)
        except importlib_metadata.PackageNotFoundError:
            found[name] = None
    found["git_commit"] = _git_commit()
    return found


def _git_commit() -> str | None:
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
