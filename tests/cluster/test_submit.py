"""facejobs submit/status/logs/stop/list and `ray job submit` against a two-node cluster on loopback."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.cluster.conftest import (
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


def _align_spec(tmp_path: Path, manifest: Path, output: Path, **resources) -> Path:
    return write_spec(tmp_path / "align.json", {
        "kind": "align", "input": {"manifest": str(manifest)}, "output": {"path": str(output)},
        "options": {"size": 64}, "resources": {"concurrency": 2, **resources}})


def test_pinch_submitted_runs_its_models_on_the_gpu_node_and_the_rest_elsewhere(cluster, photos, tiny_models,
                                                                               tmp_path):
    keys = manifest_of(photo_copies(photos, tmp_path / "in", 12), tmp_path / "m.parquet")
    output = tmp_path / "out"
    spec = write_spec(tmp_path / "pinch.json", {
        "kind": "pinch", "input": {"manifest": "m.parquet"}, "output": {"path": "out"},  # relative to the spec
        "models": tiny_models, "options": {"max_iterations": 5, "size": 64, "render_size": 64},
        "resources": {"num_gpus": 0.5, "batch_size": 4, "concurrency": 2}})
    done = facejobs("submit", str(spec), "--wait", address=cluster.dashboard_url)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    submission = re.search(r"submitted (facejobs-[0-9a-f]{12}-1)\b", done.stdout).group(1)
    assert f"{submission}: SUCCEEDED" in done.stdout

    assert_exactly_once(output, keys)
    lineage = success(output)["lineage"]
    labels = lineage["node_labels"]
    gpu_nodes = {node for node, node_labels in labels.items() if node_labels.get("facejobs-pool") == "gpu"}
    assert len(labels) == 2 and len(gpu_nodes) == 1, labels
    placement = lineage["placement"]
    assert set(placement["model_pool"]) == gpu_nodes  # model actors only where the GPUs are
    assert placement["cpu_pool"] and not set(placement["cpu_pool"]) & gpu_nodes  # align beside, not on it
    assert placement["commit_pool"] and not set(placement["commit_pool"]) & gpu_nodes
    assert lineage["nodes"] == 2 and lineage["gpus"] == 1

    status = facejobs("status", str(spec), address=cluster.dashboard_url)  # by spec: its newest submission
    assert status.returncode == 0 and f"{submission}: SUCCEEDED" in status.stdout
    assert f"finished  {len(keys)} output rows in" in status.stdout
    assert re.search(rf"rows\s+{len(keys)}/{len(keys)}\s", status.stdout), status.stdout
    listed = facejobs("list", address=cluster.dashboard_url)
    assert re.search(rf"{submission}\s+SUCCEEDED\s+pinch\s", listed.stdout), listed.stdout
    logs = facejobs("logs", submission, address=cluster.dashboard_url)
    assert "pinch job finished in" in logs.stdout

    again = facejobs("submit", str(spec), "--wait", address=cluster.dashboard_url)  # nothing left to do
    assert again.returncode == 0 and f"submitted {submission[:-2]}-2" in again.stdout
    assert "(processed 0, resumed 12)" in again.stdout


def test_stop_then_submit_resumes_from_the_committed_rows(cluster, photos, tmp_path):
    keys = manifest_of(photo_copies(photos, tmp_path / "in", 400), tmp_path / "m.parquet")
    output = tmp_path / "out"
    spec = _align_spec(tmp_path, tmp_path / "m.parquet", output, rows_per_block=16)
    first = facejobs("submit", str(spec), address=cluster.dashboard_url)
    assert first.returncode == 0, first.stderr
    submission = re.search(r"submitted (\S+)", first.stdout).group(1)
    twice = facejobs("submit", str(spec), address=cluster.dashboard_url)  # the same output: not a second job
    assert twice.returncode == 0 and f"{submission} is already producing this output" in twice.stdout

    wait_for(lambda: len(committed_keys(output)) >= 48, 240, "a few committed parts")
    running = facejobs("status", submission, address=cluster.dashboard_url)
    assert f"{submission}: RUNNING" in running.stdout
    stopped = facejobs("stop", submission, address=cluster.dashboard_url)
    assert stopped.returncode == 0 and f"stopping {submission}" in stopped.stdout
    wait_for(lambda: "STOPPED" in facejobs("status", submission, address=cluster.dashboard_url).stdout, 60,
             "the stopped state")
    # SIGTERM ran the driver's cleanup: the lease is released. (Actors still finishing a commit may leave
    # temporaries behind; the next run removes them.)
    wait_for(lambda: not (output / "_LEASE").exists(), 10, "the lease to be released")
    partial = set(committed_keys(output))
    assert 48 <= len(partial) < len(keys) and not (output / "_SUCCESS").exists()

    resumed = facejobs("submit", str(spec), "--wait", address=cluster.dashboard_url)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"submitted {submission[:-2]}-2" in resumed.stdout
    assert_exactly_once(output, keys)
    assert not (output / "_tmp").exists()
    summary = success(output)
    # Parts that were being written when the stop came may land after `partial` was read.
    assert summary["resumed_rows"] >= len(partial) and summary["processed_rows"] == len(keys) - summary["resumed_rows"]
    assert summary["processed_rows"] < len(keys)


def test_ray_job_submit_runs_facejobs_run_on_the_cluster(cluster, photos, tmp_path):
    keys = manifest_of(photo_copies(photos, tmp_path / "in", 10), tmp_path / "m.parquet")
    job = tmp_path / "job"
    job.mkdir()
    # Ray uploads the working directory, so the spec names files by absolute path (this machine is the cluster).
    _align_spec(job, tmp_path / "m.parquet", tmp_path / "out")
    ray = str(Path(__import__("sys").executable).parent / "ray")
    done = subprocess.run([ray, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(job),
                           "--", "facejobs", "run", "align.json"], capture_output=True, text=True, timeout=600,
                          env={**cluster.env, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "align job finished in" in done.stdout
    assert_exactly_once(tmp_path / "out", keys)


def test_nightly_runs_over_a_growing_manifest_do_only_the_new_rows(cluster, photos, tmp_path):
    output = tmp_path / "out"
    spec = _align_spec(tmp_path, tmp_path / "m.parquet", output)
    runs = []
    for night, count in enumerate((10, 16, 25), start=1):  # the manifest grows every day
        keys = manifest_of(photo_copies(photos, tmp_path / "in", count), tmp_path / "m.parquet")
        done = facejobs("submit", str(spec), "--wait", address=cluster.dashboard_url)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert_exactly_once(output, keys)
        runs.append(success(output))
        assert runs[-1]["processed_rows"] == count - (runs[-2]["input_rows"] if night > 1 else 0)
        assert runs[-1]["input_rows"] == runs[-1]["output_rows"] == count
    assert [run["processed_rows"] for run in runs] == [10, 6, 9]
    assert len({run["run_id"] for run in runs}) == 3  # _SUCCESS rewritten by every night


def test_a_spec_for_a_remote_cluster_must_name_object_store_uris(tmp_path, monkeypatch):
    import socket

    from jobs import submit
    from jobs.spec import SpecError

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network call was made: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # refused before any request, not after a failed one
    monkeypatch.setattr(socket, "create_connection", no_network)
    spec = write_spec(tmp_path / "align.json", {"kind": "align", "input": {"manifest": "m.parquet"},
                                                "output": {"path": "s3://bucket/out"}})
    with pytest.raises(SpecError, match=r"input\.manifest: '.*m\.parquet' is a path on this machine.*s3://"):
        submit.submit(spec, "http://ray-head.example:8265")


def test_a_remote_cluster_behind_a_loopback_tunnel_is_not_this_machine(monkeypatch):
    """`ray dashboard` / `kubectl port-forward`: the address is loopback, the nodes are elsewhere."""
    from types import SimpleNamespace

    import ray.util.state

    from jobs import submit

    nodes = [SimpleNamespace(node_ip="127.0.0.1"), SimpleNamespace(node_ip="10.0.3.17")]
    monkeypatch.setattr(ray.util.state, "list_nodes", lambda **kwargs: nodes)
    assert not submit.cluster_on_this_machine("http://127.0.0.1:8265")
    nodes.pop()
    assert submit.cluster_on_this_machine("http://127.0.0.1:8265")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # a node's GCS address is not the Jobs API
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(submit.SubmitError, match="no cluster address"):
        submit.api_address(None)


def test_token_auth_is_required_and_works_with_the_token(photos, tmp_path):
    from jobs.local_cluster import LocalCluster

    token = "facejobs-test-token-" + "3b8e1f9a7c2d4e6f"
    with LocalCluster([], head_cpus=2, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as secured:
        refused = facejobs("list", address=secured.dashboard_url, env={"RAY_AUTH_MODE": "disabled"})
        assert refused.returncode == 1 and "no authentication token was found" in refused.stderr, refused.stderr
        wrong = facejobs("list", address=secured.dashboard_url,
                         env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
        assert wrong.returncode == 1 and "token is invalid or incorrect" in wrong.stderr, wrong.stderr

        keys = manifest_of(photo_copies(photos, tmp_path / "in", 4), tmp_path / "m.parquet")
        spec = _align_spec(tmp_path, tmp_path / "m.parquet", tmp_path / "out")
        with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        done = facejobs("submit", str(spec), "--wait", address=secured.dashboard_url, env=with_token)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert_exactly_once(tmp_path / "out", keys)
        listed = facejobs("list", address=secured.dashboard_url, env=with_token)
        assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout
        submission = re.search(r"submitted (\S+)", done.stdout).group(1)
        shown = facejobs("status", submission, address=secured.dashboard_url, env=with_token).stdout
        texts = {"client output": done.stdout + done.stderr + listed.stdout + shown,
                 "job logs": facejobs("logs", submission, address=secured.dashboard_url, env=with_token).stdout,
                 "_SUCCESS": (tmp_path / "out" / "_SUCCESS").read_text(),
                 "_JOB": (tmp_path / "out" / "_JOB").read_text()}
        texts.update({str(path): path.read_text(errors="replace")
                      for path in Path(secured.session_dir, "logs").rglob("*") if path.is_file()})
        assert "align job finished" in texts["job logs"] and len(texts) > 10
        assert not [name for name, text in texts.items() if token in text]
