"""The pinch job on Ray: exactly-once rows with bad inputs mixed in, on logical GPUs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from facecore import weights
from facecore.images import decode_png
from facecore.models.imitator import Imitator, ImitatorConfig
from facecore.models.parsing import FaceParser, ParsingConfig
from facecore.rig import default_schema
from jobs.manifest import write_manifest
from jobs.pipeline import run
from jobs.samples import bad_input_corpus, write_corpus
from jobs.spec import SpecError, parse_spec

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Small untrained models: this tests the job's mechanics, bench/pinch_quality.py its quality."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    weights.save_model(Imitator(ImitatorConfig(param_dim=default_schema().vector_size, image_size=32,
                                               base_channels=8)), str(folder / "imitator"))
    weights.save_model(FaceParser(ParsingConfig(base_channels=8, stages=3)), str(folder / "parser"))
    return {"imitator": str(folder / "imitator"), "parser": str(folder / "parser")}


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
        assert row["loss_end"] <= row["loss_start"] + 1e-6 and 1 <= row["iterations"] <= 10
    assert frame[frame.status != "ok"].params.isna().all()
    pinch_actors = [a for a in list_actors(detail=True, limit=1000)
                    if "MapWorker" in a.class_name and (a.required_resources or {}).get("GPU")]
    assert pinch_actors and all(a.required_resources["GPU"] == 0.5 for a in pinch_actors)

    again = run(spec, progress=False)  # resumable: nothing left to do
    assert again.processed_rows == 0 and again.output_rows == len(corpus)


def test_pinch_spec_knows_its_held_parameters(tmp_path):
    with pytest.raises(SpecError, match=r"options\.hold: \['tail'\] are not continuous parameters"):
        parse_spec({"kind": "pinch", "input": {"manifest": "m.csv"}, "output": {"path": "o"},
                    "models": {"imitator": "i", "parser": "p"}, "options": {"hold": ["yaw", "tail"]}})


def test_report_of_a_job_on_the_shipped_models(ray_cluster, photos, tmp_path):
    from jobs.cli import main

    write_manifest([str(photos["obama.jpg"]), str(tmp_path / "missing.jpg")], str(tmp_path / "m.parquet"))
    spec = parse_spec({  # no models: the presets in facecore/presets
        "kind": "pinch", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": str(tmp_path / "out")},
        "options": {"max_iterations": 3, "size": 64, "render_size": 64},
    })
    run(spec, progress=False)
    assert main(["report", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "_report.html").read_text()
    assert len(pd.read_parquet(tmp_path / "out")) == 2  # the folder still reads as a table
    assert page.count("<tr>") == 3  # header + two rows
    assert page.count("data:image/jpeg;base64,") == 4  # photo, aligned, preview, render of the ok row
    assert "fetch_error" in page and "hair_style=" in page and "loss " in page
    assert main(["report", str(tmp_path / "nothing")]) == 1
