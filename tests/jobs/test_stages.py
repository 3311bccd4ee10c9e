"""Stages called on plain dicts, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from facecore.face.landmarks import eye_centres
from facecore.images import decode_png
from jobs.samples import bad_input_corpus, write_corpus
from jobs.spec import AlignOptions
from jobs.stages import ALIGN_SCHEMA, AlignStage, FetchStage


@pytest.fixture(scope="module")
def corpus(photos, tmp_path_factory):
    corpus = bad_input_corpus(photos["obama.jpg"], photos["biden.jpg"])
    folder = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(folder, corpus)
    return {path.name: (str(path), corpus[path.name][1]) for path in paths}


def test_fetch_reads_bytes_and_reports_missing(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "big.bin").write_bytes(b"x" * 100)
    batch = {"key": ["a", "b", "c", "d"],
             "uri": [str(tmp_path / "a.bin"), str(tmp_path / "nope.bin"), str(tmp_path / "big.bin"), str(tmp_path)]}
    out = FetchStage(max_bytes=50)(batch).to_pydict()
    assert out["data"] == [b"abc", None, None, None]
    assert out["status"] == ["ok", "fetch_error", "too_large", "fetch_error"]
    assert "not found" in out["error"][1]


def test_every_bad_input_gets_its_status(corpus):
    keys = sorted(corpus)
    batch = {"key": keys, "uri": [corpus[k][0] for k in keys]}
    out = AlignStage(AlignOptions(faces="all"))(FetchStage()(batch))
    assert out.schema.equals(ALIGN_SCHEMA)
    rows = out.to_pylist()
    statuses: dict[str, set] = {}
    for row in rows:
        statuses.setdefault(row["key"], set()).add(row["status"])
    assert statuses == {key: {corpus[key][1]} for key in keys}
    assert sorted(r["face_index"] for r in rows if r["key"] == "several_faces.jpg") == [0, 1]
    for row in rows:
        if row["status"] == "ok":
            assert row["error"] is None and len(row["landmarks"]) == 136 and len(row["matrix"]) == 6
            assert decode_png(row["aligned"]).shape == (256, 256, 3)
        else:
            assert row["error"], row


def test_exif_rotated_photo_aligns_like_the_upright_one(corpus):
    stage = AlignStage()
    names = ["exif_rotated.jpg", "cmyk.jpg"]  # cmyk.jpg is the upright original, recoloured
    out = stage(FetchStage()({"key": names, "uri": [corpus[n][0] for n in names]})).to_pylist()
    rotated, upright = out
    assert (rotated["width"], rotated["height"]) == (upright["width"], upright["height"])
    gap = np.abs(np.array(rotated["landmarks"]) - np.array(upright["landmarks"])).mean()
    assert gap < 3.0, gap
    eyes = eye_centres(np.array(rotated["aligned_landmarks"]).reshape(68, 2))
    assert np.linalg.norm(eyes - stage.detector.reference.eye_centres, axis=1).max() < 2.0


def test_index_policy_and_upstream_errors_pass_through(corpus):
    stage = AlignStage(AlignOptions(faces="index:1"))
    batch = {"key": ["two", "one", "gone"],
             "uri": [corpus["several_faces.jpg"][0], corpus["grey.jpg"][0], "x"],
             "data": [open(corpus["several_faces.jpg"][0], "rb").read(),
                      open(corpus["grey.jpg"][0], "rb").read(), None],
             "status": ["ok", "ok", "fetch_error"],
             "error": [None, None, "object not found: x"]}
    rows = stage(batch).to_pylist()
    assert [(r["key"], r["status"], r["face_index"]) for r in rows] == [
        ("two", "ok", 1), ("one", "no_face", None), ("gone", "fetch_error", None)]
    assert rows[1]["error"] == "no face at index 1: 1 detected"
    assert rows[2]["error"] == "object not found: x"


def test_stage_is_deterministic(corpus, tmp_path):
    # Ray retries a block on another actor: a fresh stage must give the same rows,
    # byte for byte, so that the retried commit replaces the same part.
    from jobs.stages import CommitStage

    names = ["several_faces.jpg", "grey.jpg", "exif_rotated.jpg", "no_face.png", "empty.jpg"]
    batch = {"key": names, "uri": [corpus[n][0] for n in names]}
    first = AlignStage(AlignOptions(faces="all"))(FetchStage()(batch))
    second = AlignStage(AlignOptions(faces="all"))(FetchStage()(batch))
    assert first.num_rows == 6 and first.column("status").to_pylist().count("ok") == 4
    assert first.equals(second)
    parts = [CommitStage(str(tmp_path / "out"))(table).column("part")[0].as_py() for table in (first, second)]
    assert parts[0] == parts[1] and len(list((tmp_path / "out").glob("part-*.parquet"))) == 1


def test_commit_stage_is_safe_to_run_twice(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.stages import CommitStage

    stage = CommitStage(str(tmp_path / "out"), metadata={"facejobs.kind": "align"})
    batch = pa.table({"key": ["a", "a", "b"], "status": ["ok", "ok", "no_face"]})
    first = stage(batch).to_pylist()
    second = stage(batch).to_pylist()
    assert first == second and first[0]["rows"] == 3 and first[0]["keys"] == 2
    parts = list((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) == 1
    assert pq.read_schema(parts[0]).metadata[b"facejobs.kind"] == b"align"
    assert stage(batch.slice(0, 0)).num_rows == 0
