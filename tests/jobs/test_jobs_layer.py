"""The jobs layer on Ray: the landmarks kind, lineage, reruns, leases, loud failure, S3 outages."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.kinds.pinch import PinchJob  # noqa: F401 - the kind registers its spec
from jobs.lease import Lease, LeaseHeld
from jobs.lineage import SpecChanged
from jobs.manifest import write_manifest
from jobs.output import JobFailed
from jobs.pipeline import run
from jobs.samples import bad_input_corpus, write_corpus
from jobs.spec import StorageSpec, parse_spec
from jobs.storage import locate

pytestmark = pytest.mark.ray


def _photo_manifest(photos, folder: Path, names=("obama.jpg", "biden.jpg", "astronaut.png"), extra=()) -> Path:
    uris = [str(photos[name]) for name in names] + list(extra)
    manifest = folder / "m.parquet"
    write_manifest(uris, str(manifest))
    return manifest


def _align(manifest, output, **options) -> dict:
    return {"kind": "align", "input": {"manifest": str(manifest)}, "output": {"path": str(output)},
            "options": {"size": 64, **options}, "resources": {"concurrency": 2}}


def test_landmarks_kind_end_to_end(ray_cluster, photos, tmp_path):
    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    paths = write_corpus(tmp_path / "in", corpus)
    write_manifest([str(p) for p in paths], str(tmp_path / "m.parquet"), keys=[p.name for p in paths])
    spec_path = tmp_path / "landmarks.yaml"
    spec_path.write_text(json.dumps({"kind": "landmarks", "input": {"manifest": str(tmp_path / "m.parquet")},
                                     "output": {"path": str(tmp_path / "out")}, "options": {"faces": "all"}}))
    assert main(["run", str(spec_path), "--no-progress"]) == 0
    frame = pd.read_parquet(tmp_path / "out")
    assert frame.groupby("key")["status"].agg(set).to_dict() == {name: {s} for name, (_, s) in corpus.items()}
    ok = frame[frame.status == "ok"]
    assert len(ok) == sum(1 for _, s in corpus.values() if s == "ok") + 1  # several_faces.jpg has two
    assert "aligned" not in frame.columns and {"yaw", "pitch", "roll"} <= set(frame.columns)
    assert all(len(points) == 136 for points in ok.landmarks)
    upright = ok.set_index("key").loc["cmyk.jpg"]
    rotated = ok.set_index("key").loc["exif_rotated.jpg"]  # the same photo, stored sideways
    assert abs(upright.yaw - rotated.yaw) < 6 and abs(upright.roll - rotated.roll) < 6  # re-encoded JPEG
    assert abs(upright.yaw) < 30
    metadata = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert b"head pose" not in metadata[b"facejobs.columns"] and b"yaw" in metadata[b"facejobs.columns"]
    assert not (tmp_path / "out" / "_tmp").exists()


def test_success_records_lineage_and_parts_their_run(ray_cluster, photos, tmp_path):
    spec = parse_spec(_align(_photo_manifest(photos, tmp_path), tmp_path / "out"))
    summary = run(spec, progress=False)
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    lineage = success["lineage"]
    assert lineage["spec"]["options"]["size"] == 64 and lineage["spec"]["kind"] == "align"
    assert len(lineage["spec_sha256"]) == 64 and lineage["versions"]["ray"] and lineage["versions"]["torch"]
    assert lineage["versions"]["facejobs"] == "0.1.0"
    model = lineage["models"]["dlib_landmarks68"]
    assert model["uri"].endswith("shape_predictor_68_face_landmarks.dat") and len(model["sha256"]) == 64
    assert lineage["nodes"] == 1 and lineage["gpus"] == 1 and lineage["devices"]["cpu_pool"] == "cpu"
    assert lineage["started"] <= lineage["ended"]
    assert success["run_id"] == summary.run_id
    for part in (tmp_path / "out").glob("part-*.parquet"):
        metadata = pq.read_schema(part).metadata
        assert metadata[b"facejobs.run_id"].decode() == summary.run_id
        assert metadata[b"facejobs.spec_sha256"].decode() == lineage["spec_sha256"]
    # No _tmp/, no _LEASE left behind (the empty flock file of local leases stays: removing it would race).
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("part-")) == \
        ["_JOB", "_LEASE.lock", "_SUCCESS"]


def test_reruns_with_another_spec_are_refused_unless_allowed(ray_cluster, photos, tmp_path):
    manifest = _photo_manifest(photos, tmp_path)
    run(parse_spec(_align(manifest, tmp_path / "out")), progress=False)
    with pytest.raises(SpecChanged, match=r"options\.size: 64 -> 96"):
        run(parse_spec(_align(manifest, tmp_path / "out", size=96)), progress=False)
    pinch = {"kind": "pinch", "input": {"manifest": str(manifest)}, "output": {"path": str(tmp_path / "out")},
             "options": {"init": "reference"}}  # shipped models only (no preset regressor yet)
    with pytest.raises(SpecChanged, match=r"kind: 'align' -> 'pinch'"):
        run(parse_spec(pinch), progress=False)
    spec_path = tmp_path / "bigger.json"
    spec_path.write_text(json.dumps(_align(manifest, tmp_path / "out", size=96)))
    assert main(["run", str(spec_path), "--no-progress"]) == 2  # the CLI says so and exits 2

    bigger = _photo_manifest(photos, tmp_path / "more" if (tmp_path / "more").mkdir() is None else tmp_path,
                             names=("obama.jpg", "biden.jpg", "astronaut.png", "obama2.jpg"))
    summary = run(parse_spec(_align(bigger, tmp_path / "out", size=96)), progress=False, allow_spec_change=True)
    assert summary.processed_rows == 1 and summary.resumed_rows == 3
    assert "options.size: 64 -> 96" in summary.lineage["spec_change"]
    frame = pd.read_parquet(tmp_path / "out")
    new = frame[frame.uri == str(photos["obama2.jpg"])]
    job = json.loads((tmp_path / "out" / "_JOB").read_text())
    assert [run_["run_id"] for run_ in job["runs"]][-1] == summary.run_id
    part = next(p for p in (tmp_path / "out").glob("part-*.parquet")
                if str(photos["obama2.jpg"]) in pq.read_table(p).column("uri").to_pylist())
    assert pq.read_schema(part).metadata[b"facejobs.run_id"].decode() == summary.run_id  # new rows say who
    assert len(new) == 1 and job["runs"][0]["fingerprint"] != job["runs"][-1]["fingerprint"]


def test_a_shrunk_manifest_reports_the_rows_it_no_longer_has(ray_cluster, photos, tmp_path):
    run(parse_spec(_align(_photo_manifest(photos, tmp_path), tmp_path / "out")), progress=False)
    smaller = tmp_path / "small"
    smaller.mkdir()
    summary = run(parse_spec(_align(_photo_manifest(photos, smaller, names=("obama.jpg",)), tmp_path / "out")),
                  progress=False)
    assert summary.processed_rows == 0 and summary.output_rows == 1 and summary.status_counts == {"ok": 1}
    assert summary.extra_keys == 2 and summary.stale_rows == 2
    from jobs.cli import format_summary

    assert "warning: 2 rows of 2 keys that this manifest lacks are in the output" in format_summary(summary)


def test_a_second_run_on_one_output_is_refused(ray_cluster, photos, tmp_path):
    spec = parse_spec(_align(_photo_manifest(photos, tmp_path), tmp_path / "out"))
    (tmp_path / "out").mkdir()
    with Lease.acquire(locate(str(tmp_path / "out")), "the-first-run"):
        with pytest.raises(LeaseHeld, match="in use by run 'the-first-run'"):
            run(spec, progress=False)
        spec_path = tmp_path / "job.json"
        spec_path.write_text(json.dumps(_align(_photo_manifest(photos, tmp_path), tmp_path / "out")))
        assert main(["run", str(spec_path), "--no-progress"]) == 1
    assert run(spec, progress=False).ok_rows == 3  # free once the first run let go
    assert not (tmp_path / "out" / "_SUCCESS").read_text() == ""


def _bucket(s3_server, name):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "eu-west-1"})
    if not fs.exists(name):
        fs.mkdir(name, region_name="eu-west-1")
    return fs


def test_a_second_run_on_one_s3_output_is_refused(ray_cluster, photos, s3_server):
    fs = _bucket(s3_server, "facejobs-lease")
    fs.put_file(str(photos["obama.jpg"]), "facejobs-lease/photos/obama.jpg")
    storage = StorageSpec(endpoint_url=s3_server, region="eu-west-1")
    write_manifest(["s3://facejobs-lease/photos/obama.jpg"], "s3://facejobs-lease/m.parquet", storage=storage)
    spec = parse_spec({**_align("s3://facejobs-lease/m.parquet", "s3://facejobs-lease/out"),
                       "storage": storage.model_dump()})
    with Lease.acquire(locate("s3://facejobs-lease/out", storage), "nightly-2026-11-22"):
        with pytest.raises(LeaseHeld, match="in use by run 'nightly-2026-11-22'"):
            run(spec, progress=False)
    assert run(spec, progress=False).ok_rows == 1


def test_systemic_failure_stops_the_job_within_seconds(ray_cluster, photos, s3_server, tmp_path):
    fs = _bucket(s3_server, "facejobs-systemic")
    fs.put_file(str(photos["obama.jpg"]), "facejobs-systemic/photos/obama.jpg")
    storage = {"endpoint_url": s3_server, "region": "eu-west-1"}
    # 150 photos in a bucket that does not exist (a typo in the manifest's bucket name).
    uris = [f"s3://facejobs-systemc/photos/{i:04d}.jpg" for i in range(150)]
    write_manifest(uris, "s3://facejobs-systemic/m.parquet", storage=StorageSpec(**storage))
    spec = {**_align("s3://facejobs-systemic/m.parquet", "s3://facejobs-systemic/out"), "storage": storage,
            "resources": {"concurrency": 2, "rows_per_block": 10}}
    spec_path = tmp_path / "job.json"
    spec_path.write_text(json.dumps(spec))
    started = time.monotonic()
    code = main(["run", str(spec_path), "--no-progress"])
    elapsed = time.monotonic() - started
    assert code == 1 and elapsed < 60, elapsed
    assert not fs.exists("facejobs-systemic/out/_SUCCESS")
    with pytest.raises(JobFailed, match=r"rows failed for a systemic reason .*limits\.max_error_rate=0\.5.*"
                                        r"storage_error: no such bucket"):
        run(parse_spec(spec), progress=False)
    # A higher limit lets the same job finish, every row accounted for.
    tolerant = parse_spec({**spec, "limits": {"max_error_rate": 1.0}})
    assert run(tolerant, progress=False).status_counts == {"storage_error": 150}
    # The bucket is fixed (created): a rerun tries the failed rows again and keeps the new rows only.
    fs.mkdir("facejobs-systemc", region_name="eu-west-1")
    for i in range(150):
        fs.put_file(str(photos["obama.jpg"]), f"facejobs-systemc/photos/{i:04d}.jpg")
    fixed = run(parse_spec(spec), progress=False)
    assert fixed.processed_rows == 150 and fixed.status_counts == {"ok": 150} and fixed.output_rows == 150


def test_bad_uris_are_rows_not_fetches(ray_cluster, photos, tmp_path):
    manifest = _photo_manifest(photos, tmp_path, extra=["http://169.254.169.254/latest/meta-data/iam",
                                                        "s3://bucket/photo.jpg"])
    summary = run(parse_spec(_align(manifest, tmp_path / "out")), progress=False)
    assert summary.status_counts == {"ok": 3, "bad_uri": 2}
    frame = pd.read_parquet(tmp_path / "out").set_index("uri")
    assert "scheme 'http' is not allowed" in frame.loc["http://169.254.169.254/latest/meta-data/iam", "error"]


def test_an_s3_outage_mid_run_loses_no_row(ray_cluster, photos, tmp_path):
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        fs = _bucket(endpoint, "facejobs-outage")
        names = ["obama.jpg", "biden.jpg", "obama2.jpg", "astronaut.png"]
        for name in names:
            fs.put_file(str(photos[name]), f"facejobs-outage/photos/{name}")
        storage = {"endpoint_url": endpoint, "region": "eu-west-1"}
        uris = [f"s3://facejobs-outage/photos/{names[i % 4]}" for i in range(32)]
        write_manifest(uris, "s3://facejobs-outage/m.parquet", keys=[f"row-{i:02d}" for i in range(32)],
                       storage=StorageSpec(**storage))
        spec = parse_spec({**_align("s3://facejobs-outage/m.parquet", "s3://facejobs-outage/out"),
                           "storage": storage, "resources": {"concurrency": 2, "rows_per_block": 2}})
        result: dict = {}
        job = threading.Thread(target=lambda: result.update(summary=run(spec, progress=False)))
        job.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not fs.glob("facejobs-outage/out/part-*.parquet"):
            fs.invalidate_cache()
            time.sleep(0.2)
        server.stop()  # mid-run: some parts committed, most rows still to fetch
        time.sleep(4)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        job.join(timeout=300)
        summary = result["summary"]
        assert summary.status_counts == {"ok": 32} and summary.output_rows == 32
    finally:
        server.stop()
