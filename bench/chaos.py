"""Chaos: the same pinch job on a two-node cluster, clean and with three model actors killed.

A head (2 CPUs) and a GPU-labelled worker (2 CPUs, one logical GPU) on this
machine's loopback (``jobs.local_cluster``). The job is submitted with
``facejobs submit``; its model actors run on the worker (CPU fallback here).
Run 1 goes clean. Run 2, into a fresh output, has three model-actor processes
killed with SIGKILL at random moments within the first 60 % of run 1's time.
Each run is timed by the Jobs server (submission start to end) and checked
exactly-once against its manifest.

    python bench/chaos.py [--images 120] [--seed 7] [--shipped-models]

    RESULT clean_s=... faults_s=... ratio=clean/faults lost=... duplicated=...
Goal: ratio >= 0.7, nothing lost or duplicated.
"""

from __future__ import annotations

from jobs.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before ray is imported

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from jobs.local_cluster import LocalCluster, wait_for
from jobs.manifest import write_manifest
from jobs.samples import photo_copies, sample_photos, tiny_pinch_models

GPU_NODE = {"num_cpus": 2, "num_gpus": 1, "labels": {"facejobs-pool": "gpu"}}


def run_job(cluster: LocalCluster, spec: Path, kills: list[float] | None = None,
            rng: random.Random | None = None) -> tuple[float, list[int]]:
    """Submit, kill a model actor at each of ``kills`` (seconds after the start), wait; (seconds, killed pids)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    started = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", str(spec), "--address",
                              cluster.dashboard_url], capture_output=True, text=True, check=True)
    submission = re.search(r"submitted (\S+)", started.stdout).group(1)
    begun = time.monotonic()
    killed: list[int] = []
    for at in kills or []:
        time.sleep(max(0.0, at - (time.monotonic() - begun)))
        pids = wait_for(lambda: [pid for pid in cluster.model_actor_pids() if pid not in killed], 120,
                        "a live model actor")
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        print(f"  killed model actor pid {victim} at {time.monotonic() - begun:.1f}s", flush=True)
    state = wait_for(lambda: (s := client.get_job_status(submission)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                     3600, "the job to end", every=1)
    if state != "SUCCEEDED":
        raise SystemExit(f"{submission} ended {state}:\n{client.get_job_logs(submission)[-3000:]}")
    info = client.get_job_info(submission)
    return (info.end_time - info.start_time) / 1000, killed


def check(output: Path, keys: list[str]) -> tuple[int, int]:
    """(lost, duplicated) keys of an output against its manifest."""
    frame = pd.read_parquet(output, columns=["key", "status"])
    return len(set(keys) - set(frame.key)), int(frame.key.duplicated().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shipped-models", action="store_true",
                        help="the shipped presets at their default iterations (slower) instead of tiny models")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = photo_copies(sample_photos(), scratch / "in", args.images)
        keys = [path.name for path in paths]
        write_manifest([str(path) for path in paths], str(scratch / "m.parquet"), keys=keys)
        models = {} if args.shipped_models else {"models": tiny_pinch_models(scratch)}
        options = {"size": 64, "render_size": 64} if args.shipped_models else {"max_iterations": 10, "size": 64,
                                                                               "render_size": 64}

        def spec(name: str) -> Path:
            path = scratch / f"{name}.json"
            path.write_text(json.dumps({
                "kind": "pinch", "input": {"manifest": str(scratch / "m.parquet")},
                "output": {"path": str(scratch / name)}, **models, "options": options,
                "resources": {"num_gpus": 0.5, "batch_size": 8, "concurrency": 2, "rows_per_block": 8}}))
            return path

        with LocalCluster([GPU_NODE], head_cpus=2) as cluster:
            clean_s, _ = run_job(cluster, spec("clean"))
            print(f"clean run: {clean_s:.1f}s", flush=True)
            kills = sorted(rng.uniform(0.15, 0.6) * clean_s for _ in range(3))
            faults_s, killed = run_job(cluster, spec("faults"), kills, rng)
            print(f"run with {len(killed)} kills: {faults_s:.1f}s", flush=True)
        lost = duplicated = 0
        for name in ("clean", "faults"):
            missing, doubled = check(scratch / name, keys)
            lost, duplicated = lost + missing, duplicated + doubled
    print(f"RESULT clean_s={clean_s:.1f} faults_s={faults_s:.1f} ratio={clean_s / faults_s:.2f} "
          f"lost={lost} duplicated={duplicated}")


if __name__ == "__main__":
    main()
