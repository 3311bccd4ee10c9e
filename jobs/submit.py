"""Jobs on a remote Ray cluster, through the Ray Jobs API.

``facejobs submit SPEC`` sends the spec (and nothing else) to the cluster and
runs ``facejobs run`` there; ``status``, ``logs``, ``stop`` and ``list`` look
after it. One output folder has at most one submission running: submission ids
are ``facejobs-<hash of the output location>-<n>``, so two clients submitting the
same job race for the same id and the Jobs server lets only one of them have it
(the other reports the running one). A job stopped or failed is resumed by the
next submit, which starts submission ``n + 1`` over the committed rows.

Token authentication (``RAY_AUTH_MODE=token`` on the cluster) is Ray's own: set
``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``) where these commands run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import yaml

from jobs.spec import JobSpec, SpecError, anchored_document, location_fields, parse_spec

METADATA_FLAG = "facejobs"  # metadata key that marks a submission as ours
ACTIVE = ("PENDING", "RUNNING")
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")
SPEC_NAME = "spec.yaml"
_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# One progress line of ``facejobs run`` (jobs.progress), and the summary's counts.
_PROGRESS = re.compile(r"(\d+)/(\d+) rows \(\s*\d+%\)[^\r\n]*")
_SUMMARY_ROWS = re.compile(r"output rows\s+(\d+) in (\d+) parts")


class SubmitError(Exception):
    """The cluster cannot be reached, refused a request, or has no such submission."""


def api_address(address: str | None) -> str:
    """The Jobs API address: ``--address``, else ``RAY_API_SERVER_ADDRESS`` or an http ``RAY_ADDRESS``.

    (``RAY_ADDRESS`` on a cluster's nodes is the GCS, ``host:6379``: not the Jobs API.)
    """
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else None))
    if not address:
        raise SubmitError("no cluster address: pass --address http://HOST:8265 (after `ray dashboard cluster.yaml` "
                          "the head's Jobs API is http://127.0.0.1:8265) or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    if urlsplit(address).scheme not in ("http", "https"):
        raise SubmitError(f"--address must be the cluster's Jobs API (http://HOST:8265), got {address!r}")
    return address


def _loopback_url(address: str) -> bool:
    return urlsplit(address).hostname in ("127.0.0.1", "localhost", "::1")


def cluster_on_this_machine(address: str) -> bool:
    """True if every live node of the cluster at ``address`` is this machine.

    The address alone does not say: ``ray dashboard cluster.yaml`` and ``kubectl
    port-forward`` put a remote cluster's Jobs API on this machine's loopback. So
    a loopback address is followed by a look at the cluster's nodes; any other
    address is taken as another machine without a request.
    """
    if not _loopback_url(address):
        return False
    import psutil
    from ray.util.state import list_nodes

    with _client_errors(address):
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    mine = {entry.address.split("%")[0] for entries in psutil.net_if_addrs().values() for entry in entries}

    def here(ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip).is_loopback or ip in mine
        except ValueError:
            return False

    return bool(nodes) and all(here(node.node_ip) for node in nodes)


@contextlib.contextmanager
def _client_errors(address: str) -> Iterator[None]:
    """Ray's client errors (RuntimeError, requests' and aiohttp's) as one SubmitError with the address."""
    try:
        yield
    except SubmitError:
        raise
    except (RuntimeError, OSError, ValueError) as exc:
        raise SubmitError(f"{address}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("requests", "aiohttp", "urllib3", "ray"):
            raise SubmitError(f"{address}: {type(exc).__name__}: {exc}") from None
        raise


def connect(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (the environment cannot redirect an explicit one)."""
    import logging

    from ray.job_submission import JobSubmissionClient

    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # not -v
        # Ray's client logs every package upload and log-stream close at INFO, at a level set on import.
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)
    url = api_address(address)
    saved = {name: os.environ.pop(name) for name in _ADDRESS_VARIABLES if name in os.environ}
    try:
        with _client_errors(url):
            return JobSubmissionClient(url)
    finally:
        os.environ.update(saved)


def output_hash(spec: JobSpec) -> str:
    """A short, stable name for the output folder (the id prefix of its submissions)."""
    return hashlib.sha256(spec.output.path.rstrip("/").encode()).hexdigest()[:12]


def _ours(details) -> bool:
    return bool(details.submission_id) and (details.metadata or {}).get(METADATA_FLAG) == "1"


def _of_output(jobs: list, output: str | None) -> list:
    """The facejobs submissions among ``jobs``, oldest first (optionally those of one output hash)."""
    found = [job for job in jobs if _ours(job)
             and (output is None or job.metadata.get("facejobs.output_hash") == output)]
    return sorted(found, key=lambda job: (job.start_time or 0, job.submission_id))


def submissions(client, output: str | None = None) -> list:
    """facejobs submissions on the cluster, oldest first (optionally those of one output hash)."""
    with _client_errors(client.get_address()):
        return _of_output(client.list_jobs(), output)


def _sequence(submission_id: str) -> int:
    tail = submission_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isascii() and tail.isdigit() else 0


@dataclass(frozen=True)
class Submitted:
    submission_id: str
    started: bool  # False: this output already had a running submission, reported instead


def prepare_spec(path: str | Path, address: str) -> tuple[JobSpec, dict[str, Any]]:
    """The spec as the cluster will read it: relative paths made absolute, checked.

    A spec for a cluster on another machine must not name files that only this
    machine has: every location must be an object-store URI then. Local paths
    pass only for a cluster whose every node is this machine.

    Raises:
        SpecError: naming the field.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML/JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SpecError(f"{path}: a spec is a mapping with a 'kind' field")
    document = anchored_document(document, path.resolve().parent)
    spec = parse_spec(document, source=str(path))
    if spec.kind == "train":
        raise SpecError(f"{path}: kind: train specs are not submitted as batch jobs; run `facejobs train` on the "
                        "cluster (ray job submit -- facejobs train SPEC)")
    local = [(section, field, value) for section, field, value in location_fields(document)
             if len(urlsplit(value).scheme) <= 1 or urlsplit(value).scheme == "file"]
    if local and not cluster_on_this_machine(address):
        section, field, value = local[0]
        raise SpecError(f"{path}: {section}.{field}: {value!r} is a path on this machine; the job runs on the "
                        f"cluster at {address}, whose nodes cannot read it: use an object-store URI (s3://...)")
    return spec, document


def submit(spec_path: str | Path, address: str | None = None, *, run_args: tuple[str, ...] = ()) -> Submitted:
    """Start ``facejobs run`` on the cluster, or report the submission already producing this output."""
    url = api_address(address)
    spec, document = prepare_spec(spec_path, url)
    client = connect(url)
    prefix = f"facejobs-{output_hash(spec)}"
    with _client_errors(url):
        jobs = client.list_jobs()
    running = [job for job in _of_output(jobs, output_hash(spec)) if job.status in ACTIVE]
    if running:
        return Submitted(running[-1].submission_id, started=False)
    # Numbered after every id with the prefix, whoever made it: ids are never reused.
    taken = [_sequence(job.submission_id) for job in jobs if (job.submission_id or "").startswith(prefix + "-")]
    sequence = max(taken, default=0) + 1
    metadata = {METADATA_FLAG: "1", "facejobs.kind": spec.kind, "facejobs.output": spec.output.path,
                "facejobs.output_hash": output_hash(spec), "facejobs.spec": Path(spec_path).name}
    with tempfile.TemporaryDirectory(prefix="facejobs-submit-") as folder:
        # The working directory holds the spec only: nothing else of this machine travels.
        (Path(folder) / SPEC_NAME).write_text(yaml.safe_dump(document, sort_keys=False))
        entrypoint = shlex.join(["facejobs", "run", SPEC_NAME, *run_args])
        for _ in range(5):
            submission_id = f"{prefix}-{sequence}"
            try:
                with _client_errors(url):
                    client.submit_job(entrypoint=entrypoint, submission_id=submission_id, metadata=metadata,
                                      runtime_env={"working_dir": folder})
                return Submitted(submission_id, started=True)
            except SubmitError as exc:
                if "already exists" not in str(exc):
                    raise
            # Another client took this id first: report it if it is running, else take the next.
            with _client_errors(url):
                other = client.get_job_info(submission_id)
            if str(other.status) in ACTIVE:
                return Submitted(submission_id, started=False)
            sequence += 1
    raise SubmitError(f"could not find a free submission id after {prefix}-{sequence - 1}")


def resolve(client, target: str, address: str) -> str:
    """A submission id from an id or a spec file (its output's newest submission)."""
    if not target.endswith((".yaml", ".yml", ".json")) or not Path(target).is_file():
        return target
    spec, _ = prepare_spec(target, address)
    found = submissions(client, output_hash(spec))
    if not found:
        raise SubmitError(f"no facejobs submission for {spec.output.path} on this cluster")
    return found[-1].submission_id


def _details(client, submission_id: str):
    with _client_errors(client.get_address()):
        try:
            return client.get_job_info(submission_id)
        except RuntimeError as exc:  # the Jobs API's answer for an unknown id
            raise SubmitError(f"no submission {submission_id!r} on this cluster ({exc})") from None


@dataclass(frozen=True)
class Status:
    submission_id: str
    state: str
    message: str
    rows_done: int | None  # rows of the manifest processed so far (None: not reported yet)
    rows_total: int | None
    progress: str | None  # the newest progress line as the job printed it
    output: str | None
    output_rows: int | None  # from the finished job's summary
    parts: int | None


def progress_from_logs(logs: str) -> tuple[int | None, int | None, str | None, int | None, int | None]:
    """The newest progress line of ``facejobs run`` logs, and the summary's row and part counts."""
    matches = list(_PROGRESS.finditer(logs))
    done = total = line = None
    if matches:
        last = matches[-1]
        done, total, line = int(last.group(1)), int(last.group(2)), last.group(0).strip()
    summary = _SUMMARY_ROWS.findall(logs)
    output_rows, parts = (int(summary[-1][0]), int(summary[-1][1])) if summary else (None, None)
    return done, total, line, output_rows, parts


def status(client, submission_id: str) -> Status:
    details = _details(client, submission_id)
    with _client_errors(client.get_address()):
        logs = client.get_job_logs(submission_id) if details.status != "PENDING" else ""
    done, total, line, output_rows, parts = progress_from_logs(logs)
    return Status(submission_id, str(details.status), details.message or "", done, total, line,
                  (details.metadata or {}).get("facejobs.output"), output_rows, parts)


def stop(client, submission_id: str) -> bool:
    """Ask the cluster to stop the submission; False if it had already ended."""
    _details(client, submission_id)
    with _client_errors(client.get_address()):
        return bool(client.stop_job(submission_id))


def logs(client, submission_id: str, follow: bool = False) -> Iterator[str]:
    """The submission's log text; with ``follow``, chunks as they come until it ends."""
    _details(client, submission_id)
    if not follow:
        with _client_errors(client.get_address()):
            yield client.get_job_logs(submission_id)
        return

    # tail_job_logs is async; collected chunk by chunk from a private event loop.
    loop = asyncio.new_event_loop()
    try:
        generator = client.tail_job_logs(submission_id).__aiter__()
        while True:
            try:
                with _client_errors(client.get_address()):
                    chunk = loop.run_until_complete(generator.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
