"""Manifests: the list of images a job reads.

A manifest is Parquet, CSV or JSONL (or a folder of Parquet files) with a
required ``uri`` column and an optional ``key`` column. Keys identify rows in
the output and drive resume; when absent they are a stable hash of the uri.
Relative uris are resolved against the manifest's own folder.
"""

from __future__ import annotations

import hashlib
import io
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from jobs.spec import StorageSpec
from jobs.storage import Location, locate, resolve_relative


class ManifestError(ValueError):
    """The manifest cannot be used; the job fails before any work starts."""


def stable_key(uri: str) -> str:
    """The default row key: 20 hex digits of the uri's SHA-1 (stable across runs)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20]


def read_manifest(uri: str, storage: StorageSpec | None = None) -> pa.Table:
    """Read a manifest into a table with string columns ``key`` and ``uri``.

    Raises:
        ManifestError: missing file, unknown format, no ``uri`` column, empty or
            null uris, duplicate keys.
    """
    location = locate(uri, storage)
    if not location.fs.exists(location.path):
        raise ManifestError(f"input.manifest: {uri} does not exist")
    table = _read_table(location)
    if "uri" not in table.column_names:
        raise ManifestError(f"input.manifest: {uri} has no 'uri' column (columns: {table.column_names})")
    uris = table.column("uri").cast(pa.string())
    bad = pc.or_kleene(pc.is_null(uris), pc.equal(pc.utf8_trim_whitespace(uris), ""))
    bad_rows = pc.indices_nonzero(pc.fill_null(bad, True)).to_pylist()
    if bad_rows:
        raise ManifestError(f"input.manifest: {uri}: empty uri in rows {bad_rows[:10]}")
    folder = location.path if location.fs.isdir(location.path) else posixpath.dirname(location.path)
    base = Location(location.fs, folder, location.scheme)
    raw = uris.to_pylist()
    if "key" in table.column_names:
        keys = [None if k is None else str(k) for k in table.column("key").to_pylist()]
        missing = [i for i, k in enumerate(keys) if not k]
        if missing:
            raise ManifestError(f"input.manifest: {uri}: empty key in rows {missing[:10]}")
    else:
        keys = [stable_key(u) for u in raw]
    duplicates = _duplicates(keys)
    if duplicates:
        hint = "" if "key" in table.column_names else " (the same uri twice? give a 'key' column)"
        raise ManifestError(f"input.manifest: {uri}: duplicate keys {duplicates[:5]}{hint}")
    resolved = [resolve_relative(u.strip(), base) for u in raw]
    return pa.table({"key": pa.array(keys, pa.string()), "uri": pa.array(resolved, pa.string())})


def _read_table(location: Location) -> pa.Table:
    path = location.path
    if location.fs.isdir(path):
        return pq.read_table(path, filesystem=location.arrow_fs)
    suffix = path.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else ""
    try:
        if suffix in ("parquet", "pq"):
            return pq.read_table(path, filesystem=location.arrow_fs)
        data = location.fs.cat_file(path)
        if suffix in ("csv", "tsv"):
            options = pacsv.ParseOptions(delimiter="\t" if suffix == "tsv" else ",")
            convert = pacsv.ConvertOptions(column_types={"key": pa.string(), "uri": pa.string()})
            return pacsv.read_csv(io.BytesIO(data), parse_options=options, convert_options=convert)
        if suffix in ("jsonl", "ndjson", "json"):
            return pajson.read_json(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"input.manifest: cannot read {location.uri}: {exc}") from None
    raise ManifestError(
        f"input.manifest: {location.uri}: unknown format {suffix!r} (use .parquet, .csv, .tsv or .jsonl)"
    )


def _duplicates(keys: list[str]) -> list[str]:
    seen: set[str] = set()
    repeated: list[str] = []
    for key in keys:
        if key in seen:
            repeated.append(key)
        seen.add(key)
    return repeated


def write_manifest(uris: list[str], uri: str, keys: list[str] | None = None,
                   storage: StorageSpec | None = None) -> None:
    """Write a Parquet manifest (used by the demo, tests and benchmarks)."""
    columns = {"uri": pa.array(uris, pa.string())}
    if keys is not None:
        columns = {"key": pa.array(keys, pa.string()), **columns}
    location = locate(uri, storage)
    location.fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
    pq.write_table(pa.table(columns), location.path, filesystem=location.arrow_fs)
