"""The demo: an align job over real sample photos and a few broken files.

Everything runs on embedded defaults: a local Ray, local files, dlib's packaged
models. The inputs are the sample photos of :mod:`jobs.samples` plus the
bad-input corpus, so the output shows every status a real job produces.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from jobs.manifest import write_manifest
from jobs.output import RunSummary
from jobs.samples import bad_input_corpus, sample_photos, write_corpus
from jobs.spec import load_spec


def prepare_demo(folder: Path) -> Path:
    """Write inputs, a manifest and a spec under ``folder``; return the spec path."""
    folder = folder.resolve()
    photos = sample_photos()
    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    uris = []
    for name, path in sorted(photos.items()):
        target = inputs / name
        target.write_bytes(path.read_bytes())
        uris.append(f"inputs/{name}")
    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    for path in write_corpus(inputs / "corpus", corpus):
        uris.append(f"inputs/corpus/{path.name}")
    write_manifest(uris, str(folder / "manifest.parquet"))
    spec = {
        "kind": "align",
        "input": {"manifest": str(folder / "manifest.parquet")},
        "output": {"path": str(folder / "aligned")},
        "options": {"faces": "all", "size": 256},
        "resources": {"concurrency": 2, "batch_size": 4},
    }
    spec_path = folder / "align.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


def run_demo(folder: Path, progress: bool = True) -> RunSummary:
    from jobs.pipeline import run

    spec_path = prepare_demo(folder)
    print(f"demo spec: {spec_path}")
    return run(load_spec(spec_path), progress=progress)
