"""The kinds registry and what the photo kinds share, without Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from jobs.kinds import KINDS, kind_of
from jobs.kinds.base import refuse_bad_uris, storage_schemes
from jobs.pipeline import block_sizes
from jobs.spec import parse_spec


def test_every_kind_is_registered_with_its_spec():
    assert sorted(KINDS) == ["align", "landmarks", "pinch", "recognize", "render", "swap", "train", "transfer"]
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind.spec_model.model_fields["kind"].annotation.__args__ == (name,)
        if kind.runnable:
            assert kind.output_schema is not None and set(kind.field_docs) <= set(kind.output_schema.names)


def test_uris_outside_the_jobs_storage_become_bad_uri():
    rows = pa.table({"key": list("abcdefg"), "uri": [
        "/photos/a.jpg",
        "s3://bucket/b.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "S3://bucket/c.jpg",
        "s3://user:secret@bucket/d.jpg",
        "s3://other-bucket/e.jpg",
        "s3a://bucket/f.jpg",
    ]})
    local = refuse_bad_uris(rows, storage_schemes("/m.parquet", "/out"), [])
    assert local.column("status").to_pylist() == ["ok"] + ["bad_uri"] * 6
    assert "uri scheme 'http' is not allowed for this job (allowed: local path)" in local.column("error")[2].as_py()
    on_s3 = refuse_bad_uris(rows, storage_schemes("s3://bucket/m.parquet", "s3://bucket/out"), [])
    assert on_s3.column("status").to_pylist() == ["bad_uri", "ok", "bad_uri", "ok", "bad_uri", "ok", "ok"]
    assert on_s3.column("error")[4].as_py() == "uri carries user info or credentials"
    fenced = refuse_bad_uris(rows, {"s3"}, ["s3://bucket/"])
    assert fenced.column("status").to_pylist() == ["bad_uri", "ok", "bad_uri", "bad_uri", "bad_uri", "bad_uri",
                                                   "bad_uri"]
    assert "outside input.allowed_prefixes" in fenced.column("error")[5].as_py()
    assert fenced.column("error")[1].as_py() is None


@pytest.mark.parametrize("rows", [20, 100, 200, 1000, 5000, 1_000_000])
def test_parts_hold_64_rows_or_the_whole_small_job_and_at_most_256_images(rows):
    spec = parse_spec({"kind": "align", "input": {"manifest": "m.csv"}, "output": {"path": "o"}})
    sizes = block_sizes(spec, kind_of(spec), rows)
    assert sizes.part_rows % sizes.work_rows == 0  # a part is whole work blocks: no key is ever cut
    assert 8 <= sizes.work_rows <= max(8, -(-rows // 32))  # ~16 work blocks per CPU actor
    blocks = [min(sizes.work_rows, rows - start) for start in range(0, rows, sizes.work_rows)]
    per_part = sizes.part_rows // sizes.work_rows
    parts = [sum(blocks[i:i + per_part]) for i in range(0, len(blocks), per_part)]
    assert sum(parts) == rows and max(parts) <= 256
    assert all(part >= min(64, rows) for part in parts[:-1])  # only the remainder may be smaller
    assert len(parts) <= max(1, rows // 64) + 1


def test_parts_of_rows_without_images_are_larger_and_explicit_sizes_win():
    spec = parse_spec({"kind": "landmarks", "input": {"manifest": "m.csv"}, "output": {"path": "o"}})
    assert block_sizes(spec, kind_of(spec), 10_000_000).part_rows == 4096
    big = parse_spec({"kind": "align", "input": {"manifest": "m.csv"}, "output": {"path": "o"},
                      "options": {"size": 2048}})
    assert block_sizes(big, kind_of(big), 1_000_000).part_rows == 15  # ~6 MB a crop: parts of about 96 MB
    fixed = parse_spec({"kind": "align", "input": {"manifest": "m.csv"}, "output": {"path": "o"},
                        "resources": {"rows_per_block": 3}})
    assert (block_sizes(fixed, kind_of(fixed), 1000).work_rows, block_sizes(fixed, kind_of(fixed), 1000).part_rows) \
        == (3, 3)
