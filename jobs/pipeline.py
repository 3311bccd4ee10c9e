"""Build and run job pipelines on Ray Data.

``build(spec, manifest)`` returns the lazy :class:`ray.data.Dataset` of output
rows; ``run(spec)`` adds what makes a job a job: resume over an existing output,
exactly-once commits, a final reconciliation and ``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Iterable

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, Datasink
from ray.data.block import Block, BlockAccessor

from jobs.manifest import read_manifest
from jobs.output import OutputFolder, RunSummary
from jobs.spec import AlignJob, JobSpec
from jobs.stages import ALIGN_FIELD_DOCS, AlignStage, FetchStage
from jobs.storage import locate

log = logging.getLogger(__name__)

# CPU left free for the small I/O tasks (writes) beside CPU actor pools. Actor
# pools that claim every CPU starve those tasks and the pipeline hangs with
# 0 rows (ray-project/ray#44687).
IO_TASK_CPUS = 0.25
IO_CPU_RESERVE = 0.5


class Chain:
    """Run several stages one after the other inside one actor.

    Fetching and aligning in the same process keeps image bytes out of the
    object store; each stage is still its own class, testable alone.
    """

    def __init__(self, stages: list[tuple[type, dict[str, Any]]]) -> None:
        self.stages: list[Callable] = [cls(**kwargs) for cls, kwargs in stages]

    def __call__(self, batch: Any) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch


class PartSink(Datasink):
    """Commit each write task's rows as one part of an :class:`OutputFolder`."""

    def __init__(self, output_uri: str, storage, metadata: dict[str, str]) -> None:
        self.output_uri = output_uri
        self.storage = storage
        self.metadata = metadata

    def write(self, blocks: Iterable[Block], ctx) -> list[str]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables).replace_schema_metadata(self.metadata)
        folder = OutputFolder(locate(self.output_uri, self.storage))
        return [folder.commit(table)]


def init_ray(address: str | None = None) -> None:
    """Connect to a cluster, or start a local Ray bound to loopback only."""
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", logging_level=logging.WARNING)


def _cpu_actor_cpus(spec: JobSpec) -> float:
    if spec.resources.num_cpus is not None:
        return spec.resources.num_cpus
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.1, min(1.0, (total - IO_CPU_RESERVE) / spec.resources.concurrency))


def _schema_metadata(spec: JobSpec, field_docs: dict[str, str]) -> dict[str, str]:
    return {
        "facejobs.kind": spec.kind,
        "facejobs.options": spec.options.model_dump_json(),
        "facejobs.columns": json.dumps(field_docs, sort_keys=True),
    }


def build(spec: JobSpec, manifest: pa.Table) -> ray.data.Dataset:
    """The lazy dataset of output rows for the manifest rows given."""
    if not isinstance(spec, AlignJob):
        raise NotImplementedError(f"kind {spec.kind!r} has no pipeline yet")
    resources = spec.resources
    rows_per_block = max(resources.batch_size, min(resources.rows_per_block,
                         math.ceil(manifest.num_rows / (4 * resources.concurrency)) or 1))
    slices = [manifest.slice(start, rows_per_block) for start in range(0, manifest.num_rows, rows_per_block)]
    dataset = ray.data.from_arrow(slices)
    chain = [
        (FetchStage, {"storage": spec.storage, "max_bytes": spec.options.max_bytes,
                      "threads": resources.fetch_threads}),
        (AlignStage, {"options": spec.options}),
    ]
    return dataset.map_batches(
        Chain,
        fn_constructor_kwargs={"stages": chain},
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=resources.concurrency),
        num_cpus=_cpu_actor_cpus(spec),
    )


def run(spec: JobSpec, *, address: str | None = None, progress: bool = True) -> RunSummary:
    """Run a job to completion and return its summary.

    Re-running over the same output skips keys already committed. Raises for
    systemic failure only (bad manifest, unreachable output, missing model).
    """
    started = time.perf_counter()
    manifest = read_manifest(spec.input.manifest, spec.storage)
    output_location = locate(spec.output.path, spec.storage)
    folder = OutputFolder(output_location)
    folder.prepare()
    done = folder.done_keys()
    all_keys = manifest.column("key").to_pylist()
    pending_mask = pa.array([k not in done for k in all_keys])
    pending = manifest.filter(pending_mask)
    log.info("%d input rows, %d already done, %d to process", manifest.num_rows,
             manifest.num_rows - pending.num_rows, pending.num_rows)
    if pending.num_rows:
        if not ray.is_initialized():
            init_ray(address)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        dataset = build(spec, pending)
        dataset.write_datasink(
            PartSink(output_location.uri, spec.storage, _schema_metadata(spec, ALIGN_FIELD_DOCS)),
            ray_remote_args={"num_cpus": IO_TASK_CPUS},
        )
    counts, output_rows, removed, extra = folder.reconcile(set(all_keys))
    summary = RunSummary(
        kind=spec.kind,
        input_rows=manifest.num_rows,
        processed_rows=pending.num_rows,
        resumed_rows=manifest.num_rows - pending.num_rows,
        output_rows=output_rows,
        status_counts=dict(sorted(counts.items())),
        parts=len(folder.parts()),
        seconds=round(time.perf_counter() - started, 3),
        duplicates_removed=removed,
        extra_keys=extra,
        output=output_location.uri,
    )
    folder.write_success(summary)
    return summary
