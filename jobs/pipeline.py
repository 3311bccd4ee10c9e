"""Build and run job pipelines on Ray Data.

``build(spec, manifest, output)`` returns the lazy :class:`ray.data.Dataset`
that fetches, aligns and commits output parts (its rows are commit records);
``run(spec)`` adds what makes a job a job: resume over an existing output, a
final reconciliation that proves every input row is there once, and ``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable

import cv2
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from jobs.manifest import input_rows, rig_schema
from jobs.output import OutputFolder, RunSummary
from jobs.spec import AlignJob, JobSpec, PinchJob, RenderJob
from jobs.stages import (
    ALIGN_FIELD_DOCS,
    PINCH_FIELD_DOCS,
    RENDER_FIELD_DOCS,
    AlignStage,
    CommitStage,
    FetchStage,
    PinchStage,
    RenderStage,
)
from jobs.storage import locate

log = logging.getLogger(__name__)

# CPU left unclaimed beside a CPU actor pool sized by default: pools that claim
# every CPU starve any other task on the cluster (a later stage, another job)
# and a pipeline waiting on such a task hangs with 0 rows (ray-project/ray#44687).
# Logical only: the actors still use every core.
CPU_RESERVE = 0.25


class Chain:
    """Run several stages one after the other inside one actor.

    Fetching, aligning and committing in the same process keeps image bytes out
    of the object store and needs no extra write tasks; each stage is still its
    own class, testable alone.
    """

    def __init__(self, stages: list[tuple[type, dict[str, Any]]], cv2_threads: int = 1) -> None:
        # Each actor is one of several processes per node, each given about one
        # CPU: OpenCV's own thread pool would only oversubscribe the cores.
        cv2.setNumThreads(cv2_threads)
        self.stages: list[Callable] = [cls(**kwargs) for cls, kwargs in stages]

    def __call__(self, batch: Any) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch


def init_ray(address: str | None = None) -> None:
    """Connect to a cluster, or start a local Ray bound to loopback only."""
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", logging_level=logging.WARNING)


def _cpu_actor_cpus(spec: JobSpec, pools: int = 1) -> float:
    """CPUs per actor: the spec's, or a share that lets ``pools`` pools fit beside a reserve."""
    if spec.resources.num_cpus is not None:
        return spec.resources.num_cpus
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.1, min(1.0, (total - CPU_RESERVE) / (spec.resources.concurrency * pools)))


def _model_threads(spec: JobSpec) -> int:
    """Torch threads of a CPU model actor: the cluster's CPUs shared by the model
    actors (each actor caps it at its node's core count).

    Ray gives an actor with a fractional CPU claim one thread, but the CPU actors
    of the align pool finish long before the optimiser does; the model actors
    then have the cores to themselves, and the optimiser scales with threads.
    """
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int(total // spec.resources.concurrency))


def _schema_metadata(spec: JobSpec, field_docs: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        "facejobs.kind": spec.kind,
        "facejobs.options": spec.options.model_dump_json(),
        "facejobs.columns": json.dumps(field_docs, sort_keys=True),
        **extra,
    }


def _rig_metadata(schema) -> dict[str, str]:
    """The names of the ``params`` slots and the whole rig, for outputs holding rig vectors."""
    return {"facejobs.params": json.dumps(list(schema.vector_names)), "facejobs.rig": json.dumps(schema.to_dict())}


def _fetch_and_align(spec: AlignJob | PinchJob) -> list[tuple[type, dict[str, Any]]]:
    """The CPU stages every photo job starts with."""
    return [
        (FetchStage, {"storage": spec.storage, "max_bytes": spec.options.max_bytes,
                      "threads": spec.resources.fetch_threads}),
        (AlignStage, {"options": spec.options}),
    ]


def _blocks(rows: pa.Table, spec: JobSpec) -> list[pa.Table]:
    # Small blocks keep the workers evenly busy to the end (a block is the unit
    # of work a worker takes, and one output part), capped by rows_per_block.
    resources = spec.resources
    rows_per_block = min(resources.rows_per_block,
                         max(8, math.ceil(rows.num_rows / (16 * resources.concurrency))))
    return [rows.slice(start, rows_per_block) for start in range(0, rows.num_rows, rows_per_block)]


def build(spec: JobSpec, rows: pa.Table, output: OutputFolder) -> ray.data.Dataset:
    """The lazy dataset that processes ``rows`` (from :func:`input_rows`) into ``output``.

    Each input block is processed and committed as one output part by one call;
    the dataset's rows are the commit records (part, rows, keys).
    """
    blocks = _blocks(rows, spec)
    resources = spec.resources
    if isinstance(spec, AlignJob):
        chain = _fetch_and_align(spec) + [
            (CommitStage, {"output_uri": output.location.uri, "storage": spec.storage,
                           "metadata": _schema_metadata(spec, ALIGN_FIELD_DOCS)}),
        ]
        return ray.data.from_arrow(blocks).map_batches(
            Chain,
            fn_constructor_kwargs={"stages": chain},
            batch_size=None,  # one call per block: one block in, one part out
            batch_format="pyarrow",
            # Two tasks in flight per actor: enough to hide the hand-over, few
            # enough that no actor sits on a queue while another idles at the end.
            compute=ActorPoolStrategy(size=min(resources.concurrency, len(blocks)),
                                      max_tasks_in_flight_per_actor=2),
            num_cpus=_cpu_actor_cpus(spec),
        )
    if isinstance(spec, RenderJob):
        from facecore.rig import HELEN_CLASSES

        schema = rig_schema(spec)
        metadata = _schema_metadata(spec, RENDER_FIELD_DOCS, **_rig_metadata(schema),
                                    **{"facejobs.mask_classes": json.dumps(list(HELEN_CLASSES))})
        chain = [
            (RenderStage, {"options": spec.options}),
            (CommitStage, {"output_uri": output.location.uri, "storage": spec.storage, "metadata": metadata}),
        ]
        # A pool of CPU workers, as for align: Ray Data's plain task pool kept
        # only one of two tasks busy much of the time here (1.4x on 2 CPUs vs
        # 1.85x with actors, bench/render.py).
        return ray.data.from_arrow(blocks).map_batches(
            Chain,
            fn_constructor_kwargs={"stages": chain},
            batch_size=None,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=min(resources.concurrency, len(blocks)),
                                      max_tasks_in_flight_per_actor=2),
            num_cpus=_cpu_actor_cpus(spec),
        )
    if isinstance(spec, PinchJob):
        from facecore.rig import default_schema

        cpu_share = _cpu_actor_cpus(spec, pools=2)
        aligned = ray.data.from_arrow(blocks).map_batches(
            Chain,
            fn_constructor_kwargs={"stages": _fetch_and_align(spec)},
            batch_size=None,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=min(resources.concurrency, len(blocks)), max_tasks_in_flight_per_actor=2),
            num_cpus=cpu_share,
        )
        metadata = _schema_metadata(spec, PINCH_FIELD_DOCS, **_rig_metadata(default_schema()))
        # The model pool: GPUs when the spec asks (a fraction of a CPU each, so
        # the CPU pool keeps its cores), the CPU otherwise.
        return aligned.map_batches(
            Chain,
            fn_constructor_kwargs={"stages": [
                (PinchStage, {"imitator_uri": spec.models.imitator, "parser_uri": spec.models.parser,
                              "options": spec.options, "storage": spec.storage,
                              "cpu_threads": _model_threads(spec)}),
                (CommitStage, {"output_uri": output.location.uri, "storage": spec.storage, "metadata": metadata}),
            ]},
            batch_size=resources.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=resources.concurrency),
            num_gpus=resources.num_gpus,
            num_cpus=min(cpu_share, 0.25) if resources.num_gpus > 0 else cpu_share,
        )
    raise NotImplementedError(f"kind {spec.kind!r} has no pipeline yet")


def run(spec: JobSpec, *, address: str | None = None, progress: bool = True) -> RunSummary:
    """Run a job to completion and return its summary.

    Re-running over the same output skips keys already committed. Raises for
    systemic failure only (bad manifest, unreachable output, missing model).
    """
    started = time.perf_counter()
    manifest = input_rows(spec)
    folder = OutputFolder(locate(spec.output.path, spec.storage))
    folder.prepare()
    done = folder.done_keys()
    all_keys = manifest.column("key").to_pylist()
    pending = manifest.filter(pa.array([k not in done for k in all_keys]))
    log.info("%d input rows, %d already done, %d to process", manifest.num_rows,
             manifest.num_rows - pending.num_rows, pending.num_rows)
    if pending.num_rows:
        if not ray.is_initialized():
            init_ray(address)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        records = build(spec, pending, folder).iter_batches(batch_size=None, batch_format="pyarrow")
        committed = sum(pc.sum(batch.column("keys")).as_py() or 0 for batch in records)
        log.info("committed %d keys in this run", committed)
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
        output=folder.location.uri,
    )
    folder.write_success(summary)
    return summary
