"""The transfer job: one row per (face, target) in each target mode, exactly once, bad inputs, resume, S3."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from facecore.images import decode_png
from facecore.methods.expression_transfer import drawn_expressions, expression_names, named_expressions
from facecore.rig import default_schema
from jobs.kinds.transfer import TRANSFER_SCHEMA
from jobs.manifest import ManifestError, write_manifest
from jobs.pipeline import run
from jobs.report import write_report
from jobs.samples import bad_input_corpus, tiny_expression, write_corpus
from jobs.spec import SpecError, parse_spec


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> str:
    """An untrained G at 64 px (the landmark warp): the job's mechanics; bench/transfer_quality.py its quality."""
    return tiny_expression(tmp_path_factory.mktemp("models") / "expression", image_size=64)


def _spec(manifest, output, generator, targets, **sections) -> dict:
    spec = {"kind": "transfer", "input": {"manifest": str(manifest)}, "output": {"path": str(output)},
            "models": {"expression": generator}, "options": {"targets": targets},
            "resources": {"batch_size": 4, "concurrency": 1}}
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def _check_ok_rows(ok: pd.DataFrame, size: int = 128) -> None:
    """What every result row holds: the crop's size and frame, the photo's size, sane scores."""
    for row in ok.itertuples():
        aligned, result = decode_png(row.aligned), decode_png(row.result)
        assert aligned.shape == result.shape == (size, size, 3)
        assert np.abs(aligned.astype(int) - result.astype(int)).mean() > 0.3  # the face did change
        assert decode_png(row.frame).shape == (row.height, row.width, 3)
        assert len(row.target_landmarks) == 136 and len(row.target_params) == len(expression_names(default_schema()))
    # The untrained G is the landmark warp: the person stays, the landmarks land where asked.
    assert (ok.id_distance < 0.6).all(), ok.id_distance.tolist()
    assert ok.landmark_nme.notna().all() and (ok.landmark_nme < 0.1).all(), ok.landmark_nme.tolist()


@pytest.mark.ray
def test_augment_gives_k_rows_per_face_and_one_per_bad_input_and_resumes(ray_cluster, photos, generator, tmp_path):
    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    paths = write_corpus(tmp_path / "in", corpus)
    write_manifest([str(p) for p in paths], str(tmp_path / "m.parquet"), keys=[p.name for p in paths])
    spec = parse_spec(_spec(tmp_path / "m.parquet", tmp_path / "out", generator, {"augment": 2},
                            resources={"rows_per_block": 4}, options={"seed": 3}))
    summary = run(spec, progress=False)

    frame = pd.read_parquet(tmp_path / "out")
    statuses = {name: status for name, (_, status) in corpus.items()}
    good = sorted(name for name, status in statuses.items() if status == "ok")
    assert sorted(frame.key) == sorted(good * 2 + [name for name in statuses if statuses[name] != "ok"])
    assert summary.output_rows == len(frame)
    bad = frame[frame.status != "ok"]
    assert bad.set_index("key").status.to_dict() == {k: s for k, s in statuses.items() if s != "ok"}
    assert bad.result.isna().all() and bad.target.isna().all()
    ok = frame[frame.status == "ok"].sort_values(["key", "target"])
    assert ok.groupby("key").target.apply(sorted).tolist() == [["augment:0", "augment:1"]] * len(good)
    _check_ok_rows(ok)
    # The labels are the rig's draws for (seed, key, face): the same wherever and whenever they are made.
    for key, rows in ok.groupby("key"):
        np.testing.assert_allclose(np.stack(rows.target_params.to_numpy()),
                                   drawn_expressions(default_schema(), key, 0, 2, seed=3), atol=1e-6)

    part = next((tmp_path / "out").glob("part-*.parquet"))
    metadata = pq.read_schema(part).metadata
    assert json.loads(metadata[b"facejobs.target_params"]) == expression_names(default_schema())
    assert pq.read_schema(part).names == TRANSFER_SCHEMA.names

    # A part lost: the rerun redoes exactly its keys, every target of them, to the same results.
    lost = set(pq.read_table(part, columns=["key"]).column("key").to_pylist())
    part.unlink()
    (tmp_path / "out" / "_SUCCESS").unlink()
    resumed = run(spec, progress=False)
    assert resumed.processed_rows >= len(lost)
    again = pd.read_parquet(tmp_path / "out")
    assert sorted(again.key) == sorted(frame.key)
    again_ok = again[again.status == "ok"].sort_values(["key", "target"])
    assert again_ok.result.tolist() == ok.result.tolist()


@pytest.mark.ray
def test_named_expressions_and_drivers(ray_cluster, photos, generator, tmp_path):
    write_manifest([str(photos["obama.jpg"]), str(photos["astronaut.png"])], str(tmp_path / "m.parquet"),
                   keys=["obama", "astronaut"])
    spec = parse_spec(_spec(tmp_path / "m.parquet", tmp_path / "named", generator,
                            {"expressions": ["surprise", "eyes_closed"]}, options={"paste_back": False}))
    run(spec, progress=False)
    named = pd.read_parquet(tmp_path / "named").sort_values(["key", "target"])
    assert named.target.tolist() == ["eyes_closed", "surprise"] * 2 and (named.status == "ok").all()
    assert named.frame.isna().all()  # paste_back off
    wanted = named_expressions(default_schema(), ["eyes_closed", "surprise"])
    np.testing.assert_allclose(np.stack(named.target_params.to_numpy()), np.vstack([wanted, wanted]), atol=1e-6)
    # Surprise opens the mouth and raises the brows: its target landmarks say so against the source's.
    for row in named[named.target == "surprise"].itertuples():
        source, target = (np.asarray(points).reshape(68, 2) for points in (row.aligned_landmarks,
                                                                          row.target_landmarks))
        gap = lambda points: points[66, 1] - points[62, 1]  # noqa: E731 - inner lips, lower minus upper
        assert gap(target) > gap(source) + 2 and target[17:27, 1].mean() < source[17:27, 1].mean() - 1

    # The contact sheet: source | target landmarks | result | frame, and the target named.
    page = (tmp_path / "named" / "_report.html").read_text() if write_report(str(tmp_path / "named")) else ""
    assert "<th>source</th><th>target landmarks</th><th>result</th><th>frame</th><th>row</th>" in page
    assert page.count("target surprise") == 2 and page.count("<img ") == 3 * 4  # no frames: paste_back off

    # Drivers, every row with every driver; a face-less driver fails its rows alone.
    blank = tmp_path / "blank.png"
    blank.write_bytes(np.zeros(1, np.uint8).tobytes())
    write_manifest([str(photos["biden.jpg"]), str(blank)], str(tmp_path / "d.parquet"), keys=["biden", "blank"])
    # A driver uri the job may not fetch (another scheme) is refused like an input's.
    write_manifest([str(photos["biden.jpg"]), str(blank), "http://127.0.0.1:9/face.jpg"],
                   str(tmp_path / "d3.parquet"), keys=["biden", "blank", "web"])
    spec = parse_spec(_spec(tmp_path / "m.parquet", tmp_path / "cross", generator,
                            {"drivers": str(tmp_path / "d3.parquet"), "pairing": "cross"}))
    run(spec, progress=False)
    cross = pd.read_parquet(tmp_path / "cross").sort_values(["key", "target"])
    assert list(zip(cross.key, cross.target, cross.status)) == [
        ("astronaut", "biden", "ok"), ("astronaut", "blank", "bad_driver"), ("astronaut", "web", "bad_driver"),
        ("obama", "biden", "ok"), ("obama", "blank", "bad_driver"), ("obama", "web", "bad_driver")]
    assert cross[cross.target == "blank"].error.str.contains("driver .*blank.png").all()
    assert cross[cross.target == "web"].error.str.contains("bad_uri: uri scheme 'http' is not allowed").all()
    _check_ok_rows(cross[cross.status == "ok"])
    # Both faces get the driver's one expression.
    driven = np.stack(cross[cross.status == "ok"].target_params.to_numpy())
    np.testing.assert_allclose(driven[0], driven[1], atol=1e-6)

    # Zip: row i with driver i; manifests of other lengths are refused, naming the field.
    spec = parse_spec(_spec(tmp_path / "m.parquet", tmp_path / "zip", generator,
                            {"drivers": str(tmp_path / "d.parquet"), "pairing": "zip"}))
    run(spec, progress=False)
    zipped = pd.read_parquet(tmp_path / "zip").sort_values("key")
    assert list(zip(zipped.key, zipped.target, zipped.status)) == [("astronaut", "blank", "bad_driver"),
                                                                   ("obama", "biden", "ok")]
    write_manifest([str(photos["biden.jpg"])], str(tmp_path / "one.parquet"))
    spec = parse_spec(_spec(tmp_path / "m.parquet", tmp_path / "zip2", generator,
                            {"drivers": str(tmp_path / "one.parquet"), "pairing": "zip"}))
    with pytest.raises(ManifestError, match=r"options\.targets\.pairing: zip .* 2 rows .* 1"):
        run(spec, progress=False)
    spec = parse_spec(_spec(tmp_path / "m.parquet", tmp_path / "zip3", generator,
                            {"drivers": str(tmp_path / "none.parquet")}))
    with pytest.raises(ManifestError, match=r"options\.targets\.drivers: .*none.parquet does not exist"):
        run(spec, progress=False)


@pytest.mark.ray
def test_transfer_job_on_s3(ray_cluster, photos, generator, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "eu-west-1"})
    fs.mkdir("facejobs-transfer", region_name="eu-west-1")
    fs.put_file(str(photos["biden.jpg"]), "facejobs-transfer/photos/biden.jpg")
    for name in ("config.json", "model.safetensors"):  # the model too is read from the bucket
        fs.put_file(f"{generator}/{name}", f"facejobs-transfer/models/expression/{name}")
    storage = {"endpoint_url": s3_server, "region": "eu-west-1"}
    manifest = "s3://facejobs-transfer/manifests/photos.parquet"
    spec = parse_spec(_spec(manifest, "s3://facejobs-transfer/out/", "s3://facejobs-transfer/models/expression",
                            {"expressions": ["smile"]}, storage=storage))
    write_manifest(["s3://facejobs-transfer/photos/biden.jpg", "s3://facejobs-transfer/photos/missing.jpg"],
                   manifest, storage=spec.storage)
    summary = run(spec, progress=False)
    assert summary.status_counts == {"ok": 1, "fetch_error": 1}
    assert summary.lineage["models"]["expression"]["uri"] == \
        "s3://facejobs-transfer/models/expression/model.safetensors"
    frame = pd.concat(pq.read_table(fs.open(p, "rb")).to_pandas()
                      for p in fs.glob("facejobs-transfer/out/part-*.parquet"))
    _check_ok_rows(frame[frame.status == "ok"])


def test_transfer_spec_defaults_and_errors_name_fields():
    base = {"kind": "transfer", "input": {"manifest": "m.csv"}, "output": {"path": "o"}}
    spec = parse_spec(base)
    options = spec.options
    assert (options.method, options.size, options.targets.augment, options.paste_back) == ("affine68", 128, 4, True)
    for targets, message in [
        ({"augment": 2, "expressions": ["smile"]}, r"options\.targets: .*exactly one of augment, expressions, "
                                                   r"drivers \(got \['augment', 'expressions'\]\)"),
        ({}, r"options\.targets: .*exactly one .*got none"),
        ({"augment": 0}, r"options\.targets\.augment: "),
        ({"expressions": ["smirk"]}, r"options\.targets\.expressions: .*\['smirk'\] are not expressions of the rig"),
        ({"expressions": []}, r"options\.targets\.expressions: .*at least one"),
        ({"drivers": "s3://k:s@b/d.csv"}, r"options\.targets\.drivers: .*credentials"),
        ({"drivers": "d.csv", "pairing": "pairs"}, r"options\.targets\.pairing: "),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec({**base, "options": {"targets": targets}})
