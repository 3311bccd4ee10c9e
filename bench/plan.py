"""Planning a job over a very large manifest: time and driver memory, 1 M vs 10 M rows.

For each size, synthesises a manifest of ``uri`` + ``key`` and an output folder
holding half of the keys already committed (parts of 256 rows written directly,
as a crashed run leaves them), then, in a fresh driver process, times the
planning phase of ``facejobs run`` up to the first task being submitted: read
the manifest, refuse bad uris, hash the model files, read the done keys, find
the pending rows, and build the Ray dataset (every input block in the object
store, the streaming executor about to start). Ray's own start-up is timed apart.

Goals (issue 10): 10 M rows in <= 60 s, driver peak RSS <= 3 GiB, RSS growth from
1 M to 10 M <= 10x.

    .venv/bin/python bench/plan.py [--sizes 1000000 10000000] [--folder DIR]

Prints ``RESULT rows_1m_s=... rows_10m_s=... rss_10m_gib=... growth=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PART_ROWS = 256


def synthesise(folder: Path, rows: int) -> Path:
    """Manifest and half-done output under ``folder``; returns the spec path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.output import part_name

    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "job.json"
    if spec_path.exists():
        return spec_path
    index = pa.array(np.arange(rows, dtype=np.int64))
    digits = pc.utf8_lpad(pc.cast(index, pa.string()), 10, "0")
    keys = pc.binary_join_element_wise("k", digits, "")
    uris = pc.binary_join_element_wise("/data/photos/2026-11/", digits, ".jpg", "")
    pq.write_table(pa.table({"uri": uris, "key": keys}), folder / "manifest.parquet", row_group_size=1 << 20)
    output = folder / "out"
    output.mkdir(exist_ok=True)
    done = keys.filter(pc.equal(pc.bit_wise_and(index, 1), 0))  # every other key is committed
    for start in range(0, len(done), PART_ROWS):
        part_keys = done.slice(start, PART_ROWS)
        table = pa.table({"key": part_keys, "uri": part_keys, "status": pa.array(["ok"] * len(part_keys)),
                          "error": pa.nulls(len(part_keys), pa.string())})
        pq.write_table(table, output / part_name(part_keys.to_pylist()))
    spec = {"kind": "align", "input": {"manifest": str(folder / "manifest.parquet")},
            "output": {"path": str(output)}, "resources": {"concurrency": 2}}
    spec_path.write_text(json.dumps(spec))
    return spec_path


def child(spec_path: str) -> None:
    """One planning run in this (fresh) process; prints a JSON line."""
    from jobs.loopback import keep_local_ray_on_loopback

    keep_local_ray_on_loopback()
    import ray

    from jobs.pipeline import build, plan
    from jobs.spec import load_spec

    started = time.perf_counter()
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    ray_seconds = time.perf_counter() - started
    started = time.perf_counter()
    spec = load_spec(spec_path)
    job_plan = plan(spec)
    planned = time.perf_counter() - started
    dataset = build(spec, job_plan.pending, job_plan.folder)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": job_plan.input_rows.num_rows, "pending": job_plan.pending.num_rows,
                      "plan_s": planned, "seconds": seconds, "ray_init_s": ray_seconds,
                      "rss_gib": peak_kib / 1024 ** 2, "dataset": type(dataset).__name__}))
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--folder", default=None, help="keep the synthesised data here (reused when present)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    base = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="facejobs-plan-"))
    results = {}
    for rows in args.sizes:
        started = time.perf_counter()
        spec_path = synthesise(base / f"rows-{rows}", rows)
        print(f"{rows} rows: synthesised in {time.perf_counter() - started:.1f} s", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        results[rows] = measured
        print(f"{rows} rows ({measured['pending']} pending): planned in {measured['plan_s']:.1f} s, "
              f"dataset built at {measured['seconds']:.1f} s (Ray start {measured['ray_init_s']:.1f} s apart), "
              f"driver peak RSS {measured['rss_gib']:.2f} GiB", flush=True)
    small, large = min(results), max(results)
    print(f"RESULT rows_1m_s={results[small]['seconds']:.1f} rows_10m_s={results[large]['seconds']:.1f} "
          f"rss_10m_gib={results[large]['rss_gib']:.2f} "
          f"growth={results[large]['rss_gib'] / results[small]['rss_gib']:.2f}")


if __name__ == "__main__":
    main()
