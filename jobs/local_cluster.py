"""A multi-node Ray cluster on this machine's loopback, for tests and benchmarks.

Ray's own ``ray start`` refuses a second node unless its multi-machine switch is
on, and with the switch on it moves every "127.0.0.1" to the machine's network
address (see ``jobs.loopback``). So the nodes are started here with
``ray.cluster_utils.Cluster`` in a controller process of their own, with the
switch off: every node, the dashboard and the Jobs API listen on 127.0.0.1 only.

The controller owns exactly the Ray processes it started, and ends exactly those
(by PID, through ``Cluster``): never ``ray stop``, which ends every Ray on the
host. The test or benchmark holding a :class:`LocalCluster` talks to the
controller over its stdin/stdout, one JSON object per line, to stop and start a
worker node mid-job.

    with LocalCluster([{"num_cpus": 2, "num_gpus": 1, "labels": {"facejobs-pool": "gpu"}}]) as cluster:
        client = JobSubmissionClient(cluster.dashboard_url)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Every node gets an object store of this size (Cluster's default, 150 MiB, is
# too small for blocks of decoded photos).
OBJECT_STORE_BYTES = 400 * 1024 * 1024


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    """``predicate()``'s first true value, polled every ``every`` s; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """A Ray head plus worker nodes on 127.0.0.1, run by a controller subprocess.

    Args:
        workers: one dict of node options per worker node (``num_cpus``,
            ``num_gpus``, ``labels``, ``resources``).
        head_cpus: CPUs the head declares (drivers of submitted jobs run there).
        env: extra environment for every Ray process (credentials for a test's
            S3 server, ``RAY_AUTH_MODE``...). The controller's own environment is
            otherwise this process's, with the virtual environment's ``bin`` first
            on PATH so that a job's entrypoint finds ``facejobs``.
    """

    def __init__(self, workers: list[dict[str, Any]], *, head_cpus: int = 2,
                 head_labels: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 start_timeout_s: float = 120) -> None:
        # Auth as the caller says, off otherwise: not inherited (a ray.init() earlier in this
        # process turns token auth on in os.environ for the Ray it started).
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        environment["RAY_AUTH_MODE"] = "disabled"
        environment.update(env or {})
        environment["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        bin_dir = str(Path(sys.executable).parent)
        environment["PATH"] = bin_dir + os.pathsep + environment.get("PATH", "")
        environment["RAY_USAGE_STATS_ENABLED"] = "0"  # a test cluster reports nothing to anyone
        # The dashboard's own metrics port is fixed by default (44227): another Ray would hold it.
        environment["DASHBOARD_METRIC_PORT"] = str(free_port())
        environment.pop("RAY_ADDRESS", None)
        self.env = environment
        self.dashboard_port = free_port()
        # A temp dir of its own: Ray's Jobs server finds its cluster through the
        # "current cluster" file in its temp dir, so two clusters sharing /tmp/ray
        # would send each other's submitted drivers to whichever started last.
        self.temp_dir = tempfile.mkdtemp(prefix="fj-ray-")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "jobs.local_cluster"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=environment, text=True, bufsize=1)
        self._timeout = start_timeout_s
        try:
            started = self._call({"op": "start", "head_cpus": head_cpus, "head_labels": head_labels or {},
                                  "dashboard_port": self.dashboard_port, "workers": workers,
                                  "temp_dir": self.temp_dir})
        except BaseException:
            self.close()
            raise
        self.address: str = started["address"]
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.session_dir: str = started["session_dir"]

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._process.poll() is not None:
            raise RuntimeError(f"the local cluster's controller has exited ({self._process.returncode})")
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the local cluster's controller exited during {request['op']!r}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"local cluster {request['op']}: {answer['error']}")
        return answer

    def stop_worker(self, index: int) -> None:
        """Kill worker node ``index``'s processes (raylet, workers, agents)."""
        self._call({"op": "stop_worker", "index": index})

    def start_worker(self, index: int) -> None:
        """Start worker node ``index`` again with its original options."""
        self._call({"op": "start_worker", "index": index})

    @property
    def controller_pid(self) -> int:
        """The controller's PID: every process of the cluster descends from it."""
        return self._process.pid

    def model_actor_pids(self) -> list[int]:
        """PIDs of the live actors of Ray Data pools that hold GPUs (the model pools)."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True,
                             limit=1000, raise_on_missing_output=False)
        return [actor.pid for actor in actors
                if "MapWorker" in actor.class_name and (actor.required_resources or {}).get("GPU") and actor.pid]

    def pids(self) -> list[int]:
        """PIDs of every Ray process the controller started and that is alive."""
        return self._call({"op": "pids"})["pids"]

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._process.stdin.flush()
                self._process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()  # the Node reapers end the Ray processes when it dies
                self._process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _node_args(options: dict[str, Any]) -> dict[str, Any]:
    # Every agent port chosen here, free: two clusters on one machine (a test's
    # and another) must not meet on a port Ray would otherwise pick or fix.
    return {"num_cpus": options.get("num_cpus", 1), "num_gpus": options.get("num_gpus", 0),
            "labels": options.get("labels") or None, "resources": options.get("resources") or None,
            "node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE_BYTES,
            "runtime_env_agent_port": free_port(), "metrics_export_port": free_port(),
            "metrics_agent_port": free_port(), "dashboard_agent_listen_port": free_port()}


def _address_file_in(temp_dir: str) -> None:
    """Keep Ray's "current cluster" file of this cluster in its own temp dir.

    ``Cluster`` writes the file in the default temp dir (/tmp/ray), where a plain
    ``ray.init()`` on this machine would find it and join this cluster, and
    deletes it at shutdown whoever it names. Ray's Jobs server resolves its
    drivers' address through the file in the node's temp dir: so this cluster's
    file goes there, and /tmp/ray's is left alone. (Patched in this controller
    process only.)
    """
    import ray._common.utils as common_utils
    import ray._private.utils as private_utils

    write, reset = private_utils.write_ray_address, common_utils.reset_ray_address
    private_utils.write_ray_address = lambda address, _=None: write(address, temp_dir)
    common_utils.reset_ray_address = lambda _=None: reset(temp_dir)


def _serve() -> None:
    """The controller: owns a ``Cluster``; answers one JSON line per request."""
    # Answers go to the original stdout; anything Ray prints goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import ray
    from ray.cluster_utils import Cluster

    cluster = None
    temp_dir = None
    workers: dict[int, Any] = {}
    options: list[dict[str, Any]] = []

    def alive_pids() -> list[int]:
        nodes = [cluster.head_node, *workers.values()] if cluster else []
        return sorted(info.process.pid for node in nodes if node is not None
                      for infos in node.all_processes.values() for info in infos
                      if info.process.poll() is None)

    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "start":
                temp_dir = request["temp_dir"]
                _address_file_in(temp_dir)
                cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
                    **_node_args({"num_cpus": request["head_cpus"], "labels": request["head_labels"]}),
                    "include_dashboard": True, "dashboard_host": "127.0.0.1",
                    "dashboard_port": request["dashboard_port"], "temp_dir": temp_dir})
                options = request["workers"]
                for index, node_options in enumerate(options):
                    workers[index] = cluster.add_node(**_node_args(node_options), temp_dir=temp_dir)
                cluster.wait_for_nodes()
                answer = {"address": cluster.address, "session_dir": cluster.head_node.get_session_dir_path()}
            elif op == "stop_worker":
                cluster.remove_node(workers.pop(request["index"]), allow_graceful=False)
                answer = {}
            elif op == "start_worker":
                workers[request["index"]] = cluster.add_node(**_node_args(options[request["index"]]), temp_dir=temp_dir)
                answer = {}
            elif op == "pids":
                answer = {"pids": alive_pids()}
            elif op == "quit":
                break
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # reported to the caller, which raises it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
    if cluster is not None:
        cluster.shutdown()
    del ray


if __name__ == "__main__":
    _serve()
