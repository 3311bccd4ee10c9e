"""The output folder of a job: exactly-once commits, resume, and ``_SUCCESS``.

Layout of an output folder::

    part-<hash>.parquet   committed results; <hash> is of the keys the part holds
    _tmp/                 parts being written (ignored by readers, cleared per run)
    _SUCCESS              JSON summary, written last, only by a finished run

Ray retries tasks (at-least-once) and its own ``write_parquet`` names files with a
fresh uuid per run, so exactly-once is ours to keep:

* a part is written under ``_tmp/`` and moved into place whole, so a killed run
  leaves nothing that a reader counts;
* a part's name is a hash of the keys in it, so a retried write of the same rows
  replaces the same file instead of adding a copy;
* a new run skips keys that committed parts already hold (resume);
* at the end :meth:`OutputFolder.reconcile` drops any key found in two parts (a
  retry that regrouped rows) and checks every input key is present.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.storage import Location, write_atomic

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
SUCCESS = "_SUCCESS"
TMP = "_tmp"


class OutputError(RuntimeError):
    """The output folder is inconsistent; the job must not report success."""


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
    output: str = ""

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
    """One job's output folder on any filesystem."""

    def __init__(self, location: Location) -> None:
        self.location = location

    def parts(self) -> list[str]:
        """Full paths of committed parts, sorted."""
        fs = self.location.fs
        if not fs.exists(self.location.path):
            return []
        names = [posixpath.basename(p) for p in fs.ls(self.location.path, detail=False)]
        return sorted(
            posixpath.join(self.location.path, n)
            for n in names
            if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)
        )

    def prepare(self) -> None:
        """Start a run: create the folder, clear ``_SUCCESS`` and stale temporaries."""
        fs = self.location.fs
        fs.makedirs(self.location.path, exist_ok=True)
        for name in (SUCCESS, TMP):
            path = posixpath.join(self.location.path, name)
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def _read_columns(self, path: str, names: list[str]) -> pa.Table:
        return pq.read_table(path, columns=names, filesystem=self.location.arrow_fs)

    def done_keys(self) -> set[str]:
        """Keys already committed by earlier runs."""
        keys: set[str] = set()
        for path in self.parts():
            keys.update(self._read_columns(path, ["key"]).column("key").to_pylist())
        return keys

    def commit(self, table: pa.Table) -> str:
        """Write one part atomically under its deterministic name; return the name."""
        name = part_name(table.column("key").to_pylist())
        write_atomic(self.location.join(name), table_to_parquet_bytes(table))
        return name

    def reconcile(self, expected_keys: set[str]) -> tuple[Counter, int, int, int]:
        """Remove keys committed twice; check every expected key is present.

        Returns:
            (status counts, output rows, duplicate rows removed, extra keys).

        Raises:
            OutputError: some expected keys are missing from the output.
        """
        owner: dict[str, str] = {}
        duplicated: dict[str, set[str]] = {}
        per_part: dict[str, pa.Table] = {}
        for path in self.parts():
            table = self._read_columns(path, ["key", "status"])
            per_part[path] = table
            for key in set(table.column("key").to_pylist()):
                if key in owner:
                    duplicated.setdefault(path, set()).add(key)
                else:
                    owner[key] = path
        removed = 0
        for path, keys in duplicated.items():
            full = pq.read_table(path, filesystem=self.location.arrow_fs)
            mask = pc.invert(pc.is_in(full.column("key"), value_set=pa.array(sorted(keys), pa.string())))
            kept = full.filter(mask)
            removed += full.num_rows - kept.num_rows
            log.warning("part %s repeated %d keys; rewriting it without them", path, len(keys))
            location = Location(self.location.fs, path, self.location.scheme)
            if kept.num_rows:
                write_atomic(location, table_to_parquet_bytes(kept))
            else:
                self.location.fs.rm(path)
            per_part[path] = kept.select(["key", "status"])
        missing = expected_keys - owner.keys()
        if missing:
            raise OutputError(f"{len(missing)} input rows are missing from {self.location.uri}, "
                              f"e.g. {sorted(missing)[:5]}")
        counts: Counter = Counter()
        rows = 0
        for table in per_part.values():
            counts.update(table.column("status").to_pylist())
            rows += table.num_rows
        return counts, rows, removed, len(owner.keys() - expected_keys)

    def write_success(self, summary: RunSummary) -> None:
        write_atomic(self.location.join(SUCCESS), summary.to_json().encode("utf-8"))

    def read_success(self) -> dict | None:
        path = self.location.join(SUCCESS).path
        if not self.location.fs.exists(path):
            return None
        return json.loads(self.location.fs.cat_file(path))
