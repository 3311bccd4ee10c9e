"""The render job: sampled or given rig parameters to Parquet."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from facecore.images import decode_png
from facecore.rig import HELEN_CLASSES, default_schema
from jobs.manifest import sampled_render_rows
from jobs.pipeline import run
from jobs.kinds.render import RenderOptions
from jobs.spec import SpecError, parse_spec
from jobs.kinds.render import RenderStage


def _spec(output, **options) -> dict:
    return {"kind": "render", "output": {"path": str(output)},
            "options": {"count": 24, "size": 64, "seed": 5, **options},
            "resources": {"concurrency": 2, "rows_per_block": 8}}


def test_sampling_depends_on_seed_and_index_only():
    stage = RenderStage(RenderOptions(count=10, size=64, seed=3))
    rows = sampled_render_rows(10, 3)
    whole = stage(rows).to_pylist()
    alone = stage(rows.slice(7, 1)).to_pylist()
    assert alone[0]["params"] == whole[7]["params"] and alone[0]["image"] == whole[7]["image"]
    other_seed = RenderStage(RenderOptions(count=10, size=64, seed=4))(sampled_render_rows(10, 4)).to_pylist()
    assert other_seed[7]["params"] != whole[7]["params"]


def test_fixed_parameters_are_held():
    schema = default_schema()
    stage = RenderStage(RenderOptions(count=20, size=64, seed=1, fixed={"yaw": 0.5, "hair_style": "bald"}))
    rows = stage(sampled_render_rows(20, 1)).to_pylist()
    for row in rows:
        values = schema.decode(np.array(row["params"]))
        assert values["yaw"] == 0.5 and values["hair_style"] == "bald"
    assert len({tuple(r["params"]) for r in rows}) == 20


def test_expression_pairs_share_the_person_and_are_drawn_per_row():
    schema = default_schema()
    options = RenderOptions(count=6, size=64, seed=2, align="affine68", pairs="expression", pose_jitter=0.05,
                            fixed={"hair_style": "bob"})
    stage = RenderStage(options)
    rows = stage(sampled_render_rows(6, 2)).to_pylist()
    expression = set(schema.indices("expression").tolist())
    for row in rows:
        source, target = np.array(row["params"]), np.array(row["target_params"])
        differs = {i for i in range(schema.continuous_size) if source[i] != target[i]}
        assert differs - expression <= set(schema.indices("pose").tolist()) and differs & expression
        assert schema.decode(target)["hair_style"] == "bob"
        assert decode_png(row["target_image"]).shape == (64, 64, 3) and len(row["target_landmarks"]) == 136
        assert row["target_image"] != row["image"]
    alone = stage(sampled_render_rows(6, 2).slice(4, 1)).to_pylist()[0]
    assert alone["target_params"] == rows[4]["target_params"] and alone["target_image"] == rows[4]["target_image"]


def test_swap_pairs_hold_two_people_and_the_truth_in_the_targets_frame():
    schema = default_schema()
    stage = RenderStage(RenderOptions(count=4, size=64, seed=3, align="affine68", pairs="swap"))
    rows = stage(sampled_render_rows(4, 3)).to_pylist()
    identity = schema.indices("identity")
    for row in rows:
        source, target, truth = (np.array(row[f"{prefix}params"]) for prefix in ("", "target_", "truth_"))
        rest = np.setdiff1d(np.arange(len(truth)), identity)
        assert np.array_equal(truth[identity], source[identity]) and np.array_equal(truth[rest], target[rest])
        assert not np.array_equal(source[identity], target[identity])
        assert decode_png(row["truth_image"]).shape == (64, 64, 3) and len(row["truth_landmarks"]) == 136
        # The truth is drawn through the target's alignment: the background's corner is the target's.
        assert np.array_equal(decode_png(row["truth_image"])[:3, :3], decode_png(row["target_image"])[:3, :3])
    alone = stage(sampled_render_rows(4, 3).slice(2, 1)).to_pylist()[0]
    assert alone["truth_image"] == rows[2]["truth_image"]


def test_expression_pair_targets_share_the_source_frame_unless_asked_otherwise():
    from jobs.samples import aligned_expression_pairs

    # No pose change: in the source's frame nothing but the expression moves (the
    # nose bridge stays put, the background's corner is the same pixels); each
    # aligned on its own landmarks, the frame follows the expression.
    (source, source_points, _), (target, target_points, _) = aligned_expression_pairs(6, 2, 64, pose_jitter=0.0)
    assert np.abs(source_points[:, 27:31] - target_points[:, 27:31]).max() < 1e-4
    assert np.array_equal(source[:, :4, :4], target[:, :4, :4])
    (source, source_points, _), (target, target_points, _) = aligned_expression_pairs(6, 2, 64, pose_jitter=0.0,
                                                                                      pair_frame="target")
    assert np.linalg.norm(source_points[:, 27:31] - target_points[:, 27:31], axis=2).mean() > 0.1


@pytest.mark.ray
def test_render_job_writes_images_masks_landmarks(ray_cluster, tmp_path):
    summary = run(parse_spec(_spec(tmp_path / "out")), progress=False)
    assert summary.output_rows == 24 and summary.ok_rows == 24
    frame = pd.read_parquet(tmp_path / "out")
    assert sorted(frame.key) == [f"s5-{i:09d}" for i in range(24)]
    schema = default_schema()
    metadata = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert json.loads(metadata[b"facejobs.params"]) == list(schema.vector_names)
    assert json.loads(metadata[b"facejobs.mask_classes"]) == list(HELEN_CLASSES)
    row = frame.iloc[0]
    image, mask = decode_png(row["image"]), decode_png(row["mask"])
    assert image.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.max() < len(HELEN_CLASSES)
    assert len(row.params) == schema.vector_size and len(row.landmarks) == 136

    again = run(parse_spec(_spec(tmp_path / "again")), progress=False)  # same seed: same pixels
    assert again.ok_rows == 24
    second = pd.read_parquet(tmp_path / "again").set_index("key").loc[frame.key]
    assert (second.image.values == frame.image.values).all()

    pairs = run(parse_spec(_spec(tmp_path / "pairs", pairs="expression", count=8)), progress=False)
    assert pairs.ok_rows == 8
    paired = pd.read_parquet(tmp_path / "pairs").set_index("key")
    assert paired.target_image.notna().all() and (paired.target_image != paired.image).all()
    pair_metadata = pq.read_schema(next((tmp_path / "pairs").glob("part-*.parquet"))).metadata
    assert "target_params" in json.loads(pair_metadata[b"facejobs.columns"])


@pytest.mark.ray
def test_render_job_from_a_parameter_manifest(ray_cluster, tmp_path):
    (tmp_path / "params.csv").write_text(
        "key,yaw,smile,hair_style\n"
        "frontal,0.5,0.0,short\n"
        "smiling,0.5,1.0,long\n"
        "broken,0.5,3.0,short\n"
        "mohawk,0.5,0.0,mohawk\n"
    )
    spec = parse_spec({"kind": "render", "input": {"manifest": str(tmp_path / "params.csv")},
                       "output": {"path": str(tmp_path / "out")}, "options": {"size": 64}})
    summary = run(spec, progress=False)
    assert summary.status_counts == {"ok": 2, "bad_params": 2}
    frame = pd.read_parquet(tmp_path / "out").set_index("key")
    assert "outside [0, 1]" in frame.loc["broken", "error"]
    assert "'mohawk' is not one of" in frame.loc["mohawk", "error"]
    schema = default_schema()
    smiling = schema.decode(np.array(frame.loc["smiling", "params"]))
    assert smiling["smile"] == 1.0 and smiling["hair_style"] == "long" and smiling["face_width"] == 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fixed": {"nose_size": 0.5}}, r"options\.fixed: unknown parameters \['nose_size'\]"),
        ({"fixed": {"yaw": 2.0}}, r"options\.fixed: yaw: 2\.0 is outside"),
        ({"size": 4}, r"options\.size: .*greater than or equal to 16"),
        ({"rig": "/nonexistent/rig.yaml"}, r"options\.rig: cannot read rig schema"),
        ({"pairs": "pose"}, r"options\.pairs: "),
        ({"pose_jitter": 1.5}, r"options\.pose_jitter: "),
    ],
)
def test_render_spec_errors(tmp_path, options, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_spec(tmp_path, **options))


def test_pairs_need_sampled_renders(tmp_path):
    spec = _spec(tmp_path / "out", pairs="expression")
    spec["input"] = {"manifest": str(tmp_path / "params.parquet")}
    with pytest.raises(SpecError, match="options.pairs"):
        parse_spec(spec)
