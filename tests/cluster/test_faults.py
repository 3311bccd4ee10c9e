"""Faults on a two-node cluster, each followed by the exactly-once check.

Model actors killed with SIGKILL, the GPU worker node stopped and started again,
the driver killed half way, the S3 server restarted mid-job. Every kill is by the
PID of a process this test's own cluster started.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import s3fs

from jobs.output import SYSTEMIC_STATUSES
from tests.cluster.conftest import (
    CLUSTER_CREDENTIALS,
    assert_exactly_once,
    committed_keys,
    facejobs,
    manifest_of,
    photo_copies,
    success,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


def _pinch_spec(tmp_path: Path, tiny_models: dict, **resources) -> Path:
    return write_spec(tmp_path / "pinch.json", {
        "kind": "pinch", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": str(tmp_path / "out")},
        "models": tiny_models, "options": {"max_iterations": 5, "size": 64, "render_size": 64},
        "resources": {"num_gpus": 0.5, "batch_size": 4, "concurrency": 2, **resources}})


def _submit(spec: Path, cluster) -> str:
    started = facejobs("submit", str(spec), address=cluster.dashboard_url)
    assert started.returncode == 0, started.stderr
    return re.search(r"submitted (\S+)", started.stdout).group(1)


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url)


def _final_state(cluster, submission: str, timeout: float = 600) -> str:
    client = _client(cluster)
    return str(wait_for(lambda: (state := client.get_job_status(submission)) in ("SUCCEEDED", "FAILED", "STOPPED")
                        and state, timeout, f"{submission} to end"))


def test_three_model_actors_killed_during_a_job(cluster, photos, tiny_models, tmp_path):
    keys = manifest_of(photo_copies(photos, tmp_path / "in", 60), tmp_path / "m.parquet")
    submission = _submit(_pinch_spec(tmp_path, tiny_models), cluster)
    client = _client(cluster)
    rng = random.Random(11)
    killed: list[int] = []
    for _ in range(3):
        pids = wait_for(lambda: [pid for pid in cluster.model_actor_pids() if pid not in killed], 120,
                        "a live model actor")
        time.sleep(rng.uniform(1.0, 4.0))  # at a random moment of its work
        assert client.get_job_status(submission) == "RUNNING" and len(committed_keys(tmp_path / "out")) < len(keys)
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    assert len(set(killed)) == 3
    assert _final_state(cluster, submission) == "SUCCEEDED"
    assert len(committed_keys(tmp_path / "out")) < 2 * len(keys)  # retried blocks land once (same part name)
    frame = assert_exactly_once(tmp_path / "out", keys)
    assert (frame.status == "ok").all()


def test_the_gpu_node_stopped_mid_job_and_started_again(cluster, photos, tiny_models, tmp_path):
    keys = manifest_of(photo_copies(photos, tmp_path / "in", 60), tmp_path / "m.parquet")
    spec = _pinch_spec(tmp_path, tiny_models, rows_per_block=4)  # many small parts: the job is seen mid-way
    submission = _submit(spec, cluster)
    wait_for(lambda: committed_keys(tmp_path / "out"), 180, "the first committed part")
    assert len(committed_keys(tmp_path / "out")) < len(keys)
    cluster.stop_worker(0)  # the only GPU node: the model pool loses every actor
    time.sleep(5)
    cluster.start_worker(0)
    state = _final_state(cluster, submission)
    print(f"after the node came back the job ended {state}")
    if state != "SUCCEEDED":  # allowed: fail with a clear message, and a rerun finishes the job
        message = _client(cluster).get_job_info(submission).message
        print(f"its message: {message}")
        assert message, "a failed job says why"
        before = set(committed_keys(tmp_path / "out"))
        rerun = facejobs("submit", str(spec), "--wait", address=cluster.dashboard_url)
        assert rerun.returncode == 0, rerun.stdout[-2000:]
        assert success(tmp_path / "out")["processed_rows"] <= len(keys) - len(before)
    assert_exactly_once(tmp_path / "out", keys)


def test_driver_killed_half_way_then_a_rerun_does_only_the_missing_rows(cluster, photos, tmp_path):
    keys = manifest_of(photo_copies(photos, tmp_path / "in", 400), tmp_path / "m.parquet")
    output = tmp_path / "out"
    spec = write_spec(tmp_path / "align.json", {
        "kind": "align", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": str(output)},
        "options": {"size": 64}, "resources": {"concurrency": 2, "rows_per_block": 16}})
    submission = _submit(spec, cluster)
    client = _client(cluster)
    wait_for(lambda: len(committed_keys(output)) >= len(keys) // 2, 300, "half the rows")
    driver = client.get_job_info(submission).driver_info
    os.kill(int(driver.pid), signal.SIGKILL)
    assert _final_state(cluster, submission) == "FAILED"
    time.sleep(3)  # the job's actors end with their driver
    before = set(committed_keys(output))
    assert len(keys) // 2 <= len(before) < len(keys) and not (output / "_SUCCESS").exists()

    rerun = facejobs("submit", str(spec), "--wait", address=cluster.dashboard_url)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    summary = success(output)
    assert summary["resumed_rows"] == len(before)
    assert summary["processed_rows"] == len(keys) - len(before)
    assert_exactly_once(output, keys)


def _s3(url: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": url, "region_name": "eu-west-1"},
                             skip_instance_cache=True)


def _s3_job(tmp_path: Path, photos: dict, url: str, bucket: str, count: int) -> tuple[Path, list[str]]:
    from jobs.manifest import write_manifest
    from jobs.spec import StorageSpec

    fs = _s3(url)
    fs.mkdir(bucket, region_name="eu-west-1")
    paths = photo_copies(photos, tmp_path / "in", count)
    for path in paths:
        fs.put_file(str(path), f"{bucket}/in/{path.name}")
    keys = [path.name for path in paths]
    storage = StorageSpec(endpoint_url=url, region="eu-west-1")
    write_manifest([f"s3://{bucket}/in/{key}" for key in keys], f"s3://{bucket}/m.parquet", keys=keys,
                   storage=storage)
    spec = write_spec(tmp_path / "s3.json", {
        "kind": "align", "input": {"manifest": f"s3://{bucket}/m.parquet"},
        "output": {"path": f"s3://{bucket}/out"}, "storage": {"endpoint_url": url, "region": "eu-west-1"},
        "options": {"size": 64}, "resources": {"concurrency": 2, "rows_per_block": 16}})
    return spec, keys


def _read_s3_output(url: str, bucket: str):
    import pandas as pd

    fs = _s3(url)
    parts = fs.glob(f"{bucket}/out/part-*.parquet")
    frame = pd.concat([pd.read_parquet(fs.open(part, "rb")) for part in parts])
    return frame, json.loads(fs.cat_file(f"{bucket}/out/_SUCCESS"))


def test_the_s3_server_restarted_mid_job_loses_and_fails_nothing(cluster, photos, moto_server, tmp_path):
    url, restart = moto_server
    spec, keys = _s3_job(tmp_path, photos, url, "faults-restart", 200)
    submission = _submit(spec, cluster)
    fs = _s3(url)
    wait_for(lambda: fs.invalidate_cache() or fs.glob("faults-restart/out/part-*.parquet"), 240, "a committed part")
    restart()
    assert _final_state(cluster, submission) == "SUCCEEDED", _client(cluster).get_job_logs(submission)[-3000:]
    frame, summary = _read_s3_output(url, "faults-restart")
    assert sorted(frame.key) == sorted(keys) and not frame.key.duplicated().any()
    assert not frame.status.isin(SYSTEMIC_STATUSES).any(), frame[frame.status.isin(SYSTEMIC_STATUSES)].error.head()
    assert summary["output_rows"] == len(keys)


def test_no_credential_in_specs_logs_metadata_or_outputs(cluster, photos, moto_server, tmp_path):
    """The cluster's processes hold AWS keys (as from an instance role); no text a job leaves may contain them."""
    url, _ = moto_server
    spec, keys = _s3_job(tmp_path, photos, url, "faults-secrets", 12)
    submission = _submit(spec, cluster)
    assert _final_state(cluster, submission) == "SUCCEEDED"
    client = _client(cluster)
    texts = {"job logs": client.get_job_logs(submission),
             "submission": client.get_job_info(submission).model_dump_json(),
             "spec": spec.read_text()}
    fs = _s3(url)
    for path in fs.find("faults-secrets/out"):
        texts[path] = fs.cat_file(path).decode("latin-1")
    for path in Path(cluster.session_dir, "logs").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    assert any(name.endswith("_SUCCESS") for name in texts) and len(texts) > 10
    for secret in CLUSTER_CREDENTIALS.values():
        leaks = [name for name, text in texts.items() if secret in text]
        assert not leaks, f"{secret[:6]}... found in {leaks[:5]}"


def test_every_socket_of_the_cluster_stays_on_loopback_while_a_job_runs(cluster, photos, tmp_path):
    """Every process the cluster started (daemons, workers, job supervisor, driver): listening
    sockets on loopback only, connections only to loopback."""
    import psutil

    manifest_of(photo_copies(photos, tmp_path / "in", 200), tmp_path / "m.parquet")
    spec = write_spec(tmp_path / "align.json", {
        "kind": "align", "input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"path": str(tmp_path / "out")},
        "options": {"size": 64}, "resources": {"concurrency": 2, "rows_per_block": 16}})
    submission = _submit(spec, cluster)
    wait_for(lambda: committed_keys(tmp_path / "out"), 240, "the job under way")

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    listening, remote, processes = [], [], 0
    for process in psutil.Process(cluster.controller_pid).children(recursive=True):
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        processes += 1
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                listening.append((name, connection.laddr.ip, connection.laddr.port))
            elif connection.raddr:
                remote.append((name, connection.raddr.ip, connection.raddr.port))
    assert _final_state(cluster, submission) == "SUCCEEDED"
    assert processes >= 10 and len(listening) >= 8 and remote  # daemons, workers, the driver: seen at work
    assert all(loopback(ip) for _, ip, _ in listening), [entry for entry in listening if not loopback(entry[1])]
    assert all(loopback(ip) for _, ip, _ in remote), [entry for entry in remote if not loopback(entry[1])]
