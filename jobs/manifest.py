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
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from jobs.spec import AlignJob, JobSpec, PinchJob, RenderJob, StorageSpec
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
    duplicates = _duplicates(keys)
    if duplicates:
        raise ManifestError(f"input.manifest: {uri}: duplicate keys {duplicates[:5]}")
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
    index = np.arange(count, dtype=np.int64)
    return pa.table({
        "key": pa.array([f"s{seed}-{i:09d}" for i in range(count)], pa.string()),
        "index": pa.array(index),
        "params": pa.nulls(count, pa.list_(pa.float32())),
        "status": pa.array(["ok"] * count, pa.string()),
        "error": pa.nulls(count, pa.string()),
    })


def input_rows(spec: JobSpec) -> pa.Table:
    """Every row the job must output, keyed; read or generated on the driver."""
    if isinstance(spec, (AlignJob, PinchJob)):
        return read_manifest(spec.input.manifest, spec.storage)
    if isinstance(spec, RenderJob):
        if spec.input is not None:
            return read_param_manifest(spec.input.manifest, rig_schema(spec), spec.storage)
        return sampled_render_rows(spec.options.count, spec.options.seed)
    raise NotImplementedError(f"kind {spec.kind!r} has no input rows")


def rig_schema(spec: RenderJob):
    """The rig a render job draws: its ``options.rig`` file or the built-in one."""
    from facecore.rig import default_schema, load_schema

    return load_schema(spec.options.rig) if spec.options.rig else default_schema()
