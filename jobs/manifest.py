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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from jobs.spec import StorageSpec
from jobs.storage import Location, locate, scheme_of


class ManifestError(ValueError):
    """The manifest cannot be used; the job fails before any work starts."""


def stable_key(uri: str) -> str:
    """The default row key: 20 hex digits of the SHA-1 of the resolved, stripped uri.

    ``read_manifest`` resolves relative paths and drops ``file://`` before hashing,
    so one photo written two ways in a manifest gets one key.
    """
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20]


# Rows per step where a Python function must see each value (hashing keys,
# normalising ``..`` in paths): the Python objects of one chunk at a time, never
# of the whole manifest.
CHUNK_ROWS = 65_536

_ABSOLUTE = r"^([A-Za-z][A-Za-z0-9+.\-]*://|/)"
_DOT_SEGMENT = r"(^|/)\.\.?(/|$)"


def _chunks(array: pa.Array):
    for start in range(0, len(array), CHUNK_ROWS):
        yield array.slice(start, CHUNK_ROWS)


def stable_keys(uris: pa.Array) -> pa.Array:
    """:func:`stable_key` of every uri, computed chunk by chunk."""
    return pa.concat_arrays([pa.array([stable_key(u) for u in chunk.to_pylist()], pa.string())
                             for chunk in _chunks(uris)] or [pa.array([], pa.string())])


def resolve_uris(uris: pa.Array, base: Location) -> pa.Array:
    """Manifest entries as full URIs, with Arrow compute.

    Relative paths are joined to ``base`` (the manifest's folder), ``file://`` is
    dropped from local paths, and ``.``/``..`` segments are normalised (only the
    rows that have them go through Python, a chunk at a time).
    """
    # Each step copies the column only when some rows need it: at 10 M rows a
    # copy is half a gigabyte.
    if pc.any(pc.starts_with(uris, "file://")).as_py():
        uris = pc.replace_substring_regex(uris, r"^file://", "")
    relative = pc.invert(pc.match_substring_regex(uris, _ABSOLUTE))
    resolved = uris
    if pc.any(relative).as_py():
        joined = pc.binary_join_element_wise(pa.scalar(base.uri.rstrip("/")), uris, "/")
        resolved = pc.if_else(relative, joined, uris)
    dotted = pc.match_substring_regex(resolved, _DOT_SEGMENT)
    if not pc.any(dotted).as_py():
        return resolved
    fixed = []
    for chunk, dots in zip(_chunks(resolved), _chunks(dotted)):
        if pc.any(dots).as_py():
            chunk = pa.array([_normalise(u) if d else u for u, d in zip(chunk.to_pylist(), dots.to_pylist())],
                             pa.string())
        fixed.append(chunk)
    return pa.concat_arrays(fixed)


def _normalise(uri: str) -> str:
    if not scheme_of(uri):
        return posixpath.normpath(uri)
    head, _, path = uri.partition("://")
    return f"{head}://{posixpath.normpath(path)}"


def read_manifest(uri: str, storage: StorageSpec | None = None) -> pa.Table:
    """Read a manifest into a table with string columns ``key`` and ``uri``.

    Works column-wise with Arrow: memory grows with the bytes of the uris and
    keys, not with a Python object per row, so tens of millions of rows plan on
    one driver.

    Raises:
        ManifestError: missing file, unknown format, no ``uri`` column, empty or
            null uris, duplicate keys.
    """
    location = locate(uri, storage)
    if not location.fs.exists(location.path):
        raise ManifestError(f"input.manifest: {uri} does not exist")
    table = _read_table(location, columns=("key", "uri"))
    if "uri" not in table.column_names:
        raise ManifestError(f"input.manifest: {uri} has no 'uri' column (columns: {table.column_names})")
    uris = table.column("uri").cast(pa.string()).combine_chunks()
    if pc.any(pc.match_substring_regex(uris, r"^\s|\s$")).as_py():  # a copy only when some need it
        uris = pc.utf8_trim_whitespace(uris)
    bad = pc.fill_null(pc.equal(uris, ""), True)
    if pc.any(bad).as_py():
        raise ManifestError(f"input.manifest: {uri}: empty uri in rows {_first_rows(bad)}")
    folder = location.path if location.fs.isdir(location.path) else posixpath.dirname(location.path)
    resolved = resolve_uris(uris, Location(location.fs, folder, location.scheme))
    given_keys = "key" in table.column_names
    if given_keys:
        keys = table.column("key").cast(pa.string()).combine_chunks()
        empty = pc.fill_null(pc.equal(keys, ""), True)
        if pc.any(empty).as_py():
            raise ManifestError(f"input.manifest: {uri}: empty key in rows {_first_rows(empty)}")
    else:
        keys = stable_keys(resolved)
    del table
    duplicates = duplicate_values(keys)
    if duplicates:
        hint = "" if given_keys else " (the same uri twice? give a 'key' column)"
        raise ManifestError(f"input.manifest: {uri}: duplicate keys {duplicates}{hint}")
    return pa.table({"key": keys, "uri": resolved})


def read_identities(uri: str, storage: StorageSpec | None = None, column: str = "identity") -> dict[str, str]:
    """Each manifest row's person: ``{key: identity}`` from the manifest's ``column``.

    The keys are the ones the manifest's jobs give their rows (its ``key`` column,
    or the keys made from its uris), so an align job's output on this manifest
    joins on them. Rows with an empty or null identity are left out.

    Raises:
        ManifestError: as :func:`read_manifest`, and when there is no ``column``.
    """
    keys = read_manifest(uri, storage).column("key")
    table = _read_table(locate(uri, storage), columns=("key", "uri", column))
    if column not in table.column_names:
        raise ManifestError(f"data.photo_identities: {uri} has no {column!r} column (columns: {table.column_names})")
    names = table.column(column).cast(pa.string()).to_pylist()
    return {key: name for key, name in zip(keys.to_pylist(), names) if name}


def _read_table(location: Location, columns: tuple[str, ...] | None = None) -> pa.Table:
    """The manifest's table; from Parquet only ``columns`` (those it has), when given."""
    path = location.path

    def parquet() -> pa.Table:
        wanted = None
        if columns is not None:
            names = ds.dataset(path, format="parquet", filesystem=location.arrow_fs).schema.names
            wanted = [name for name in columns if name in names]
            if "uri" not in wanted:
                wanted = None  # read everything: the error lists the columns there are
        return pq.read_table(path, columns=wanted, filesystem=location.arrow_fs)

    if location.fs.isdir(path):
        return parquet()
    suffix = path.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else ""
    try:
        if suffix in ("parquet", "pq"):
            return parquet()
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


def _first_rows(mask: pa.Array, count: int = 10) -> list[int]:
    return pc.indices_nonzero(mask).slice(0, count).to_pylist()


def duplicate_values(values: pa.Array, count: int = 5) -> list[str]:
    """Up to ``count`` values that occur more than once.

    By sorting, not hashing: a hash table of 10 M keys takes over a gigabyte, a
    sort's indices 80 MB.
    """
    if len(values) < 2:
        return []
    ordered = values.take(pc.sort_indices(values))
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    if not pc.any(same).as_py():
        return []
    repeated = pc.unique(ordered.slice(1).filter(same))
    return repeated.slice(0, count).to_pylist()


def write_manifest(uris: list[str], uri: str, keys: list[str] | None = None,
                   storage: StorageSpec | None = None) -> None:
    """Write a Parquet manifest (used by the demo, tests and benchmarks)."""
    columns = {"uri": pa.array(uris, pa.string())}
    if keys is not None:
        columns = {"key": pa.array(keys, pa.string()), **columns}
    location = locate(uri, storage)
    location.fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
    pq.write_table(pa.table(columns), location.path, filesystem=location.arrow_fs)


def read_param_manifest(uri: str, schema, storage: StorageSpec | None = None) -> pa.Table:
    """Read a table of rig parameter sets for a render job.

    Each row is one parameter set: either a ``params`` column with the flat vector
    in schema order, or columns named after parameters (discrete groups hold the
    choice's name; parameters not given are neutral). An optional ``key`` column
    names rows (default: the row number). A row whose values the schema refuses
    becomes a ``bad_params`` row, not a failed job.

    Returns:
        key, index, params (list<float32> or null), status, error.
    """
    location = locate(uri, storage)
    if not location.fs.exists(location.path):
        raise ManifestError(f"input.manifest: {uri} does not exist")
    table = _read_table(location)
    names = set(schema.continuous_names) | {g.name for g in schema.discrete}
    given = [c for c in table.column_names if c in names]
    unknown = [c for c in table.column_names if c not in names | {"key", "params"}]
    if unknown:
        raise ManifestError(f"input.manifest: {uri}: columns {unknown} are not parameters of rig {schema.name}")
    if not given and "params" not in table.column_names:
        raise ManifestError(f"input.manifest: {uri}: no 'params' column and no parameter columns")
    rows = table.to_pylist()
    keys = [str(r["key"]) for r in rows] if "key" in table.column_names else [f"{i:09d}" for i in range(len(rows))]
    duplicates = duplicate_values(pa.array(keys, pa.string()))
    if duplicates:
        raise ManifestError(f"input.manifest: {uri}: duplicate keys {duplicates}")
    vectors, statuses, errors = [], [], []
    for row in rows:
        try:
            if row.get("params") is not None:
                vector = np.asarray(row["params"], dtype=np.float32)
                if vector.shape != (schema.vector_size,):
                    raise ValueError(f"params has {vector.size} values, rig {schema.name} needs {schema.vector_size}")
                vector = schema.encode(schema.decode(vector))
            else:
                vector = schema.encode(schema.complete({n: row[n] for n in given if row[n] is not None}))
            vectors.append(vector.tolist())
            statuses.append("ok")
            errors.append(None)
        except ValueError as exc:  # SchemaError is a ValueError
            vectors.append(None)
            statuses.append("bad_params")
            errors.append(str(exc))
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "index": pa.array([None] * len(rows), pa.int64()),
        "params": pa.array(vectors, pa.list_(pa.float32())),
        "status": pa.array(statuses, pa.string()),
        "error": pa.array(errors, pa.string()),
    })


def sampled_render_rows(count: int, seed: int) -> pa.Table:
    """Rows for ``count`` sampled renders; row i's parameters are drawn from (seed, i)."""
    index = pa.array(np.arange(count, dtype=np.int64))
    digits = pc.utf8_lpad(pc.cast(index, pa.string()), 9, "0")  # Arrow, not a Python string per row
    return pa.table({
        "key": pc.binary_join_element_wise(f"s{seed}-", digits, ""),
        "index": index,
        "params": pa.nulls(count, pa.list_(pa.float32())),
        "status": pa.repeat(pa.scalar("ok", pa.string()), count),
        "error": pa.nulls(count, pa.string()),
    })
