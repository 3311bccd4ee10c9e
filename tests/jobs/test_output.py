"""The output folder's exactly-once machinery, without Ray."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.output import OutputError, OutputFolder, part_name
from jobs.storage import locate


def _table(keys, statuses=None):
    return pa.table({"key": keys, "status": statuses or ["ok"] * len(keys)})


def test_part_names_depend_on_the_key_set_only():
    assert part_name(["b", "a", "a"]) == part_name(["a", "b"])
    assert part_name(["a"]) != part_name(["a", "b"])


def test_commit_is_idempotent_and_leaves_no_temporaries(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.prepare()
    first = folder.commit(_table(["a", "b"]))
    second = folder.commit(_table(["b", "a"]))
    assert first == second
    assert [p.rsplit("/", 1)[-1] for p in folder.parts()] == [first]
    assert not list((tmp_path / "out" / "_tmp").iterdir())
    assert folder.done_keys() == {"a", "b"}


def test_reconcile_removes_repeated_keys_and_counts(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.prepare()
    folder.commit(_table(["a", "b", "b"]))  # b has two faces
    folder.commit(_table(["b", "b", "c"], ["ok", "ok", "no_face"]))  # a retry regrouped b
    counts, rows, removed, extra = folder.reconcile({"a", "b", "c"})
    assert removed == 2 and rows == 4 and extra == 0
    assert counts == {"ok": 3, "no_face": 1}
    table = pa.concat_tables(pq.read_table(p) for p in folder.parts())
    assert sorted(table.column("key").to_pylist()) == ["a", "b", "b", "c"]


def test_reconcile_refuses_missing_rows(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.prepare()
    folder.commit(_table(["a"]))
    with pytest.raises(OutputError, match=r"1 input rows are missing .*'z'"):
        folder.reconcile({"a", "z"})


def test_prepare_clears_success_and_temporaries(tmp_path):
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "part-x.parquet.123").write_bytes(b"half")
    (out / "_SUCCESS").write_text("{}")
    OutputFolder(locate(str(out))).prepare()
    assert sorted(p.name for p in out.iterdir()) == []
