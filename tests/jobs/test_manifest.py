import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import ManifestError, read_manifest, stable_key, write_manifest


def test_formats_agree(tmp_path):
    uris = ["a.jpg", "sub/b.png", "/abs/c.jpg", "s3://bucket/d.jpg"]
    write_manifest(uris, str(tmp_path / "m.parquet"))
    (tmp_path / "m.csv").write_text("uri\n" + "\n".join(uris) + "\n")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"uri": u}) for u in uris) + "\n")
    tables = [read_manifest(str(tmp_path / name)) for name in ("m.parquet", "m.csv", "m.jsonl")]
    resolved = [str(tmp_path / "a.jpg"), str(tmp_path / "sub/b.png"), "/abs/c.jpg", "s3://bucket/d.jpg"]
    for table in tables:
        assert table.column_names == ["key", "uri"]
        assert table.column("key").to_pylist() == [stable_key(u) for u in resolved]  # keys of resolved uris
        assert table.column("uri").to_pylist() == resolved


def test_one_photo_written_two_ways_gets_one_key(tmp_path):
    (tmp_path / "sub").mkdir()
    spellings = ["sub/a.jpg", f"  {tmp_path}/sub/a.jpg ", f"file://{tmp_path}/sub/a.jpg", "./sub/../sub/a.jpg"]
    keys = set()
    for i, spelling in enumerate(spellings):
        (tmp_path / f"m{i}.csv").write_text(f"uri\n{spelling}\n")
        table = read_manifest(str(tmp_path / f"m{i}.csv"))
        assert table.column("uri").to_pylist() == [str(tmp_path / "sub" / "a.jpg")]
        keys.update(table.column("key").to_pylist())
    assert keys == {stable_key(str(tmp_path / "sub" / "a.jpg"))}
    (tmp_path / "both.csv").write_text(f"uri\nsub/a.jpg\nfile://{tmp_path}/sub/a.jpg\n")
    with pytest.raises(ManifestError, match="duplicate keys"):
        read_manifest(str(tmp_path / "both.csv"))


def test_s3_relative_uris_resolve_in_the_bucket():
    import pyarrow as pa

    from jobs.manifest import resolve_uris
    from jobs.storage import locate

    base = locate("s3://bucket/manifests/2026")
    uris = pa.array(["../photos/a.jpg", "b.jpg", "s3://other/c.jpg", "/abs/d.jpg"])
    assert resolve_uris(uris, base).to_pylist() == [
        "s3://bucket/manifests/photos/a.jpg", "s3://bucket/manifests/2026/b.jpg", "s3://other/c.jpg", "/abs/d.jpg"]


def test_explicit_keys_kept_as_strings(tmp_path):
    (tmp_path / "m.csv").write_text("key,uri\n001,a.jpg\n002,b.jpg\n")
    assert read_manifest(str(tmp_path / "m.csv")).column("key").to_pylist() == ["001", "002"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("path\na.jpg\n", "no 'uri' column"),
        ("uri\na.jpg\na.jpg\n", "duplicate keys .* give a 'key' column"),
        ("key,uri\nx,a.jpg\nx,b.jpg\n", r"duplicate keys \['x'\]"),
        ('uri\na.jpg\n""\n', r"empty uri in rows \[1\]"),
    ],
)
def test_bad_manifests(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(tmp_path / "m.csv"))


def test_missing_and_unknown(tmp_path):
    with pytest.raises(ManifestError, match=r"input\.manifest: .*nope\.parquet does not exist"):
        read_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    with pytest.raises(ManifestError, match="unknown format 'xlsx'"):
        read_manifest(str(tmp_path / "m.xlsx"))


def test_folder_of_parquet(tmp_path):
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"uri": ["a.jpg"]}), tmp_path / "m" / "0.parquet")
    pq.write_table(pa.table({"uri": ["b.jpg"]}), tmp_path / "m" / "1.parquet")
    assert read_manifest(str(tmp_path / "m")).num_rows == 2


def test_identities_join_on_the_keys_the_manifest_gives_its_rows(tmp_path):
    from jobs.manifest import read_identities

    (tmp_path / "m.csv").write_text("uri,identity\na.jpg,ann\nb.jpg,\nc.jpg,ann\nd.jpg,7\n")
    keys = read_manifest(str(tmp_path / "m.csv")).column("key").to_pylist()
    assert read_identities(str(tmp_path / "m.csv")) == {keys[0]: "ann", keys[2]: "ann", keys[3]: "7"}
    (tmp_path / "k.csv").write_text("key,uri,identity\nx,a.jpg,ann\ny,b.jpg,bob\n")
    assert read_identities(str(tmp_path / "k.csv")) == {"x": "ann", "y": "bob"}
    (tmp_path / "none.csv").write_text("uri\na.jpg\n")
    with pytest.raises(ManifestError, match="data.photo_identities: .* no 'identity' column"):
        read_identities(str(tmp_path / "none.csv"))
