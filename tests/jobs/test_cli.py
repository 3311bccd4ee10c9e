import numpy as np
import yaml

from jobs.cli import main
from jobs.manifest import write_manifest


def test_validate_reports_rows(tmp_path, capsys):
    write_manifest(["a.jpg", "b.jpg"], str(tmp_path / "m.parquet"))
    spec = {"kind": "align", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": "o"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 0
    assert "valid align job, 2 input rows" in capsys.readouterr().out


def test_missing_manifest_fails_fast_naming_it(tmp_path, capsys):
    spec = {"kind": "align", "input": {"manifest": str(tmp_path / "none.csv")}, "output": {"path": "o"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "s.yaml")]) == 2
    assert "input.manifest:" in capsys.readouterr().err


def test_bad_spec_exit_code_and_message(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(
        "kind: align\ninput: {manifest: m.csv}\noutput: {path: o}\nresources: {batch_size: -1}\n")
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    assert "resources.batch_size:" in capsys.readouterr().err


# The demo's pinch job starts from the shipped regressor (options.init: recognize).
def test_demo_runs_align_recognize_pinch_and_transfer_on_the_shipped_models(ray_cluster, photos, tmp_path, capsys):
    import pandas as pd

    assert main(["demo", "--output", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== align" in out and "== recognize" in out and "== pinch" in out and "== transfer" in out
    for job in ("aligned", "recognize", "pinch"):
        frame = pd.read_parquet(tmp_path / "demo" / job)
        # 6 photos + 15 corpus files (two faces in one), GIF87a now among the ok rows; HEIC says unsupported.
        assert len(frame) == 21 and (frame.status == "ok").sum() == 13
        assert (frame.status == "unsupported_format").sum() == 1
    pinched = pd.read_parquet(tmp_path / "demo" / "pinch")
    ok = pinched[pinched.status == "ok"]
    # Never worse than the start, better on most faces (the rest keep the start).
    assert (ok.loss_end <= ok.loss_start).all() and (ok.loss_end < ok.loss_start).mean() > 0.5
    assert (ok.iterations <= 100).all()
    assert (tmp_path / "demo" / "pinch" / "_report.html").is_file()
    assert (tmp_path / "demo" / "recognize" / "_report.html").is_file()
    recognized = pd.read_parquet(tmp_path / "demo" / "recognize")
    # The pinch search starts where recognize ended, face for face.
    starts = pinched[pinched.status == "ok"].set_index(["uri", "face_index"]).init_params
    found = recognized[recognized.status == "ok"].set_index(["uri", "face_index"]).params
    assert all(np.allclose(starts[key], found[key], atol=1e-5) for key in found.index)
    # Transfer: three named expressions per ok face (largest face only), one row per bad input.
    transferred = pd.read_parquet(tmp_path / "demo" / "transfer")
    ok = transferred[transferred.status == "ok"]
    assert len(ok) == 3 * 12 and len(transferred) == 3 * 12 + 8
    assert sorted(set(ok.target)) == ["eyes_closed", "smile", "surprise"]
    assert (ok.id_distance < 0.6).mean() >= 0.9 and ok.frame.notna().all()
    assert (tmp_path / "demo" / "transfer" / "_report.html").is_file()


def test_a_driver_inside_a_cluster_joins_it_as_it_is(monkeypatch):
    # `ray job submit -- facejobs run spec.yaml` sets RAY_ADDRESS: join that cluster,
    # and leave Ray's multi-machine switch alone (loopback is only for the Ray we start).
    from jobs import loopback
    from jobs.loopback import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None and cluster_address("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert cluster_address(None) == "http://10.0.0.5:8265" and cluster_address("auto") == "auto"
    calls = []
    monkeypatch.setattr(loopback, "keep_local_ray_on_loopback", lambda: calls.append(1))
    assert main(["run", "/nonexistent/spec.yaml"]) == 2  # fails on the spec, after the address decision
    assert calls == []
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(["run", "/nonexistent/spec.yaml"]) == 2
    assert calls == [1]
