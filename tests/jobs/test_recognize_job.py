"""The recognize job: the regressor on aligned photos, exactly-once rows with bad inputs mixed in."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from facecore import weights
from facecore.images import decode_png
from facecore.models.regressor import Regressor, RegressorConfig
from facecore.rig import default_schema
from jobs.kinds import kind_of
from jobs.kinds.recognize import RECOGNIZE_SCHEMA, RecognizeStage, model_inputs
from jobs.manifest import write_manifest
from jobs.pipeline import run
from jobs.report import write_report
from jobs.samples import bad_input_corpus, tiny_regressor, write_corpus
from jobs.spec import SpecError, parse_spec


@pytest.fixture(scope="module")
def regressor(tmp_path_factory) -> str:
    """A small untrained regressor: this tests the job's mechanics, bench/pinch_quality.py its quality."""
    return tiny_regressor(tmp_path_factory.mktemp("models") / "regressor")


def _spec(manifest, output, regressor, **sections) -> dict:
    spec = {"kind": "recognize", "input": {"manifest": str(manifest)}, "output": {"path": str(output)},
            "models": {"regressor": regressor}, "options": {"size": 64, "render_size": 64},
            "resources": {"batch_size": 4, "concurrency": 1}}
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def _vectors(model: Regressor, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """What the regressor itself says of rows' aligned crops (at its own size: no resize)."""
    crops = np.stack([decode_png(row["aligned"]) for row in rows])
    assert crops.shape[1] == model.config.image_size
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    landmarks = torch.tensor(np.array([row["aligned_landmarks"] for row in rows], np.float32)).view(-1, 68, 2)
    vectors, confidence = model.vectors(images, landmarks)
    return vectors.numpy(), confidence.numpy()


@pytest.mark.ray
def test_recognize_job_rows_params_and_resume(ray_cluster, photos, regressor, tmp_path):
    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    paths = write_corpus(tmp_path / "in", corpus)
    write_manifest([str(p) for p in paths], str(tmp_path / "m.parquet"), keys=[p.name for p in paths])
    # Blocks of 4 rows, so that the output has several parts and one can go missing.
    spec = parse_spec(_spec(tmp_path / "m.parquet", tmp_path / "out", regressor, resources={"rows_per_block": 4}))
    summary = run(spec, progress=False)

    # Every input once, with its status (largest face only: one row per input).
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame.key) == sorted(corpus) and summary.output_rows == len(corpus)
    assert frame.set_index("key").status.to_dict() == {name: status for name, (_, status) in corpus.items()}
    assert frame[frame.status != "ok"].params.isna().all() and frame[frame.status != "ok"].render.isna().all()

    # The params are the regressor's own answer for the stored aligned crop.
    schema = default_schema()
    ok = frame[frame.status == "ok"].sort_values("key")
    assert len(ok) == sum(status == "ok" for _, status in corpus.values())
    expected, confidence = _vectors(weights.load_model(Regressor, regressor).eval(), ok.to_dict("records"))
    params = np.stack(ok.params.to_numpy()).astype(np.float32)
    assert params.shape == (len(ok), schema.vector_size)
    np.testing.assert_allclose(params, expected, atol=1e-5)
    np.testing.assert_allclose(np.stack(ok.style_confidence.to_numpy()), confidence, atol=1e-5)
    for group in schema.discrete:  # one-hots
        block = params[:, schema.group_slice(group.name)]
        assert (block.sum(axis=1) == 1).all() and set(np.unique(block)) <= {0.0, 1.0}
    assert confidence.shape == (len(ok), len(schema.discrete))
    assert ((confidence >= 1 / max(g.size for g in schema.discrete)) & (confidence <= 1)).all()
    assert all(decode_png(data).shape == (64, 64, 3) for data in ok.render)

    # Lineage names the regressor's weights; the schema names the slots and groups.
    assert summary.lineage["models"]["regressor"]["uri"] == f"{regressor}/model.safetensors"
    assert len(summary.lineage["models"]["regressor"]["sha256"]) == 64
    part = next((tmp_path / "out").glob("part-*.parquet"))
    metadata = pq.read_schema(part).metadata
    assert json.loads(metadata[b"facejobs.params"]) == list(schema.vector_names)
    assert json.loads(metadata[b"facejobs.style_groups"]) == [g.name for g in schema.discrete]
    assert set(json.loads(metadata[b"facejobs.columns"])) >= {"params", "render", "style_confidence", "aligned"}
    assert pq.read_schema(part).names == RECOGNIZE_SCHEMA.names

    # The contact sheet: each face beside its avatar.
    page = (tmp_path / "out" / "_report.html").read_text() if write_report(str(tmp_path / "out")) else ""
    assert "<tr><th>photo</th><th>avatar</th><th>row</th></tr>" in page
    pictures = {re.search(r"<b>(.*?)</b>", row).group(1): row.count("<img ") for row in page.split("<tr>")[2:]}
    assert all(pictures[key] == 2 for key in ok.key)

    # An interrupted run (a part lost, no _SUCCESS): the rerun does exactly the missing keys, and the
    # missing object again (a systemic status is retried).
    lost = set(pq.read_table(part, columns=["key"]).column("key").to_pylist())
    assert 0 < len(lost) < len(corpus)
    part.unlink()
    (tmp_path / "out" / "_SUCCESS").unlink()
    resumed = run(spec, progress=False)
    assert resumed.processed_rows == len(lost) + ("does_not_exist.jpg" not in lost)
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame.key) == sorted(corpus) and resumed.status_counts == summary.status_counts
    again_ok = frame[frame.status == "ok"].sort_values("key")
    np.testing.assert_allclose(np.stack(again_ok.params.to_numpy()), params, atol=1e-5)


@pytest.mark.ray
def test_recognize_job_on_s3(ray_cluster, photos, regressor, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "eu-west-1"})
    fs.mkdir("facejobs-recognize", region_name="eu-west-1")
    for name in ("obama.jpg", "biden.jpg"):
        fs.put_file(str(photos[name]), f"facejobs-recognize/photos/{name}")
    for name in ("config.json", "model.safetensors"):  # the model too is read from the bucket
        fs.put_file(f"{regressor}/{name}", f"facejobs-recognize/models/regressor/{name}")
    storage = {"endpoint_url": s3_server, "region": "eu-west-1"}
    manifest = "s3://facejobs-recognize/manifests/photos.parquet"
    spec = parse_spec(_spec(manifest, "s3://facejobs-recognize/out/", "s3://facejobs-recognize/models/regressor",
                            storage=storage))
    write_manifest(["../photos/obama.jpg", "s3://facejobs-recognize/photos/biden.jpg",
                    "s3://facejobs-recognize/photos/missing.jpg"], manifest, storage=spec.storage)
    summary = run(spec, progress=False)
    assert summary.status_counts == {"ok": 2, "fetch_error": 1}
    assert summary.lineage["models"]["regressor"]["uri"] == \
        "s3://facejobs-recognize/models/regressor/model.safetensors"
    assert fs.exists("facejobs-recognize/out/_SUCCESS")
    frame = pd.concat(pq.read_table(fs.open(p, "rb")).to_pandas()
                      for p in fs.glob("facejobs-recognize/out/part-*.parquet"))
    assert len(frame) == 3
    ok = frame[frame.status == "ok"].sort_values("key")
    expected, _ = _vectors(weights.load_model(Regressor, regressor).eval(), ok.to_dict("records"))
    np.testing.assert_allclose(np.stack(ok.params.to_numpy()), expected, atol=1e-5)


def test_the_stage_resizes_crops_and_scales_landmarks_to_the_regressor(photos, regressor):
    from jobs.kinds.recognize import RecognizeOptions, aligned_faces
    from jobs.stages import AlignStage, FetchStage

    rows = {"key": ["a", "b"], "uri": [str(photos["obama.jpg"]), str(photos["biden.jpg"])],
            "status": ["ok", "bad_uri"], "error": [None, "refused"]}
    aligned = AlignStage(RecognizeOptions(size=128))(FetchStage()(rows))  # twice the regressor's side
    stage = RecognizeStage(regressor, batch_size=4, device="cpu")
    out = stage(aligned).to_pylist()
    assert [row["status"] for row in out] == ["ok", "bad_uri"] and out[1]["params"] is None
    assert out[0]["_device"] == "cpu"

    model = weights.load_model(Regressor, regressor).eval()
    crops, landmarks = aligned_faces(aligned.slice(0, 1).to_pylist())
    assert crops[0].shape == (128, 128, 3)
    images, points = model_inputs(crops, landmarks, 64)
    assert images.shape == (1, 3, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1
    np.testing.assert_allclose(points.numpy(), landmarks / 2, rtol=1e-6)
    expected, confidence = model.vectors(images, points)
    np.testing.assert_allclose(out[0]["params"], expected[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(out[0]["style_confidence"], confidence[0].numpy(), atol=1e-5)
    unscaled, _ = model.vectors(images, torch.from_numpy(landmarks))  # landmarks matter: unscaled ones differ
    assert np.abs(unscaled[0].numpy() - expected[0].numpy()).max() > 1e-4


def test_a_regressor_for_another_rig_is_refused(tmp_path, regressor):
    config = weights.load_model(Regressor, regressor).config
    other = RegressorConfig(**{**config.__dict__, "continuous_size": config.continuous_size - 1,
                               "style_sizes": config.style_sizes[:-1]})
    weights.save_model(Regressor(other), str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"models\.regressor predicts \d+ continuous parameters and style groups "
                                         r"of \[.*\] choices; rig facejobs-default has"):
        RecognizeStage(str(tmp_path / "other"), device="cpu")


def test_without_a_regressor_the_missing_preset_is_named_before_any_work(tmp_path, monkeypatch):
    from facecore import presets

    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path / "presets")  # as before the preset is shipped
    write_manifest(["a.jpg"], str(tmp_path / "m.parquet"))
    spec = parse_spec({"kind": "recognize", "input": {"manifest": str(tmp_path / "m.parquet")},
                       "output": {"path": str(tmp_path / "out")}})
    assert spec.models.regressor is None
    with pytest.raises(FileNotFoundError, match="preset regressor is missing"):
        run(spec, progress=False)
    assert not (tmp_path / "out").exists()


def test_recognize_spec_defaults_and_errors_name_fields():
    base = {"kind": "recognize", "input": {"manifest": "m.csv"}, "output": {"path": "o"}}
    spec = parse_spec(base)
    assert (spec.options.method, spec.options.size, spec.options.render_size) == ("affine68", 128, 128)
    assert kind_of(spec).row_bytes(spec) > 2 * 1.5 * 128 ** 2
    for section, values, message in [
        ("models", {"regressor": " "}, r"models\.regressor: model must not be empty"),
        ("models", {"regressor": "s3://key:secret@bucket/r"}, r"models\.regressor: model: credentials"),
        ("models", {"imitator": "i"}, r"models\.imitator: unknown field"),
        ("options", {"render_size": 8}, r"options\.render_size: "),
        ("options", {"method": "affine5"}, r"options\.method: .*'affine5'"),
        ("options", {"max_iterations": 3}, r"options\.max_iterations: unknown field"),
        ("options", {"faces": "most"}, r"options\.faces: "),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec({**base, section: values})
