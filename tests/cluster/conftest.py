"""A two-node Ray cluster on this machine's loopback, and jobs submitted to it.

The head (2 CPUs, no labels) holds the drivers of submitted jobs and the CPU
pools; the worker declares one logical GPU and the label
``facejobs-pool=gpu``, like a GPU node of cluster.yaml. The cluster's processes
get AWS credentials of their own (as a node gets them from its instance role):
the security test looks for them everywhere a job leaves text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from jobs.local_cluster import LocalCluster, free_port, wait_for  # noqa: F401 (tests import it from here)
from jobs.manifest import write_manifest
from jobs.output import SYSTEMIC_STATUSES
from jobs.samples import photo_copies, tiny_pinch_models, tiny_regressor  # noqa: F401 (tests import photo_copies from here)

CLUSTER_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAFACEJOBSCLUSTER7Q",
                       "AWS_SECRET_ACCESS_KEY": "facejobs-cluster-secret-4f9d2e61b0c8a7"}
GPU_NODE = {"num_cpus": 2, "num_gpus": 1, "labels": {"facejobs-pool": "gpu"}}
FACEJOBS = [sys.executable, "-m", "jobs.cli"]


@pytest.fixture(scope="module")
def cluster():
    """Per module: ended before the rest of the suite runs, so its idle processes cost nothing later."""
    with LocalCluster([GPU_NODE], head_cpus=2, env=CLUSTER_CREDENTIALS) as local:
        yield local


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Small untrained pinch models: these tests are about placement and faults, not quality.
    With a regressor, so that pinch starts as by default (options.init: recognize)."""
    folder = tmp_path_factory.mktemp("models")
    return {**tiny_pinch_models(folder), "regressor": tiny_regressor(folder / "regressor")}


def manifest_of(paths: list[Path], manifest: Path) -> list[str]:
    keys = [path.name for path in paths]
    write_manifest([str(path) for path in paths], str(manifest), keys=keys)
    return keys


def write_spec(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def facejobs(*args: str, address: str | None = None, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the facejobs CLI as a user would, against the cluster's Jobs API."""
    command = [*FACEJOBS, *args] + (["--address", address] if address else [])
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    environment.update(env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def committed_keys(output: Path) -> list[str]:
    parts = sorted(output.glob("part-*.parquet"))
    return pd.read_parquet(parts, columns=["key"]).key.tolist() if parts else []


def assert_exactly_once(output: Path, keys: list[str]) -> pd.DataFrame:
    """Every input key once (largest face: one row per photo), none failed for a systemic reason, _SUCCESS."""
    frame = pd.read_parquet(output)
    assert not frame.key.duplicated().any(), frame.key[frame.key.duplicated()].tolist()[:5]
    assert sorted(frame.key) == sorted(keys)
    failed = frame[frame.status.isin(SYSTEMIC_STATUSES)]
    assert failed.empty, failed[["key", "status", "error"]].head().to_dict("records")
    assert (output / "_SUCCESS").is_file()
    return frame


def success(output: Path) -> dict:
    return json.loads((output / "_SUCCESS").read_text())


@pytest.fixture
def moto_server():
    """A moto S3 server on a port of its own, that a test may stop and start again."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    def restart():
        servers[-1].stop()
        time.sleep(3)  # down long enough that reads in flight fail and retry
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    yield f"http://127.0.0.1:{port}", restart
    servers[-1].stop()
