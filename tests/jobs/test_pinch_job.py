"""The pinch job on Ray: exactly-once rows with bad inputs mixed in, on logical GPUs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from facecore import weights
from facecore.images import decode_png
from facecore.models.regressor import Regressor
from facecore.rig import default_schema
from jobs.manifest import write_manifest
from jobs.pipeline import run
from jobs.samples import bad_input_corpus, tiny_pinch_models, tiny_regressor, write_corpus
from jobs.spec import SpecError, parse_spec

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Small untrained models (imitator 32 px, regressor 64 px): this tests the job's mechanics,
    bench/pinch_quality.py its quality. With the regressor, jobs start as by default (init: recognize)."""
    folder = tmp_path_factory.mktemp("models")
    return {**tiny_pinch_models(folder), "regressor": tiny_regressor(folder / "regressor")}


def _regressor_vectors(uri: str, rows: list[dict]) -> np.ndarray:
    """What the regressor itself says of rows' aligned crops (at its own side: no resize)."""
    model = weights.load_model(Regressor, uri).eval()
    crops = np.stack([decode_png(row["aligned"]) for row in rows])
    assert crops.shape[1] == model.config.image_size
    landmarks = torch.tensor(np.array([row["aligned_landmarks"] for row in rows], np.float32)).view(-1, 68, 2)
    return model.vectors(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0, landmarks)[0].numpy()


def test_pinch_job_rows_and_gpu_scheduling(ray_cluster, photos, checkpoints, tmp_path):
    from ray.util.state import list_actors

    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    paths = write_corpus(tmp_path / "in", corpus)
    write_manifest([str(p) for p in paths], str(tmp_path / "m.parquet"), keys=[p.name for p in paths])
    spec = parse_spec({
        "kind": "pinch", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": str(tmp_path / "out")},
        "models": checkpoints, "options": {"max_iterations": 10, "size": 64, "render_size": 64},
        "resources": {"num_gpus": 0.5, "batch_size": 4, "concurrency": 1},
    })
    summary = run(spec, progress=False)
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame.key) == sorted(corpus)  # largest face only: one row per input
    assert frame.set_index("key").status.to_dict() == {name: status for name, (_, status) in corpus.items()}
    assert summary.output_rows == len(corpus)
    ok = frame[frame.status == "ok"]
    for _, row in ok.iterrows():
        assert len(row["params"]) == default_schema().vector_size
        assert 0.0 <= min(row["params"]) and max(row["params"]) <= 1.0
        assert decode_png(row["preview"]).shape == (32, 32, 3)
        assert decode_png(row["render"]).shape == (64, 64, 3)
        assert decode_png(row["init_render"]).shape == (64, 64, 3)
        assert row["loss_end"] <= row["loss_start"] + 1e-6 and 1 <= row["iterations"] <= 10
    assert frame[frame.status != "ok"].params.isna().all() and frame[frame.status != "ok"].init_params.isna().all()
    # The search started from the regressor's vectors (init: recognize, the default).
    np.testing.assert_allclose(np.stack(ok.init_params.to_numpy()),
                               _regressor_vectors(checkpoints["regressor"], ok.to_dict("records")), atol=1e-5)
    # This cluster's address: another Ray on the machine must not make the state API guess.
    address = ray_cluster.get_runtime_context().gcs_address
    pinch_actors = [a for a in list_actors(address=address, detail=True, limit=1000)
                    if "MapWorker" in a.class_name and (a.required_resources or {}).get("GPU")]
    assert pinch_actors and all(a.required_resources["GPU"] == 0.5 for a in pinch_actors)

    lineage = summary.lineage  # a GPU share was asked for and no CUDA is here: said and recorded
    assert lineage["devices"]["model_pool"] == ["cpu (fallback: GPUs asked, no CUDA visible)"]
    assert any("see no CUDA device" in warning for warning in lineage["warnings"])
    assert set(lineage["models"]) >= {"imitator", "parser", "regressor", "dlib_landmarks68"}
    node = ray_cluster.get_runtime_context().get_node_id()  # one node here: every pool ran on it
    assert lineage["placement"] == {"cpu_pool": [node], "model_pool": [node], "commit_pool": [node]}
    assert lineage["node_labels"] == {node: {}}

    again = run(spec, progress=False)  # resumable: only the missing object (a systemic status) is tried again
    assert again.processed_rows == 1 and again.output_rows == len(corpus)
    assert again.status_counts == summary.status_counts


def test_cuda_required_but_absent_fails_fast(ray_cluster, photos, checkpoints, tmp_path):
    import time

    from jobs.output import JobFailed

    write_manifest([str(photos["obama.jpg"])], str(tmp_path / "m.parquet"))
    spec = parse_spec({
        "kind": "pinch", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": str(tmp_path / "out")},
        "models": checkpoints, "resources": {"num_gpus": 0.5, "device": "cuda"}})
    started = time.monotonic()
    with pytest.raises(JobFailed, match="no CUDA device and resources.device is cuda"):
        run(spec, progress=False)
    assert time.monotonic() - started < 60 and not (tmp_path / "out" / "_SUCCESS").exists()
    with pytest.raises(SpecError, match=r"resources: .*device: cuda needs num_gpus > 0"):
        parse_spec({"kind": "pinch", "input": {"manifest": "m"}, "output": {"path": "o"},
                    "resources": {"device": "cuda"}})


def test_every_face_of_a_group_photo_lands_in_one_part(ray_cluster, photos, checkpoints, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    names = ["obama.jpg", "biden.jpg", "obama2.jpg"]
    faces = [Image.open(photos[name]).convert("RGB").resize((300, 380)) for name in names]
    uris = []
    for count in (2, 3, 2, 3):  # group photos of two and three people
        group = Image.new("RGB", (300 * count, 380), (120, 120, 120))
        for i in range(count):
            group.paste(faces[(i + count) % 3], (300 * i, 0))
        path = tmp_path / f"group{len(uris)}.jpg"
        group.save(path, quality=92)
        uris.append(str(path))
    write_manifest(uris, str(tmp_path / "m.parquet"))
    common = {"input": {"manifest": str(tmp_path / "m.parquet")}, "options": {"faces": "all", "size": 64}}
    run(parse_spec({"kind": "align", **common, "output": {"path": str(tmp_path / "align")},
                    "options": {**common["options"], "method": "affine68"}}), progress=False)
    aligned = pd.read_parquet(tmp_path / "align")
    assert len(aligned) >= 8 and aligned.groupby("key").size().min() >= 2 and set(aligned.status) == {"ok"}
    spec = parse_spec({"kind": "pinch", **common, "output": {"path": str(tmp_path / "pinch")}, "models": checkpoints,
                       "options": {**common["options"], "max_iterations": 2, "render_size": 32},
                       "resources": {"batch_size": 1, "concurrency": 2, "model_concurrency": 1,
                                     "rows_per_block": 2}})
    first = run(spec, progress=False)
    pinched = pd.read_parquet(tmp_path / "pinch")
    assert sorted(zip(pinched.key, pinched.face_index)) == sorted(zip(aligned.key, aligned.face_index))
    owners: dict[str, set] = {}
    for part in (tmp_path / "pinch").glob("part-*.parquet"):
        for key in pq.read_table(part, columns=["key"]).column("key").to_pylist():
            owners.setdefault(key, set()).add(part.name)
    assert all(len(parts) == 1 for parts in owners.values()) and first.duplicates_removed == 0
    again = run(spec, progress=False)
    assert again.processed_rows == 0 and again.output_rows == len(aligned)
    assert len(pd.read_parquet(tmp_path / "pinch")) == len(aligned)


def test_pinch_spec_knows_its_held_parameters(tmp_path):
    with pytest.raises(SpecError, match=r"options\.hold: \['tail'\] are neither continuous parameters nor groups"):
        parse_spec({"kind": "pinch", "input": {"manifest": "m.csv"}, "output": {"path": "o"},
                    "models": {"imitator": "i", "parser": "p"}, "options": {"hold": ["yaw", "tail"]}})


def test_pinch_spec_start_and_landmark_options():
    from jobs.kinds import kind_of
    from jobs.kinds.pinch import pinch_config

    base = {"kind": "pinch", "input": {"manifest": "m.csv"}, "output": {"path": "o"}}
    options = parse_spec(base).options
    assert (options.init, options.landmark_weight, options.hold, options.frontal_imitator) == \
        ("recognize", 5.0, None, False)
    config = pinch_config(parse_spec({**base, "options": {"landmark_weight": 0.5, "hold": ["roll"],
                                                          "frontal_imitator": True, "styles": "search"}}).options)
    assert (config.landmark_weight, config.hold, config.frontal_imitator, config.search_styles) == \
        (0.5, ("roll",), True, True)
    # Lineage (and the rerun guard) hashes the regressor only when the search starts from it.
    models = {"imitator": "/m/i", "parser": "/m/p"}
    started = parse_spec({**base, "models": {**models, "regressor": "/m/r/"}})
    assert kind_of(started).model_files(started)["regressor"] == "/m/r/model.safetensors"
    reference = parse_spec({**base, "models": models, "options": {"init": "reference"}})
    assert "regressor" not in kind_of(reference).model_files(reference)
    for document, message in [
        ({"options": {"init": "regressor"}}, r"options\.init: .*'recognize' or 'reference'"),
        ({"options": {"landmark_weight": -1}}, r"options\.landmark_weight: "),
        ({"models": {"regressor": " "}}, r"models\.regressor: model must not be empty"),
        ({"models": {"regressor": "/m/r"}, "options": {"init": "reference"}},
         r"options: init: reference starts without the regressor, but models\.regressor is given"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec({**base, **document})


@pytest.fixture(scope="module")
def aligned_rows(photos):
    """Two photos aligned as a pinch job aligns them (64 px: the tiny regressor's side), without Ray."""
    from jobs.kinds.pinch import PinchOptions
    from jobs.stages import AlignStage, FetchStage

    rows = {"key": ["obama", "biden"], "uri": [str(photos["obama.jpg"]), str(photos["biden.jpg"])],
            "status": ["ok", "ok"], "error": [None, None]}
    return AlignStage(PinchOptions(size=64))(FetchStage()(rows))


def _stage(checkpoints, **options):
    from jobs.kinds.pinch import PinchOptions, PinchStage

    init = options.get("init", "recognize")
    return PinchStage(checkpoints["imitator"], checkpoints["parser"], PinchOptions(size=64, **options),
                      regressor_uri=checkpoints["regressor"] if init == "recognize" else None, device="cpu")


def test_pinch_starts_from_the_regressor_or_the_reference_face(checkpoints, aligned_rows):
    # No search steps and no style trials: the result is the start itself.
    still = {"max_iterations": 0, "try_styles": False}
    recognized = _stage(checkpoints, **still)(aligned_rows).to_pylist()
    expected = _regressor_vectors(checkpoints["regressor"], recognized)
    np.testing.assert_allclose([row["init_params"] for row in recognized], expected, atol=1e-5)
    np.testing.assert_allclose([row["params"] for row in recognized], expected, atol=1e-6)
    referenced = _stage(checkpoints, init="reference", **still)(aligned_rows).to_pylist()
    reference = default_schema().reference_vector()
    for row in referenced:
        np.testing.assert_allclose(row["init_params"], reference, atol=1e-7)
        np.testing.assert_allclose(row["params"], reference, atol=1e-7)
    assert not np.allclose(expected[0], reference, atol=1e-3)  # two different starts


def test_the_landmark_term_sees_the_landmarks_at_the_imitators_side(checkpoints, aligned_rows):
    from facecore.losses import landmark_error
    from facecore.rig import geometry, reference_face

    still = {"max_iterations": 0, "try_styles": False, "init": "reference"}
    with_term = _stage(checkpoints, landmark_weight=2.0, **still)(aligned_rows).to_pylist()
    without = _stage(checkpoints, landmark_weight=0.0, **still)(aligned_rows).to_pylist()
    schema, side = default_schema(), 32  # the tiny imitator's side; the crops are 64 px
    start = torch.from_numpy(np.stack([schema.reference_vector()] * 2))
    points = geometry.landmarks(geometry.values_from_vector(start, schema), side).float()
    landmarks = torch.tensor([row["aligned_landmarks"] for row in with_term], dtype=torch.float32).view(2, 68, 2)
    reference_points = torch.from_numpy(reference_face(side).landmarks).float()
    error = landmark_error(points, landmarks * (side / 64), reference_points).numpy()
    assert (error > 0.01).all()
    gaps = np.array([a["loss_start"] - b["loss_start"] for a, b in zip(with_term, without)])
    np.testing.assert_allclose(gaps, 2.0 * error, rtol=1e-3, atol=1e-5)


def test_report_of_a_job_on_the_shipped_models(ray_cluster, photos, tmp_path):
    from jobs.cli import main

    write_manifest([str(photos["obama.jpg"]), str(tmp_path / "missing.jpg")], str(tmp_path / "m.parquet"))
    spec = parse_spec({  # no models: the presets in facecore/presets
        "kind": "pinch", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": str(tmp_path / "out")},
        # The regressor is not shipped yet: start from the reference face.
        "options": {"max_iterations": 3, "size": 64, "render_size": 64, "init": "reference"},
    })
    run(spec, progress=False)
    assert main(["report", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "_report.html").read_text()
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("_tmp") or p.suffix == ".tmp"]
    assert len(pd.read_parquet(tmp_path / "out")) == 2  # the folder still reads as a table
    assert page.count("<tr>") == 3  # header + two rows
    # The ok row: its aligned face, the start's avatar (the reference face here) and the pinch avatar.
    assert page.count("data:image/jpeg;base64,") == 3
    assert "<th>start avatar (reference)</th><th>pinch avatar</th>" in page
    assert "fetch_error" in page and "hair_style=" in page and "loss " in page
    assert main(["report", str(tmp_path / "nothing")]) == 1


def _report_rows(page: str) -> dict[str, list[float]]:
    """Each body row of a report by its key: the mean grey level of each of its pictures, in order."""
    import base64
    import re

    from facecore.images import DecodeLimits, decode

    rows = page.split("<tr>")[2:]  # [0]: before the table, [1]: the header
    return {re.search(r"<b>(.*?)</b>", row).group(1):
            [round(float(decode(base64.b64decode(data), DecodeLimits()).rgb.mean()))
             for data in re.findall(r'<img src="data:image/jpeg;base64,([^"]+)">', row)] for row in rows}


@pytest.mark.parametrize("kind, init, headers", [
    ("recognize", None, ["photo", "avatar"]),
    ("pinch", "recognize", ["photo", "recognize avatar", "pinch avatar"]),
    ("pinch", "reference", ["photo", "start avatar (reference)", "pinch avatar"]),
])
def test_report_shows_the_face_beside_its_avatars(tmp_path, kind, init, headers):
    import json

    from facecore.images import encode_png
    from jobs.kinds.pinch import PINCH_SCHEMA
    from jobs.kinds.recognize import RECOGNIZE_SCHEMA
    from jobs.report import write_report
    from jobs.stages import CommitStage

    schema = default_schema()
    vector = schema.reference_vector().tolist()

    def png(value: int) -> bytes:
        return encode_png(np.full((32, 32, 3), value, np.uint8))

    pictures = {"aligned": png(10), "render": png(20), "init_render": png(30), "preview": png(40)}
    ok = {"key": "face", "uri": str(tmp_path / "gone.jpg"), "status": "ok", "params": vector, **pictures}
    if kind == "recognize":
        ok["style_confidence"] = [0.75] * len(schema.discrete)
    else:
        ok.update(init_params=vector, loss_start=0.5, loss_end=0.25, iterations=3)
    failed = {"key": "lost", "uri": str(tmp_path / "lost.jpg"), "status": "fetch_error", "error": "not found"}
    table = pa.Table.from_pylist([ok, failed], schema=RECOGNIZE_SCHEMA if kind == "recognize" else PINCH_SCHEMA)
    options = {} if init is None else {"init": init}
    metadata = {"facejobs.kind": kind, "facejobs.options": json.dumps(options),
                "facejobs.params": json.dumps(list(schema.vector_names))}
    CommitStage(str(tmp_path / "out"), metadata=metadata)(table)
    page = (tmp_path / "out" / "_report.html").read_text() if write_report(str(tmp_path / "out")) else ""
    assert "<tr>" + "".join(f"<th>{h}</th>" for h in headers) + "<th>row</th></tr>" in page
    # The aligned face (grey 10), then the start's avatar (30) for pinch, then the result's (20);
    # no preview (40). The lost row's photo cannot be shown.
    assert _report_rows(page) == {"face": [10, 20] if kind == "recognize" else [10, 30, 20], "lost": []}
    assert page.count("(photo unavailable)") == 1
    if kind == "recognize":  # each style with the regressor's confidence in it
        assert page.count(" (0.75)") == len(schema.discrete)
