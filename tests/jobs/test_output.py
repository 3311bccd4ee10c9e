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
    folder.begin()
    first = folder.commit(_table(["a", "b"]))
    second = folder.commit(_table(["b", "a"]))
    assert first == second
    assert [p.rsplit("/", 1)[-1] for p in folder.parts()] == [first]
    assert not [p for p in (tmp_path / "out" / "_tmp").rglob("*") if p.is_file()]
    assert sorted(folder.done_keys().to_pylist()) == ["a", "b"]
    folder.end()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [first]  # no _tmp/ left behind


def test_reconcile_removes_repeated_keys_and_counts(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.begin()
    folder.commit(_table(["a", "b", "b"]))  # b has two faces
    folder.commit(_table(["b", "b", "c"], ["ok", "ok", "no_face"]))  # a retry regrouped b
    result = folder.reconcile(pa.array(["a", "b", "c"]))
    assert result.duplicates_removed == 2 and result.output_rows == 4 and result.extra_keys == 0
    assert result.status_counts == {"ok": 3, "no_face": 1}
    table = pa.concat_tables(pq.read_table(p) for p in folder.parts())
    assert sorted(table.column("key").to_pylist()) == ["a", "b", "b", "c"]


def test_reconcile_refuses_missing_rows(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.begin()
    folder.commit(_table(["a"]))
    with pytest.raises(OutputError, match=r"1 input rows are missing .*'z'"):
        folder.reconcile(pa.array(["a", "z"]))


def test_begin_clears_dead_runs_temporaries_but_keeps_success(tmp_path):
    out = tmp_path / "out"
    (out / "_tmp" / "dead-run").mkdir(parents=True)
    (out / "_tmp" / "dead-run" / "part-x.parquet.123").write_bytes(b"half")
    (out / "_SUCCESS").write_text("{}")
    folder = OutputFolder(locate(str(out)), run_id="r1")
    folder.begin()
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS"]  # kept until the run has work to do
    folder.clear_success()
    assert sorted(p.name for p in out.iterdir()) == []


def test_reconcile_reports_keys_the_manifest_lacks(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.begin()
    folder.commit(_table(["a", "b"]))
    folder.commit(_table(["old", "old"], ["ok", "no_face"]))  # from a larger manifest
    result = folder.reconcile(pa.array(["a", "b"]))
    assert result.status_counts == {"ok": 2} and result.output_rows == 2
    assert result.extra_keys == 1 and result.stale_rows == 2 and result.parts == 2


def test_listing_is_never_stale(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.begin()
    assert folder.parts() == []
    OutputFolder(locate(str(tmp_path / "out"))).commit(_table(["a"]))  # another writer
    assert len(folder.parts()) == 1


def test_keys_that_failed_systemically_are_redone_and_their_new_rows_kept(tmp_path):
    folder = OutputFolder(locate(str(tmp_path / "out")))
    folder.begin()
    folder.commit(_table(["a", "b", "c"], ["storage_error", "ok", "fetch_error"]))
    folder.commit(_table(["d"], ["no_face"]))
    assert sorted(folder.done_keys().to_pylist()) == ["b", "d"]  # a and c are tried again
    folder.commit(_table(["a", "c"], ["ok", "fetch_error"]))  # the rerun: a now works, c is still missing
    result = folder.reconcile(pa.array(["a", "b", "c", "d"]))
    assert result.status_counts == {"ok": 2, "fetch_error": 1, "no_face": 1} and result.duplicates_removed == 2
    table = pa.concat_tables(pq.read_table(p) for p in folder.parts())
    assert sorted(zip(table.column("key").to_pylist(), table.column("status").to_pylist())) == [
        ("a", "ok"), ("b", "ok"), ("c", "fetch_error"), ("d", "no_face")]
