"""Plan, build and run jobs on Ray Data, the same way for every kind.

``plan(spec)`` reads the input rows and the output folder and finds the rows
still to do (Arrow compute on key arrays: no Python object per row).
``build(...)`` wires the kind's stages into a lazy :class:`ray.data.Dataset` whose
rows are commit records: CPU pool (fetch, decode, align) -> model pool (when the
kind has a model) -> CPU pool (encode, commit). ``run(spec)`` adds what makes a
job a job: the output's lease, the spec check of a rerun, progress, the error-rate
limit, a final reconciliation that proves every input row is there once, and
``_SUCCESS`` with lineage.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import cv2
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from jobs import lineage
from jobs.kinds import JobKind, StageSpec, kind_of
from jobs.loopback import cluster_address
from jobs.output import SYSTEMIC_STATUSES, JobFailed, OutputFolder, RunSummary
from jobs.progress import Progress, first_real_error
from jobs.spec import JobSpec, SpecError
from jobs.stages import CommitStage
from jobs.storage import locate

log = logging.getLogger(__name__)

# CPU left unclaimed beside the actor pools: pools that claim every CPU starve
# any other task on the cluster (a later stage, another job) and a pipeline
# waiting on such a task hangs with 0 rows (ray-project/ray#44687). Logical only:
# the actors still use every core.
CPU_RESERVE = 0.25
# CPU claimed by a model actor that has a GPU: it feeds the GPU, the CPU pool works.
GPU_ACTOR_CPUS = 0.25

# Part sizes: at least MIN_PART_ROWS input rows (or the whole small job), at most
# MAX_IMAGE_PART_ROWS rows when rows hold images, and about PART_BYTES at most.
MIN_PART_ROWS = 64
MAX_IMAGE_PART_ROWS = 256
MAX_PART_ROWS = 4096
PART_BYTES = 96 * 1024 * 1024
IMAGE_ROW_BYTES = 16 * 1024  # a row this large holds an image
INPUT_BLOCKS_PER_OBJECT = 64
MIN_WORK_ROWS = 8
COMMIT_CPUS = 0.25  # per actor of the commit pool of kinds without a model: Parquet encoding and writes
GPU_PROBE_TIMEOUT_S = 900


# Between pools a block of rows travels packed as one row (Arrow IPC bytes), so
# that Ray Data's batching (which a GPU pool must have) and block splitting can
# never cut a block, and with it the rows of one input key, in two.
BLOCK_COLUMN = "block"


PLACEMENT_COLUMN = "placement"  # JSON {pool: [node ids]}: where the block has been

# Node label that cluster.yaml and deploy/ put on GPU nodes. Pools without GPUs
# prefer the other nodes (a soft preference: on a GPU-only cluster they run there too).
POOL_LABEL = "facejobs-pool"
AWAY_FROM_GPU_NODES = {"label_selector": {POOL_LABEL: "!gpu"}, "fallback_strategy": [{"label_selector": {}}]}


def pack(table: pa.Table, placement: dict[str, list[str]] | None = None) -> pa.Table:
    """A block of rows as a one-row table (with the pools and nodes it went through)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.table({BLOCK_COLUMN: pa.array([sink.getvalue().to_pybytes()], pa.large_binary()),
                     PLACEMENT_COLUMN: pa.array([json.dumps(placement or {}, sort_keys=True)], pa.string())})


def unpack(packed: pa.Table) -> list[pa.Table]:
    """The blocks of a table of packed rows."""
    return [pa.ipc.open_stream(pa.BufferReader(value.as_buffer())).read_all()
            for value in packed.column(BLOCK_COLUMN).combine_chunks()]


def merge_placement(*placements: dict[str, list[str]]) -> dict[str, list[str]]:
    merged: dict[str, set[str]] = {}
    for placement in placements:
        for pool, nodes in placement.items():
            merged.setdefault(pool, set()).update(nodes)
    return {pool: sorted(nodes) for pool, nodes in sorted(merged.items())}


def placement_of(packed: pa.Table) -> dict[str, list[str]]:
    """The pools and nodes the packed rows went through (merged)."""
    if PLACEMENT_COLUMN not in packed.column_names:
        return {}
    return merge_placement(*(json.loads(value) for value in packed.column(PLACEMENT_COLUMN).to_pylist() if value))


class Chain:
    """Run several stages one after the other inside one actor.

    Its batch is a few packed blocks (see :func:`pack`), merged into one block
    before the stages run: a block never splits, so the rows of one input key
    stay together, however many blocks a call merges (into one model batch, or
    into one output part). Each stage is still its own class, testable alone.

    Args:
        stages: the stages, built here (once per actor).
        packed_output: pack the result (for a later pool) instead of returning it.
        pool: the pool's name, recorded with this actor's node in the blocks it
            passes on and in the commit records (``_SUCCESS`` lists the nodes
            each pool ran on).
    """

    def __init__(self, stages: list[StageSpec], packed_output: bool = False, cv2_threads: int = 1,
                 pool: str = "cpu_pool") -> None:
        # Each actor is one of several processes per node, each given about one
        # CPU: OpenCV's own thread pool would only oversubscribe the cores.
        cv2.setNumThreads(cv2_threads)
        self.stages: list[Callable] = [stage.cls(**stage.kwargs) for stage in stages]
        self.packed_output = packed_output
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.placement = {pool: [node]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        blocks = unpack(batch)
        placement = merge_placement(placement_of(batch), self.placement)
        block = blocks[0] if len(blocks) == 1 else pa.concat_tables(blocks, promote_options="permissive")
        for stage in self.stages:
            block = stage(block)
        if self.packed_output:
            return pack(block, placement)
        if PLACEMENT_COLUMN in block.column_names:  # commit records
            index = block.schema.get_field_index(PLACEMENT_COLUMN)
            block = block.set_column(index, PLACEMENT_COLUMN,
                                     pa.array([json.dumps(placement)] * block.num_rows, pa.string()))
        return block


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to a cluster (``address`` or ``RAY_ADDRESS``) as it is, or start a local Ray bound to loopback only."""
    level = logging.INFO if verbose else logging.WARNING
    address = cluster_address(address)
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=verbose)
    else:
        ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", logging_level=level,
                 log_to_driver=verbose)


# -- planning ----------------------------------------------------------------

@dataclass
class Plan:
    """What a run will do, found before any task starts."""

    folder: OutputFolder
    input_rows: pa.Table  # every row the job must output
    pending: pa.Table  # the rows still to do
    models: dict[str, dict[str, str]]  # model files with their sha256
    settings: dict[str, Any]  # the fingerprinted settings (see jobs.lineage)
    note: str | None = None  # an allowed spec change
    seconds: float = 0.0


def plan(spec: JobSpec, *, run_id: str | None = None, allow_spec_change: bool = False) -> Plan:
    """Read the input rows and the output; find the rows still to do.

    Raises:
        SpecError: the kind does not run as a batch job.
        lineage.SpecChanged: the output was made with other settings.
    """
    started = time.perf_counter()
    kind = kind_of(spec)
    if not kind.runnable:
        raise SpecError(f"kind: {spec.kind} jobs run with `facejobs {spec.kind}`, not `facejobs run`")
    rows = kind.input_rows(spec)
    folder = OutputFolder(locate(spec.output.path, spec.storage), run_id=run_id)
    models = lineage.model_hashes(kind.model_files(spec), spec.storage)
    settings = lineage.fingerprint_settings(spec, kind.result_options(spec), models)
    note = lineage.check_rerun(folder, settings, allow_spec_change)
    keys = rows.column("key")
    done = folder.done_keys()
    pending = rows.filter(pc.invert(pc.is_in(keys, value_set=done))) if len(done) else rows
    log.info("%d input rows, %d already done, %d to process", rows.num_rows, rows.num_rows - pending.num_rows,
             pending.num_rows)
    return Plan(folder=folder, input_rows=rows, pending=pending, models=models, settings=settings,
                note=note, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class BlockSizes:
    """How input rows are cut: small work blocks, merged into large parts.

    Attributes:
        work_rows: input rows per CPU-pool call: small, so that every actor
            stays busy to the end of the job.
        part_rows: input rows per output part: at least :data:`MIN_PART_ROWS`
            (or the whole small job), at most 256 rows of images or about
            :data:`PART_BYTES`.
    """

    work_rows: int
    part_rows: int

    def blocks_per(self, rows: int) -> int:
        """Work blocks that make up about ``rows`` input rows (at least one)."""
        return max(1, math.ceil(rows / self.work_rows))


def block_sizes(spec: JobSpec, kind: JobKind, rows: int) -> BlockSizes:
    """Work blocks and parts for ``rows`` input rows (``resources.rows_per_block`` sets both)."""
    if spec.resources.rows_per_block:
        return BlockSizes(spec.resources.rows_per_block, spec.resources.rows_per_block)
    row_bytes = max(1, kind.row_bytes(spec))
    cap = MAX_IMAGE_PART_ROWS if row_bytes >= IMAGE_ROW_BYTES else MAX_PART_ROWS
    cap = max(1, min(cap, PART_BYTES // row_bytes))
    target = min(cap, max(MIN_PART_ROWS, math.ceil(rows / (4 * spec.resources.concurrency))))
    parts = max(1, math.ceil(rows / cap), min(rows // MIN_PART_ROWS, math.ceil(rows / target)))
    part_rows = max(1, math.ceil(rows / parts))
    # About 16 work blocks per CPU actor; a part is a whole number of them, within the cap.
    work_rows = max(1, min(part_rows, max(MIN_WORK_ROWS, math.ceil(rows / (16 * spec.resources.concurrency)))))
    per_part = max(1, min(cap // work_rows, math.ceil(part_rows / work_rows)))
    return BlockSizes(work_rows, work_rows * per_part)


# -- building ----------------------------------------------------------------

def cpu_pool_cpus() -> float | None:
    """CPUs of the live nodes that CPU pools prefer (those not labelled GPU nodes); None if none has CPUs."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    preferred = sum(node.get("Resources", {}).get("CPU", 0.0) for node in nodes
                    if (node.get("Labels") or {}).get(POOL_LABEL) != "gpu")
    return preferred or None


def _cpu_actor_cpus(spec: JobSpec, cpu_actors: int, reserved: float = 0.0) -> float:
    """CPUs per CPU-pool actor: the spec's, or a share that fits every pool beside a reserve
    on the nodes the CPU pools prefer.

    With no such node up (an autoscaling cluster whose CPU group is at zero), one
    CPU per actor: a share sized to the CPUs that happen to be up would be tiny,
    and whole CPUs are what make the autoscaler start CPU nodes.
    """
    if spec.resources.num_cpus is not None:
        return spec.resources.num_cpus
    available = cpu_pool_cpus()
    if available is None:
        return 1.0
    return max(0.1, min(1.0, (available - CPU_RESERVE - reserved) / cpu_actors))


def _model_threads(spec: JobSpec) -> int:
    """Torch threads of a CPU model actor: the cluster's CPUs shared by the model
    actors (each actor caps it at its node's core count).

    Ray gives an actor with a fractional CPU claim one thread, but the CPU actors
    of the align pool finish long before the optimiser does; the model actors
    then have the cores to themselves, and the optimiser scales with threads.
    """
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int(total // spec.resources.model_pool_size))


def _map(dataset: ray.data.Dataset, stages: list[StageSpec], size: int, blocks_per_call: int = 1,
         packed_output: bool = False, pool: str = "cpu_pool", **resources) -> ray.data.Dataset:
    if not resources.get("num_gpus"):
        resources = {**AWAY_FROM_GPU_NODES, **resources}
    return dataset.map_batches(
        Chain,
        fn_constructor_kwargs={"stages": stages, "packed_output": packed_output, "pool": pool},
        # Every row is a packed block: a batch of N rows is N whole blocks.
        batch_size=blocks_per_call,
        batch_format="pyarrow",
        # Two tasks in flight per actor: enough to hide the hand-over, few
        # enough that no actor sits on a queue while another idles at the end.
        compute=ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2),
        **resources,
    )


def _map_model(dataset: ray.data.Dataset, stages: list[StageSpec], size: int, blocks_per_call: int,
               num_cpus: float, resources) -> ray.data.Dataset:
    """The model pool, with a bound on fresh actors after a broken device.

    Ray Data takes ``max_restarts`` only as a deprecated free-form remote argument
    (to be removed in Ray 2.64, with no named replacement yet); where it is gone,
    actors restart without a bound, as Ray Data's own default.
    """
    import warnings

    common = {"blocks_per_call": blocks_per_call, "packed_output": True, "num_cpus": num_cpus,
              "num_gpus": resources.num_gpus, "pool": "model_pool"}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            return _map(dataset, stages, size, max_restarts=resources.model_restarts, **common)
    except TypeError:
        log.warning("this Ray takes no max_restarts: resources.model_restarts is not enforced")
        return _map(dataset, stages, size, **common)


def build(spec: JobSpec, rows: pa.Table, output: OutputFolder, metadata: dict[str, str] | None = None
          ) -> ray.data.Dataset:
    """The lazy dataset that processes ``rows`` (from :func:`plan`) into ``output``.

    The rows are cut into small work blocks that travel between pools packed, one
    block a row (see :func:`pack`); the model pool merges blocks into batches of
    about ``resources.batch_size`` rows, the commit merges them into parts. A block
    never splits, so all the rows of one input key (every face of a photo) land in
    one part. The dataset's rows are the commit records.
    """
    kind = kind_of(spec)
    resources = spec.resources
    sizes = block_sizes(spec, kind, rows.num_rows)
    blocks = [pack(rows.slice(start, sizes.work_rows)) for start in range(0, rows.num_rows, sizes.work_rows)]
    # Packed blocks go into the object store a few dozen to an object: one put per
    # block costs milliseconds, which at 20 000 blocks is most of a minute.
    # An object is one task for one actor: small jobs put a block to an object, so
    # that every actor of the pool has work.
    group = max(1, min(INPUT_BLOCKS_PER_OBJECT, len(blocks) // (8 * resources.concurrency)))
    dataset = ray.data.from_arrow([pa.concat_tables(blocks[start:start + group])
                                   for start in range(0, len(blocks), group)])
    commit = StageSpec(CommitStage, {
        "output_uri": output.location.uri, "storage": spec.storage, "run_id": output.run_id,
        "metadata": {
            "facejobs.kind": spec.kind,
            "facejobs.options": spec.options.model_dump_json(),
            "facejobs.columns": json.dumps(kind.field_docs, sort_keys=True),
            **kind.schema_metadata(spec),
            **(metadata or {}),
        }})
    cpu_pool = min(resources.concurrency, len(blocks))
    parts = math.ceil(rows.num_rows / sizes.part_rows)
    model = kind.model_stage(spec)
    if model is None and sizes.part_rows == sizes.work_rows:
        # A part is one work block (large jobs): commit where the block was made,
        # and the images never travel through the object store.
        return _map(dataset, kind.cpu_stages(spec) + kind.finish_stages(spec) + [commit], cpu_pool,
                    num_cpus=_cpu_actor_cpus(spec, cpu_pool))
    if model is None:
        commit_pool = min(resources.concurrency, parts)
        cpu_share = _cpu_actor_cpus(spec, cpu_pool, reserved=COMMIT_CPUS * commit_pool)
        dataset = _map(dataset, kind.cpu_stages(spec), cpu_pool, packed_output=True, num_cpus=cpu_share)
        return _map(dataset, kind.finish_stages(spec) + [commit], commit_pool,
                    blocks_per_call=sizes.blocks_per(sizes.part_rows), num_cpus=COMMIT_CPUS, pool="commit_pool")
    model_pool = min(resources.model_pool_size, len(blocks))
    model = StageSpec(model.cls, {**model.kwargs, "cpu_threads": _model_threads(spec)})
    # The model merges work blocks up to about one batch, the commit merges those up to a part.
    per_model_call = min(sizes.blocks_per(resources.batch_size), sizes.blocks_per(sizes.part_rows))
    per_commit = max(1, math.ceil(sizes.blocks_per(sizes.part_rows) / per_model_call))
    if resources.num_gpus <= 0:
        # A CPU model actor holds a full CPU share: it also does the CPU work on its
        # own rows (PNG encoding, rig renders); a small pool merges them into parts.
        commit_pool = min(resources.concurrency, math.ceil(len(blocks) / (per_model_call * per_commit)))
        cpu_share = _cpu_actor_cpus(spec, cpu_pool + model_pool, reserved=COMMIT_CPUS * commit_pool)
        dataset = _map(dataset, kind.cpu_stages(spec), cpu_pool, packed_output=True, num_cpus=cpu_share)
        dataset = _map_model(dataset, [model] + kind.finish_stages(spec), model_pool, per_model_call,
                             resources.model_num_cpus or cpu_share, resources)
        return _map(dataset, [commit], commit_pool, blocks_per_call=per_commit, num_cpus=COMMIT_CPUS,
                    pool="commit_pool")
    # A GPU actor holds a sliver of CPU: PNG encoding, rig renders and commits go
    # back to the CPU pool.
    cpu_share = _cpu_actor_cpus(spec, 2 * cpu_pool)
    model_cpus = resources.model_num_cpus or min(cpu_share, GPU_ACTOR_CPUS)
    dataset = _map(dataset, kind.cpu_stages(spec), cpu_pool, packed_output=True, num_cpus=cpu_share)
    dataset = _map_model(dataset, [model], model_pool, per_model_call, model_cpus, resources)
    return _map(dataset, kind.finish_stages(spec) + [commit], cpu_pool, blocks_per_call=per_commit,
                num_cpus=cpu_share, pool="commit_pool")


def _check_gpu_scheduling(spec: JobSpec) -> str | None:
    """With GPUs asked for, ask a task holding one whether it sees CUDA.

    Returns a warning when it does not and ``device`` is ``auto`` (the model runs
    on the CPU); raises when ``device`` is ``cuda``.
    """
    resources = spec.resources
    if resources.num_gpus <= 0 or resources.device == "cpu":
        return None

    @ray.remote(num_gpus=resources.num_gpus, num_cpus=0)
    def cuda_visible() -> bool:
        import torch

        return torch.cuda.is_available()

    try:
        # On an autoscaling cluster the first GPU node may take minutes to start.
        if ray.get(cuda_visible.remote(), timeout=GPU_PROBE_TIMEOUT_S):
            return None
    except ray.exceptions.GetTimeoutError:
        raise JobFailed(f"resources.num_gpus={resources.num_gpus}: no node with a free GPU share came up within "
                        f"{GPU_PROBE_TIMEOUT_S} s") from None
    message = f"resources.num_gpus={resources.num_gpus} but the model actors see no CUDA device"
    if resources.device == "cuda":
        raise JobFailed(f"{message} and resources.device is cuda")
    log.warning("%s: running the model on the CPU", message)
    return f"{message}: the model ran on the CPU"


# -- running -----------------------------------------------------------------

@dataclass
class _Monitor:
    """Commit records in, progress and the systemic error rate out."""

    spec: JobSpec
    progress: Progress
    keys: int = 0
    systemic: int = 0
    errors: Counter = field(default_factory=Counter)
    devices: set = field(default_factory=set)
    placement: dict = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        statuses = json.loads(record["statuses"])
        self.keys += record["keys"]
        self.systemic += record["systemic"]
        if record["sample_error"]:
            self.errors[_error_kind(record["sample_error"])] += 1
        self.devices.update(json.loads(record["devices"]))
        self.placement = merge_placement(self.placement, json.loads(record["placement"] or "{}"))
        self.progress.update(record["keys"], statuses)

    def failure(self) -> str | None:
        """Why the job must stop now, once ``min_rows_checked`` rows are in; None while it may go on."""
        limits = self.spec.limits
        if self.keys < limits.min_rows_checked or self.systemic <= limits.max_error_rate * self.keys:
            return None
        return _too_many_failures(self.systemic, self.keys, limits.max_error_rate, self.errors)


def _too_many_failures(failed: int, rows: int, rate: float, errors: Counter) -> str:
    common = errors.most_common(1)[0][0] if errors else "see the error column"
    return (f"{failed} of {rows} rows failed for a systemic reason (more than limits.max_error_rate={rate:g}); "
            f"most common: {common}")


def _error_kind(message: str) -> str:
    """An error message without the parts that name one object, so that equal causes count together."""
    return message.split(" s3://")[0].split(": /")[0][:300]


def run(spec: JobSpec, *, address: str | None = None, progress: bool = True, verbose: bool = False,
        allow_spec_change: bool = False, run_id: str | None = None) -> RunSummary:
    """Run a job to completion and return its summary.

    Re-running over the same output skips keys already committed. Raises for
    systemic failure only (bad manifest, unreachable output, missing model, a
    spec change, a concurrent run, too many systemic row errors).
    """
    from jobs.lease import Lease

    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    run_id = run_id or f"{started_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    job_plan = plan(spec, run_id=run_id, allow_spec_change=allow_spec_change)
    folder = job_plan.folder
    folder.location.fs.makedirs(folder.location.path, exist_ok=True)
    # The lease renews itself on a thread while held; a run that lost it (it
    # stalled past the lease's ttl and another run took over) stops before it
    # reconciles or writes _SUCCESS.
    with Lease.acquire(folder.location, run_id, info={"kind": spec.kind}) as lease:
        folder.begin()
        try:
            summary = _run_and_reconcile(spec, job_plan, lease, address=address, progress=progress,
                                         verbose=verbose, run_id=run_id, started_at=started_at, started=started)
        finally:
            folder.end()
    return summary


def _run_and_reconcile(spec: JobSpec, job_plan: Plan, lease, *, address: str | None, progress: bool,
                       verbose: bool, run_id: str, started_at: datetime, started: float) -> RunSummary:
    """Process the pending rows, prove the output whole, write ``_SUCCESS``."""
    folder = job_plan.folder
    gpu_note, monitor = _process(spec, job_plan, address, progress, verbose, run_id)
    lease.check()
    reconciled = folder.reconcile(job_plan.input_rows.column("key").combine_chunks())
    # Judged again over the whole output: a job too small to be stopped early, or
    # one that failed slowly, does not end with _SUCCESS either. A rerun that only
    # retried a few missing objects is judged with the rows it resumed past.
    failed = sum(count for status, count in reconciled.status_counts.items() if status in SYSTEMIC_STATUSES)
    if reconciled.output_rows and failed > spec.limits.max_error_rate * reconciled.output_rows:
        raise JobFailed(_too_many_failures(failed, reconciled.output_rows, spec.limits.max_error_rate,
                                           monitor.errors if monitor else Counter()))
    ended_at = datetime.now(timezone.utc)
    nodes = [node for node in ray.nodes() if node.get("Alive")] if ray.is_initialized() else []
    summary = RunSummary(
        kind=spec.kind,
        input_rows=job_plan.input_rows.num_rows,
        processed_rows=job_plan.pending.num_rows,
        resumed_rows=job_plan.input_rows.num_rows - job_plan.pending.num_rows,
        output_rows=reconciled.output_rows,
        status_counts=reconciled.status_counts,
        parts=reconciled.parts,
        seconds=round(time.perf_counter() - started, 3),
        duplicates_removed=reconciled.duplicates_removed,
        extra_keys=reconciled.extra_keys,
        stale_rows=reconciled.stale_rows,
        output=folder.location.uri,
        run_id=run_id,
        lineage={
            "spec": lineage.spec_document(spec),
            "spec_sha256": lineage.spec_sha256(spec),
            "fingerprint": lineage.sha256_text(lineage.canonical(job_plan.settings)),
            "spec_change": job_plan.note,
            "versions": lineage.versions(),
            "models": job_plan.models,
            "started": started_at.isoformat(timespec="seconds"),
            "ended": ended_at.isoformat(timespec="seconds"),
            "planning_seconds": round(job_plan.seconds, 3),
            "driver_host": socket.gethostname(),
            "nodes": len(nodes),
            "gpus": sum(node.get("Resources", {}).get("GPU", 0) for node in nodes),
            "devices": {"cpu_pool": "cpu",
                        "model_pool": sorted(monitor.devices) if monitor else None},
            # The nodes each pool's actors ran on (of this run's rows), and those nodes' labels.
            "placement": monitor.placement if monitor else {},
            "node_labels": {node["NodeID"]: {key: value for key, value in (node.get("Labels") or {}).items()
                                             if not key.startswith("ray.io/")} for node in nodes},
            "warnings": [gpu_note] if gpu_note else [],
        },
    )
    lease.check()
    folder.write_success(summary)
    return summary


def _process(spec: JobSpec, job_plan: Plan, address: str | None, show_progress: bool, verbose: bool,
             run_id: str) -> tuple[str | None, _Monitor | None]:
    """Run the pending rows through the pipeline; returns the GPU note and the monitor."""
    pending = job_plan.pending
    if not pending.num_rows:
        return None, None
    folder = job_plan.folder
    folder.clear_success()  # only now: a rerun with nothing to do keeps it
    lineage.record_run(folder, job_plan.settings, {"run_id": run_id, "started": time.time(),
                                                   "spec_sha256": lineage.spec_sha256(spec)})
    if not ray.is_initialized():
        init_ray(address, verbose)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose and show_progress
    context.print_on_execution_start = verbose
    if not verbose:
        # Ray Data logs its plan, operator stats and "progress bars disabled" notes:
        # the progress line says what a person needs; --verbose shows the rest.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    gpu_note = _check_gpu_scheduling(spec)
    monitor = _Monitor(spec, Progress(pending.num_rows, enabled=show_progress))
    metadata = {"facejobs.run_id": run_id, "facejobs.spec_sha256": lineage.spec_sha256(spec)}
    records = build(spec, pending, folder, metadata).iter_batches(batch_size=None, batch_format="pyarrow")
    failure = None
    try:
        for batch in records:
            for record in batch.to_pylist():
                monitor.add(record)
            failure = monitor.failure()
            if failure:
                break
    except Exception as exc:  # a stage raised: a systemic failure (model will not load...)
        raise JobFailed(f"a {spec.kind} stage failed: {first_real_error(exc)}") from exc
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()  # stops the streaming executor when the job is given up early
        monitor.progress.close()
    if failure:
        # The rows committed so far stay: a rerun after the fix tries the failed
        # ones again (OutputFolder.done_keys) and resumes past the others.
        raise JobFailed(failure)
    log.info("committed %d keys in this run", monitor.keys)
    return gpu_note, monitor
