"""The output folder of a job: exactly-once commits, resume, and ``_SUCCESS``.

Layout of an output folder::

    part-<hash>.parquet   committed results; <hash> is of the keys the part holds
    _tmp/<run id>/        parts being written by one run (ignored by readers; removed
                          when the run ends, and leftovers of dead runs when one starts)
    _JOB                  the spec fingerprint the output was made with, and its runs
    _LEASE                held by the run in progress (see jobs.lease)
    _SUCCESS              JSON summary and lineage, written last, only by a finished run

Ray retries tasks (at-least-once) and its own ``write_parquet`` names files with a
fresh uuid per run, so exactly-once is ours to keep:

* a part is written under ``_tmp/<run id>/`` and moved into place whole, so a
  killed run leaves nothing that a reader counts;
* all the rows of one input key are in one part (a part is one input block);
* a part's name is a hash of the keys in it, so a retried write of the same rows
  replaces the same file instead of adding a copy;
* a new run skips keys that committed parts already hold (resume);
* at the end :meth:`OutputFolder.reconcile` drops any key found in two parts (a
  retry that regrouped rows) and checks every input key is present.

Key sets are Arrow arrays, never Python sets: a folder of millions of rows plans
and reconciles in memory proportional to the bytes of its keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from jobs.storage import Location, list_folder, with_retry

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
SUCCESS = "_SUCCESS"
TMP = "_tmp"


# Statuses that say the job, not the row, is wrong (credentials, endpoint, a
# broken model, a manifest of refused uris): ``limits.max_error_rate`` counts
# them, and a rerun tries their rows again. ``no_face``, ``decode_error`` and the
# like are the data's own: final, and they never stop a job.
SYSTEMIC_STATUSES = frozenset({"fetch_error", "storage_error", "model_error", "bad_uri"})


class OutputError(RuntimeError):
    """The output folder is inconsistent; the job must not report success."""


class JobFailed(OutputError):
    """The job stopped for a systemic reason; no ``_SUCCESS`` was written."""


@dataclass
class RunSummary:
    """What a run did. Written as ``_SUCCESS`` and printed by the CLI."""

    kind: str
    input_rows: int
    processed_rows: int  # input rows this run worked on (not resumed)
    resumed_rows: int  # input rows already present from an earlier run
    output_rows: int
    status_counts: dict[str, int]
    parts: int
    seconds: float = 0.0
    duplicates_removed: int = 0
    extra_keys: int = 0  # keys in the output that the manifest does not have
    stale_rows: int = 0  # their rows: left in place, not counted in output_rows or status_counts
    output: str = ""
    run_id: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_rows(self) -> int:
        return self.status_counts.get("ok", 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def part_name(keys: Iterable[str]) -> str:
    """Deterministic part file name for a set of row keys."""
    digest = hashlib.sha1("\n".join(sorted(set(keys))).encode("utf-8")).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}{PART_SUFFIX}"


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class OutputFolder:
    """One job's output folder on any filesystem.

    Args:
        location: the folder.
        run_id: the run writing into it; its temporaries go under ``_tmp/<run_id>/``.
    """

    def __init__(self, location: Location, run_id: str | None = None) -> None:
        self.location = location
        self.run_id = run_id or uuid.uuid4().hex[:12]

    @property
    def temporary(self) -> Location:
        return self.location.join(TMP, self.run_id)

    def parts(self) -> list[str]:
        """Full paths of committed parts, sorted (listed afresh, never from a cache)."""
        # Listed afresh: s3fs caches listings, and a resume must see the parts written since.
        names = list_folder(self.location)
        return sorted(
            posixpath.join(self.location.path, n)
            for n in names
            if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)
        )

    def begin(self) -> None:
        """Start a run: create the folder and drop temporaries of runs that died.

        Called while holding the output's lease, so no other live run writes
        here. ``_SUCCESS`` stays until the run has work to do
        (:meth:`clear_success`).
        """
        fs = self.location.fs
        fs.makedirs(self.location.path, exist_ok=True)
        tmp = self.location.join(TMP).path
        fs.invalidate_cache(tmp)
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)

    def clear_success(self) -> None:
        path = self.location.join(SUCCESS).path
        if self.location.fs.exists(path):
            self.location.fs.rm(path)

    def end(self) -> None:
        """Remove this run's temporaries, and ``_tmp/`` itself when nothing else is in it."""
        fs = self.location.fs
        for path in (self.temporary.path, self.location.join(TMP).path):
            fs.invalidate_cache(path)
            try:
                if fs.exists(path) and (path == self.temporary.path or not fs.ls(path, detail=False)):
                    fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

    def _dataset(self, paths: list[str]) -> ds.Dataset:
        return ds.dataset(paths, format="parquet", filesystem=self.location.arrow_fs)

    def read_parts(self, columns: list[str]) -> pa.Table:
        """``columns`` of every committed part, plus ``part`` (the part's index in :meth:`parts`).

        One multi-threaded Arrow scan over all the parts (not a read per part:
        20 000 parts take 2 s instead of 12).
        """
        paths = self.parts()
        empty = pa.table({**{name: pa.array([], pa.string()) for name in columns}, "part": pa.array([], pa.int32())})
        if not paths:
            return empty
        index = {path: i for i, path in enumerate(paths)}

        def scan() -> pa.Table:
            tables = []
            for tagged in self._dataset(paths).scanner(columns=columns).scan_batches():
                batch = tagged.record_batch
                part = np.full(batch.num_rows, index[tagged.fragment.path], np.int32)
                tables.append(pa.Table.from_batches([batch]).append_column("part", pa.array(part)))
            return pa.concat_tables(tables) if tables else empty

        return with_retry(scan, what=f"read the parts of {self.location.uri}")

    def done_keys(self) -> pa.Array:
        """Keys already committed by earlier runs (repeated for keys with several rows).

        A key whose rows all failed for a systemic reason (the store was down, the
        credentials were wrong, the model broke) is not done: a rerun tries it
        again, and :meth:`reconcile` keeps the new rows.
        """
        paths = self.parts()
        if not paths:
            return pa.array([], pa.string())
        table = with_retry(lambda: self._dataset(paths).to_table(columns=["key", "status"]),
                           what=f"read the keys of {self.location.uri}")
        settled = pc.invert(pc.is_in(table.column("status"), value_set=pa.array(sorted(SYSTEMIC_STATUSES))))
        return table.column("key").filter(settled).combine_chunks()

    def commit(self, table: pa.Table) -> str:
        """Write one part atomically under its deterministic name; return the name."""
        name = part_name(table.column("key").to_pylist())
        self._write(self.location.join(name).path, table_to_parquet_bytes(table))
        return name

    def _write(self, path: str, data: bytes) -> None:
        """Write bytes atomically: under this run's temporary folder, then moved into place."""
        fs = self.location.fs

        def write() -> None:  # safe to repeat: a fresh temporary name, then a move onto the final name
            temporary = self.temporary.join(f"{posixpath.basename(path)}.{uuid.uuid4().hex}").path
            fs.makedirs(self.temporary.path, exist_ok=True)
            with fs.open(temporary, "wb") as handle:
                handle.write(data)
            fs.mv(temporary, path)

        with_retry(write, what=f"write {path}")

    def reconcile(self, expected_keys: pa.Array) -> "Reconciled":
        """Remove keys committed twice; check every expected key is present.

        Raises:
            OutputError: some expected keys are missing from the output.
        """
        paths = self.parts()
        table = self.read_parts(["key", "status"])
        keys = table.column("key").combine_chunks()
        # A key in two parts: a retry that regrouped rows, or a rerun that redid a
        # key whose rows had failed for a systemic reason. Keep the first part
        # (sorted) in which the key did not fail, else the first; drop the others.
        failed = pc.is_in(table.column("status"), value_set=pa.array(sorted(SYSTEMIC_STATUSES)))
        pairs = pa.table({"key": keys, "part": table.column("part"), "failed": failed}) \
            .group_by(["key", "part"]).aggregate([("failed", "min")])
        per_key = pairs.group_by("key").aggregate([("part", "count")])
        repeated = per_key.filter(pc.greater(per_key.column("part_count"), 1))
        removed = 0
        if repeated.num_rows:
            clashes = pairs.filter(pc.is_in(pairs.column("key"), value_set=repeated.column("key")))
            candidates: dict[str, list[tuple[bool, int]]] = {}
            for key, part, all_failed in zip(*(clashes.column(c).to_pylist() for c in ("key", "part", "failed_min"))):
                candidates.setdefault(key, []).append((all_failed, part))
            drop: dict[int, list[str]] = {}
            for key, options in candidates.items():
                owner = min(options)[1]
                for _, part in options:
                    if part != owner:
                        drop.setdefault(part, []).append(key)
            for part, dropped in sorted(drop.items()):
                removed += self._drop_keys(paths[part], dropped)
            table = self.read_parts(["key", "status"])
            keys = table.column("key").combine_chunks()
        present = pc.unique(keys)
        missing = pc.invert(pc.is_in(expected_keys, value_set=present))
        missing_count = pc.sum(missing).as_py() or 0
        if missing_count:
            examples = sorted(expected_keys.filter(missing).slice(0, 1000).to_pylist())[:5]
            raise OutputError(f"{missing_count} input rows are missing from {self.location.uri}, e.g. {examples}")
        expected_row = pc.is_in(keys, value_set=expected_keys)
        statuses = table.column("status").combine_chunks().filter(expected_row)
        counts = pc.value_counts(statuses)
        status_counts = {str(v): int(c) for v, c in zip(counts.field("values").to_pylist(),
                                                       counts.field("counts").to_pylist())}
        extra = pc.sum(pc.invert(pc.is_in(present, value_set=expected_keys))).as_py() or 0
        return Reconciled(status_counts=dict(sorted(status_counts.items())), output_rows=len(statuses),
                          duplicates_removed=removed, extra_keys=extra, stale_rows=len(keys) - len(statuses),
                          parts=len(self.parts()))

    def _drop_keys(self, path: str, keys: list[str]) -> int:
        full = pq.read_table(path, filesystem=self.location.arrow_fs)
        mask = pc.invert(pc.is_in(full.column("key"), value_set=pa.array(sorted(keys), pa.string())))
        kept = full.filter(mask)
        log.warning("part %s repeated %d keys; rewriting it without them", path, len(keys))
        if kept.num_rows:
            self._write(path, table_to_parquet_bytes(kept))
        else:
            self.location.fs.rm(path)
        return full.num_rows - kept.num_rows

    def write_success(self, summary: RunSummary) -> None:
        self._write(self.location.join(SUCCESS).path, summary.to_json().encode("utf-8"))

    def read_json(self, name: str) -> dict | None:
        path = self.location.join(name).path
        self.location.fs.invalidate_cache(path)
        if not self.location.fs.exists(path):
            return None
        return json.loads(self.location.fs.cat_file(path))

    def write_json(self, name: str, document: dict) -> None:
        self._write(self.location.join(name).path, json.dumps(document, indent=2, sort_keys=True).encode("utf-8"))

    def part_metadata(self) -> dict[str, str] | None:
        """The Parquet schema metadata of the first committed part (None: no parts)."""
        paths = self.parts()
        if not paths:
            return None
        metadata = pq.read_schema(paths[0], filesystem=self.location.arrow_fs).metadata or {}
        return {k.decode(): v.decode() for k, v in metadata.items()}


@dataclass
class Reconciled:
    """What a folder holds once reconciled against the manifest."""

    status_counts: dict[str, int]  # rows of manifest keys by status
    output_rows: int  # rows of manifest keys
    duplicates_removed: int  # rows dropped because their key was in an earlier part too
    extra_keys: int  # keys the manifest does not have (an earlier, larger manifest)
    stale_rows: int  # their rows
    parts: int
