"""The swap job: pair manifests and pairings, render targets, a bad side, exactly once, resume, S3."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facecore.images import decode_png
from jobs.kinds.swap import SWAP_SCHEMA
from jobs.manifest import ManifestError, write_manifest
from jobs.pipeline import run
from jobs.report import write_report
from jobs.samples import bad_input_corpus, tiny_swap, write_corpus
from jobs.spec import SpecError, parse_spec

TUNE = {"max_steps": 2, "id_threshold": 0.0, "att_threshold": 0.0}  # unreachable: every pair takes 2 steps


@pytest.fixture(scope="module")
def swapper(tmp_path_factory) -> str:
    """An untrained E and D at 64 px: the job's mechanics; bench/swap_quality.py its quality."""
    return tiny_swap(tmp_path_factory.mktemp("models") / "swap", image_size=64)


def _spec(inputs: dict, output, swapper, **sections) -> dict:
    spec = {"kind": "swap", "input": inputs, "output": {"path": str(output)}, "models": {"swap": swapper},
            "options": {"tune": TUNE}, "resources": {"batch_size": 4, "concurrency": 1}}
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def _check_ok_rows(ok: pd.DataFrame, size: int = 128, steps: int = 2) -> None:
    """What every swapped row holds: crops and result in one frame, the frame the target photo's size."""
    assert len(ok) > 0
    for row in ok.itertuples():
        source, target, result = (decode_png(getattr(row, name)) for name in ("source_aligned", "aligned", "result"))
        assert source.shape == target.shape == result.shape == (size, size, 3)
        assert len(row.source_landmarks) == len(row.aligned_landmarks) == 136 and len(row.matrix) == 6
        if row.frame is not None:
            frame = decode_png(row.frame)
            assert frame.ndim == 3 and frame.shape[2] == 3 and min(frame.shape[:2]) >= size // 2
    assert (ok.tune_steps == steps).all()
    assert np.isfinite(ok.tune_identity_loss).all() and (ok.tune_attribute_loss > 0).all()
    assert (ok.id_distance_source > 0).all() and (ok.id_distance_target > 0).all()
    assert ok.failed_side.isna().all() and ok.error.isna().all()


@pytest.mark.ray
def test_pair_manifest_rows_once_each_a_bad_side_says_which_and_resumes(ray_cluster, photos, swapper, tmp_path):
    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    paths = {path.name: path for path in write_corpus(tmp_path / "in", corpus)}
    good = [str(photos[name]) for name in ("obama.jpg", "biden.jpg", "astronaut.png")]
    pairs = [("o-b", good[0], good[1]), ("b-a", good[1], good[2]), ("a-o", good[2], good[0]),
             ("src-missing", str(paths["does_not_exist.jpg"]), good[0]),
             ("tgt-noface", good[1], str(paths["no_face.png"])),
             ("src-truncated", str(paths["truncated.jpg"]), good[1]),
             ("tgt-web", good[0], "http://127.0.0.1:9/face.jpg"),
             ("both-bad", str(paths["no_face.png"]), str(paths["phone.heic"]))]
    pd.DataFrame(pairs, columns=["key", "source_uri", "target_uri"]).to_csv(tmp_path / "pairs.csv", index=False)
    spec = parse_spec(_spec({"manifest": str(tmp_path / "pairs.csv")}, tmp_path / "out", swapper,
                            resources={"rows_per_block": 3}))
    summary = run(spec, progress=False)
    frame = pd.read_parquet(tmp_path / "out").set_index("key")
    assert sorted(frame.index) == sorted(key for key, _, _ in pairs) and summary.output_rows == len(pairs)
    expected = {"src-missing": ("fetch_error", "source"), "tgt-noface": ("no_face", "target"),
                "src-truncated": ("decode_error", "source"), "tgt-web": ("bad_uri", "target"),
                "both-bad": ("no_face", "source")}
    for key, (status, side) in expected.items():
        row = frame.loc[key]
        assert (row.status, row.failed_side) == (status, side), (key, row.status, row.error)
        assert row.error.startswith(f"{side}: ") and row.result is None
    ok = frame[frame.status == "ok"]
    assert sorted(ok.index) == ["a-o", "b-a", "o-b"]
    _check_ok_rows(ok)
    width, height = Image.open(good[1]).size  # o-b's target: biden.jpg, the photo the result goes back into
    assert decode_png(ok.loc["o-b", "frame"]).shape == (height, width, 3)
    part = next((tmp_path / "out").glob("part-*.parquet"))
    assert pq.read_schema(part).names == SWAP_SCHEMA.names

    # The contact sheet: source | target | result | frame.
    page = (tmp_path / "out" / "_report.html").read_text() if write_report(str(tmp_path / "out")) else ""
    assert "<th>source</th><th>target</th><th>result</th><th>frame</th><th>row</th>" in page

    # A part lost: the rerun redoes exactly its pairs, to the same results.
    lost = set(pq.read_table(part, columns=["key"]).column("key").to_pylist())
    part.unlink()
    (tmp_path / "out" / "_SUCCESS").unlink()
    resumed = run(spec, progress=False)
    assert len(lost) <= resumed.processed_rows < len(pairs)
    again = pd.read_parquet(tmp_path / "out").set_index("key")
    assert sorted(again.index) == sorted(frame.index)
    assert again.loc[ok.index, "result"].tolist() == ok.result.tolist()


@pytest.mark.ray
def test_two_manifests_zip_cross_sample_and_render_targets(ray_cluster, photos, swapper, tmp_path):
    write_manifest([str(photos["obama.jpg"]), str(photos["biden.jpg"])], str(tmp_path / "s.parquet"),
                   keys=["obama", "biden"])
    write_manifest([str(photos["astronaut.png"]), str(photos["obama2.jpg"])], str(tmp_path / "t.parquet"),
                   keys=["astronaut", "obama2"])
    inputs = {"sources": str(tmp_path / "s.parquet"), "targets": str(tmp_path / "t.parquet")}
    tune_off = {"tune": {"max_steps": 0}, "paste_back": False}
    run(parse_spec(_spec({**inputs, "pairing": "zip"}, tmp_path / "zip", swapper, options=tune_off)), progress=False)
    zipped = pd.read_parquet(tmp_path / "zip")
    assert sorted(zipped.key) == ["biden~obama2", "obama~astronaut"] and (zipped.status == "ok").all()
    _check_ok_rows(zipped, steps=0)
    assert zipped.frame.isna().all()  # paste_back off

    run(parse_spec(_spec({**inputs, "pairing": "cross"}, tmp_path / "cross", swapper, options=tune_off)),
        progress=False)
    cross = pd.read_parquet(tmp_path / "cross")
    assert sorted(cross.key) == ["biden~astronaut", "biden~obama2", "obama~astronaut", "obama~obama2"]
    # The same pair gives the same result whatever else the job holds (to a grey level: the
    # batch's size changes the order of float sums in the convolutions).
    apart = np.abs(decode_png(cross.set_index("key").loc["obama~astronaut", "result"]).astype(int)
                   - decode_png(zipped.set_index("key").loc["obama~astronaut", "result"]).astype(int))
    print("largest difference, the pair in two batches:", apart.max())
    assert apart.max() <= 1

    sample = _spec({**inputs, "pairing": "sample:1", "seed": 5}, tmp_path / "sample", swapper, options=tune_off)
    run(parse_spec(sample), progress=False)
    sampled = pd.read_parquet(tmp_path / "sample")
    assert len(sampled) == 2 and sorted(k.split("~")[0] for k in sampled.key) == ["biden", "obama"]
    run(parse_spec({**sample, "output": {"path": str(tmp_path / "sample2")}}), progress=False)
    assert sorted(pd.read_parquet(tmp_path / "sample2").key) == sorted(sampled.key)  # seeded

    # Game avatars as targets: a render job's output folder, aligned on the landmarks the render knows.
    run(parse_spec({"kind": "render", "output": {"path": str(tmp_path / "avatars")},
                    "options": {"count": 2, "size": 128, "seed": 1}}), progress=False)
    run(parse_spec(_spec({"sources": inputs["sources"], "targets": str(tmp_path / "avatars"), "pairing": "zip"},
                         tmp_path / "on-avatars", swapper, options={"tune": {"max_steps": 0}})), progress=False)
    avatars = pd.read_parquet(tmp_path / "on-avatars")
    assert (avatars.status == "ok").all() and len(avatars) == 2
    assert avatars.target_uri.str.startswith(str(tmp_path / "avatars") + "#").all()
    _check_ok_rows(avatars, steps=0)
    assert all(decode_png(f).shape == (128, 128, 3) for f in avatars.frame)  # pasted into the render

    write_manifest([str(photos["biden.jpg"])], str(tmp_path / "one.parquet"))
    with pytest.raises(ManifestError, match=r"input\.pairing: zip .* 2 rows .* 1"):
        run(parse_spec(_spec({**inputs, "targets": str(tmp_path / "one.parquet")}, tmp_path / "z2", swapper)),
            progress=False)
    with pytest.raises(ManifestError, match=r"input\.targets: .*none.parquet does not exist"):
        run(parse_spec(_spec({**inputs, "targets": str(tmp_path / "none.parquet")}, tmp_path / "z3", swapper)),
            progress=False)


@pytest.mark.ray
def test_swap_job_on_s3(ray_cluster, photos, swapper, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "eu-west-1"})
    fs.mkdir("facejobs-swap", region_name="eu-west-1")
    for name in ("obama.jpg", "biden.jpg"):
        fs.put_file(str(photos[name]), f"facejobs-swap/photos/{name}")
    for name in ("config.json", "model.safetensors"):  # the model too is read from the bucket
        fs.put_file(f"{swapper}/{name}", f"facejobs-swap/models/swap/{name}")
    pairs = pd.DataFrame({"source_uri": ["photos/obama.jpg", "photos/missing.jpg"],
                          "target_uri": ["photos/biden.jpg", "photos/biden.jpg"]})
    with fs.open("facejobs-swap/pairs.csv", "w") as handle:
        pairs.to_csv(handle, index=False)
    storage = {"endpoint_url": s3_server, "region": "eu-west-1"}
    spec = parse_spec(_spec({"manifest": "s3://facejobs-swap/pairs.csv"}, "s3://facejobs-swap/out/",
                            "s3://facejobs-swap/models/swap", storage=storage))
    summary = run(spec, progress=False)
    assert summary.status_counts == {"ok": 1, "fetch_error": 1}
    assert summary.lineage["models"]["swap"]["uri"] == "s3://facejobs-swap/models/swap/model.safetensors"
    frame = pd.concat(pq.read_table(fs.open(p, "rb")).to_pandas() for p in fs.glob("facejobs-swap/out/part-*.parquet"))
    assert frame[frame.status == "fetch_error"].failed_side.tolist() == ["source"]
    ok = frame[frame.status == "ok"]
    assert ok.source_uri.tolist() == ["s3://facejobs-swap/photos/obama.jpg"]  # resolved beside the manifest
    _check_ok_rows(ok)


def test_swap_spec_defaults_and_errors_name_fields():
    base = {"kind": "swap", "input": {"manifest": "pairs.csv"}, "output": {"path": "o"}}
    options = parse_spec(base).options
    assert (options.method, options.size, options.paste_back, options.tune.max_steps) == ("affine68", 128, True, 30)
    for inputs, message in [
        ({"manifest": "p.csv", "sources": "s.csv"}, r"input: .*either manifest .* not both"),
        ({"sources": "s.csv"}, r"input: .*give manifest .* or both sources and targets"),
        ({"sources": "s.csv", "targets": "t.csv", "pairing": "sample:0"}, r"input\.pairing: "),
        ({"sources": "s.csv", "targets": "t.csv", "pairing": "all"}, r"input\.pairing: "),
        ({"manifest": "s3://k:s@b/p.csv"}, r"input\.manifest: .*credentials"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec({**base, "input": inputs})
    with pytest.raises(SpecError, match=r"options\.tune\.max_steps: "):
        parse_spec({**base, "options": {"tune": {"max_steps": -1}}})
