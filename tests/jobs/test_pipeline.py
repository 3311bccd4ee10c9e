"""Align jobs end to end on the shared local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from jobs.manifest import write_manifest
from jobs.pipeline import run
from jobs.samples import bad_input_corpus, write_corpus
from jobs.spec import parse_spec

pytestmark = pytest.mark.ray


def _spec(manifest, output, **overrides) -> dict:
    spec = {"kind": "align", "input": {"manifest": str(manifest)}, "output": {"path": str(output)},
            "resources": {"concurrency": 2, "batch_size": 2, "rows_per_block": 4}}
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def _repeated_manifest(photos, folder: Path, count: int) -> Path:
    """``count`` rows cycling over the real photos, each with its own key."""
    names = ["obama.jpg", "obama2.jpg", "biden.jpg", "astronaut.png"]
    uris = [str(photos[names[i % len(names)]]) for i in range(count)]
    manifest = folder / "manifest.parquet"
    write_manifest(uris, str(manifest), keys=[f"row-{i:04d}" for i in range(count)])
    return manifest


def _read(output) -> pd.DataFrame:
    return pd.read_parquet(output)


def test_bad_input_corpus_job_exits_zero(ray_cluster, photos, tmp_path, capsys):
    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    paths = write_corpus(tmp_path / "in", corpus)
    write_manifest([str(p) for p in paths], str(tmp_path / "m.parquet"), keys=[p.name for p in paths])
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path / "m.parquet", tmp_path / "out", options={"faces": "all"})))

    assert main(["run", str(spec_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "align job finished" in printed and "too_large" in printed

    frame = _read(tmp_path / "out")
    by_key = frame.groupby("key")["status"].agg(set).to_dict()
    assert by_key == {name: {status} for name, (_, status) in corpus.items()}
    assert sorted(frame[frame.key == "several_faces.jpg"].face_index) == [0, 1]
    assert len(frame) == len(corpus) + 1
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert success["input_rows"] == len(corpus) and success["output_rows"] == len(corpus) + 1
    assert success["status_counts"] == dict(Counter(frame.status))
    metadata = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert b"landmarks" in metadata[b"facejobs.columns"]


def test_resume_after_deleting_parts(ray_cluster, photos, tmp_path):
    manifest = _repeated_manifest(photos, tmp_path, 24)
    spec = parse_spec(_spec(manifest, tmp_path / "out"))
    first = run(spec, progress=False)
    assert first.processed_rows == 24 and first.output_rows == 24 and first.ok_rows == 24
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) >= 3
    deleted_keys = set()
    for part in parts[:2]:
        deleted_keys |= set(pq.read_table(part, columns=["key"]).column("key").to_pylist())
        part.unlink()
    (tmp_path / "out" / "_SUCCESS").unlink()

    second = run(spec, progress=False)
    assert second.processed_rows == len(deleted_keys)
    assert second.resumed_rows == 24 - len(deleted_keys)
    frame = _read(tmp_path / "out")
    assert sorted(frame.key) == [f"row-{i:04d}" for i in range(24)]  # exact set, no duplicates

    third = run(spec, progress=False)  # nothing left to do
    assert third.processed_rows == 0 and third.output_rows == 24
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_killed_worker_still_gives_every_row_once(ray_cluster, photos, tmp_path):
    from ray.util.state import list_actors

    rows = 48
    manifest = _repeated_manifest(photos, tmp_path, rows)
    spec = parse_spec(_spec(manifest, tmp_path / "out", resources={"batch_size": 1, "rows_per_block": 2}))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run(spec, progress=False)))
    job.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and job.is_alive():
        if list((tmp_path / "out").glob("part-*.parquet")):  # mid-run: some rows committed
            workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                       if "MapWorker" in a.class_name and a.pid]
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    job.join(timeout=300)
    assert killed is not None, "the job finished before a worker could be killed"
    summary = result["summary"]
    frame = _read(tmp_path / "out")
    assert sorted(frame.key) == [f"row-{i:04d}" for i in range(rows)]
    assert set(frame.status) == {"ok"}
    assert summary.output_rows == rows


def test_job_against_s3(ray_cluster, photos, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "eu-west-1"})
    fs.mkdir("facejobs-test", region_name="eu-west-1")
    names = ["obama.jpg", "biden.jpg"]
    for name in names:
        fs.put_file(str(photos[name]), f"facejobs-test/photos/{name}")
    storage = {"endpoint_url": s3_server, "region": "eu-west-1"}
    # Relative uris resolve against the manifest's folder, in the bucket.
    manifest_uri = "s3://facejobs-test/manifests/photos.parquet"
    write_manifest(["../photos/obama.jpg", "s3://facejobs-test/photos/biden.jpg",
                    "s3://facejobs-test/photos/missing.jpg"], manifest_uri, storage=parse_spec(
        _spec("x", "y", storage=storage)).storage)
    spec = parse_spec(_spec(manifest_uri, "s3://facejobs-test/out/align/", storage=storage))
    summary = run(spec, progress=False)
    assert summary.status_counts == {"ok": 2, "fetch_error": 1}
    assert fs.exists("facejobs-test/out/align/_SUCCESS")
    parts = fs.glob("facejobs-test/out/align/part-*.parquet")
    frame = pd.concat(pq.read_table(fs.open(p, "rb")).to_pandas() for p in parts)
    assert sorted(frame.uri) == sorted(["s3://facejobs-test/photos/obama.jpg",
                                        "s3://facejobs-test/photos/biden.jpg",
                                        "s3://facejobs-test/photos/missing.jpg"])
    assert not fs.exists("facejobs-test/out/align/_tmp") or not fs.ls("facejobs-test/out/align/_tmp")


def test_local_ray_listens_on_loopback_only(ray_cluster):
    nodes = ray_cluster.nodes()
    assert [node["NodeManagerAddress"] for node in nodes] == ["127.0.0.1"]
