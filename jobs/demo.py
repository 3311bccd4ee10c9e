"""The demo: align, recognize, pinch and transfer jobs over real sample photos and broken files.

Everything runs on embedded defaults: a local Ray, local files, dlib's packaged
models and the imitator, parser, regressor and expression G the project ships
(``facecore.presets``). The inputs are the sample photos of :mod:`jobs.samples`
plus the bad-input corpus, so the output shows every status a real job produces;
the recognize, pinch and transfer outputs get an HTML contact sheet each.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from jobs.manifest import write_manifest
from jobs.output import RunSummary
from jobs.samples import bad_input_corpus, copy_sample_photos, sample_photos, write_corpus
from jobs.spec import load_spec


def prepare_demo(folder: Path) -> list[Path]:
    """Write inputs, a manifest and the job specs under ``folder``; return the spec paths."""
    folder = folder.resolve()
    photos = sample_photos()
    inputs = folder / "inputs"
    uris = [f"inputs/{path.name}" for path in copy_sample_photos(inputs)]
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
    recognize = {
        "kind": "recognize",  # no models: the shipped preset
        "input": {"manifest": str(folder / "manifest.parquet")},
        "output": {"path": str(folder / "recognize")},
        "options": {"faces": "all"},
        "resources": {"concurrency": 1, "batch_size": 8},
    }
    pinch = {
        "kind": "pinch",  # no models: the shipped presets
        "input": {"manifest": str(folder / "manifest.parquet")},
        "output": {"path": str(folder / "pinch")},
        "options": {"faces": "all"},
        "resources": {"concurrency": 1, "batch_size": 8},
    }
    transfer = {
        "kind": "transfer",  # no models: the shipped presets
        "input": {"manifest": str(folder / "manifest.parquet")},
        "output": {"path": str(folder / "transfer")},
        "options": {"targets": {"expressions": ["smile", "surprise", "eyes_closed"]}},
        "resources": {"concurrency": 1, "batch_size": 8},
    }
    paths = []
    for name, document in (("align", spec), ("recognize", recognize), ("pinch", pinch), ("transfer", transfer)):
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        paths.append(path)
    return paths


def run_demo(folder: Path, progress: bool = True) -> list[tuple[Path, RunSummary]]:
    """Run the demo's jobs in turn; return each spec with its summary."""
    from jobs.pipeline import run
    from jobs.report import write_report

    results = []
    for spec_path in prepare_demo(folder):
        print(f"demo spec: {spec_path}")
        spec = load_spec(spec_path)
        summary = run(spec, progress=progress)
        results.append((spec_path, summary))
        if spec.kind in ("recognize", "pinch", "transfer"):
            print(f"{spec.kind} contact sheet: {write_report(spec.output.path)}")
    return results
