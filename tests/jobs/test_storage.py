"""Reads that ride out a restarting S3 server, fail fast on systemic errors, and fresh listings."""

from __future__ import annotations

import pickle
import socket
import threading
import time

import pytest
import requests
import s3fs

from jobs.spec import StorageSpec
from jobs.storage import (
    AccessDenied,
    NoSuchBucket,
    NotAnObject,
    ObjectNotFound,
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    as_storage_error,
    list_folder,
    locate,
    read_object,
    with_retry,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fs(url: str) -> s3fs.S3FileSystem:
    """An s3fs instance of its own (not fsspec's shared one), like another process would have."""
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": url, "region_name": "eu-west-1"},
                             skip_instance_cache=True)


def _bucket(url: str, name: str) -> s3fs.S3FileSystem:
    fs = _fs(url)
    if not fs.exists(name):
        fs.mkdir(name, region_name="eu-west-1")
    return fs


def _locate(url: str, uri: str):
    return locate(uri, StorageSpec(endpoint_url=url, region="eu-west-1"))


@pytest.fixture
def own_server():
    """A moto server on a port of its own, that a test may stop and start again."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    def restart() -> None:
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    yield f"http://127.0.0.1:{port}", servers[0].stop, restart
    try:
        servers[-1].stop()
    except Exception:  # already stopped by the test
        pass


# --- classification without a server -------------------------------------------


def test_local_files_not_found_folder_and_size_limit(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    assert read_object(locate(str(tmp_path / "a.bin")), max_bytes=4) == b"01234"  # max_bytes + 1
    assert read_object(locate(str(tmp_path / "a.bin")), max_bytes=100) == b"0123456789"
    with pytest.raises(ObjectNotFound, match=r"read .*nope\.bin: object not found") as info:
        read_object(locate(str(tmp_path / "nope.bin")), max_bytes=10)
    assert (info.value.reason, info.value.status, info.value.systemic) == ("not_found", "fetch_error", False)
    with pytest.raises(NotAnObject) as info:
        read_object(locate(str(tmp_path)), max_bytes=10)
    assert info.value.reason == "is_directory"
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        read_object(locate(str(tmp_path / "a.bin")), max_bytes=-1)


def test_with_retry_backs_off_then_gives_up_by_attempts():
    calls, sleeps = [], []

    def refused():
        calls.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")

    policy = RetryPolicy(attempts=4, base_delay_s=0.1, max_delay_s=0.3, deadline_s=60)
    with pytest.raises(StorageUnavailable, match=r"probe: ConnectionRefusedError.*gave up after 4 attempts") as info:
        with_retry(refused, policy, "probe", sleep=sleeps.append)
    assert len(calls) == 4 and info.value.attempts == 4 and info.value.systemic
    # Equal jitter: each delay within [half, all] of min(cap, base * 2**k).
    for delay, full in zip(sleeps, [0.1, 0.2, 0.3]):
        assert full / 2 <= delay <= full


def test_with_retry_stops_at_the_deadline_and_passes_other_errors_through():
    with pytest.raises(StorageUnavailable) as info:
        with_retry(lambda: (_ for _ in ()).throw(TimeoutError("slow")),
                   RetryPolicy(attempts=100, base_delay_s=0.05, max_delay_s=0.05, deadline_s=0.3), "probe")
    # 0.05 s apart within 0.3 s: a handful of tries, far from the 100 allowed (fewer on a loaded machine).
    assert 2 <= info.value.attempts <= 12
    assert info.value.elapsed_s < 5  # 100 tries 0.05 s apart would take 5 s: the deadline ended it
    with pytest.raises(KeyError):  # a bug is not a storage error: raised unchanged, no retries
        with_retry(lambda: {}["x"], RetryPolicy(), "probe")
    answers = iter([ConnectionResetError(104, "reset"), b"ok"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert with_retry(flaky, RetryPolicy(base_delay_s=0.01), "probe") == b"ok"


def test_classification_of_s3_codes():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    def s3(code, http):
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": "m"},
                                                 "ResponseMetadata": {"HTTPStatusCode": http}}, "GetObject"))

    kinds = {code: as_storage_error(s3(code, http), "read x")
             for code, http in [("NoSuchKey", 404), ("NoSuchBucket", 404), ("AccessDenied", 403),
                                ("InvalidAccessKeyId", 403), ("SignatureDoesNotMatch", 403), ("SlowDown", 503),
                                ("InternalError", 500), ("RequestTimeout", 400), ("PermanentRedirect", 301)]}
    assert {code: (type(e).__name__, e.reason, e.transient) for code, e in kinds.items()} == {
        "NoSuchKey": ("ObjectNotFound", "not_found", False),
        "NoSuchBucket": ("NoSuchBucket", "no_such_bucket", False),
        "AccessDenied": ("AccessDenied", "access_denied", False),
        "InvalidAccessKeyId": ("AccessDenied", "invalid_credentials", False),
        "SignatureDoesNotMatch": ("AccessDenied", "signature_mismatch", False),
        "SlowDown": ("_Transient", "unavailable", True),
        "InternalError": ("_Transient", "unavailable", True),
        "RequestTimeout": ("_Transient", "unavailable", True),
        "PermanentRedirect": ("WrongRegion", "wrong_region", False),
    }
    assert as_storage_error(EndpointConnectionError(endpoint_url="http://x")).transient
    assert as_storage_error(OSError(111, "refused")).transient
    # Ray pickles exceptions between processes: the details must survive.
    copy = pickle.loads(pickle.dumps(kinds["InvalidAccessKeyId"]))
    assert (type(copy), str(copy), copy.reason, copy.code, copy.http_status, copy.status) == (
        AccessDenied, str(kinds["InvalidAccessKeyId"]), "invalid_credentials", "InvalidAccessKeyId", 403,
        "storage_error")
    gave_up = pickle.loads(pickle.dumps(StorageUnavailable("down", attempts=3, elapsed_s=1.5)))
    assert (gave_up.attempts, gave_up.elapsed_s, gave_up.reason) == (3, 1.5, "unavailable")


# --- against moto ---------------------------------------------------------------------


def _retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]


def test_read_object_on_s3_small_empty_missing(s3_server, caplog):
    fs = _bucket(s3_server, "storage-read")
    fs.pipe_file("storage-read/a.bin", b"0123456789")
    fs.pipe_file("storage-read/empty.bin", b"")
    fs.pipe_file("storage-read/folder/x.bin", b"x")
    assert read_object(_locate(s3_server, "s3://storage-read/a.bin"), max_bytes=4) == b"01234"
    assert read_object(_locate(s3_server, "s3://storage-read/a.bin"), max_bytes=10) == b"0123456789"
    assert read_object(_locate(s3_server, "s3://storage-read/empty.bin"), max_bytes=10) == b""
    with pytest.raises(NotAnObject, match="is a bucket"):
        read_object(_locate(s3_server, "s3://storage-read"), max_bytes=10)
    caplog.set_level("WARNING", logger="jobs.storage")
    with pytest.raises(ObjectNotFound, match=r"read s3://storage-read/nope.bin: object not found \(NoSuchKey"):
        read_object(_locate(s3_server, "s3://storage-read/nope.bin"), max_bytes=10)
    with pytest.raises(ObjectNotFound):
        read_object(_locate(s3_server, "s3://storage-read/folder"), max_bytes=10)
    with pytest.raises(NoSuchBucket, match="no such bucket") as info:
        read_object(_locate(s3_server, "s3://storage-no-such-bucket/a.bin"), max_bytes=10)
    assert (info.value.status, info.value.systemic, info.value.http_status) == ("storage_error", True, 404)
    assert _retry_warnings(caplog) == []  # none of them is worth a retry


def test_read_object_survives_the_server_restarting_on_the_same_port(own_server, caplog):
    url, stop, restart = own_server
    fs = _bucket(url, "storage-restart")
    fs.pipe_file("storage-restart/photo.jpg", b"\xff\xd8 jpeg bytes")
    location = _locate(url, "s3://storage-restart/photo.jpg")
    assert read_object(location, max_bytes=1024) == b"\xff\xd8 jpeg bytes"  # warm connection pool

    stop()
    result: dict = {}

    def read() -> None:
        start = time.monotonic()
        try:
            result["data"] = read_object(location, max_bytes=1024)
        except Exception as exc:  # reported below
            result["error"] = exc
        result["seconds"] = time.monotonic() - start

    reader = threading.Thread(target=read)
    with caplog.at_level("WARNING", logger="jobs.storage"):
        reader.start()
        time.sleep(1.5)  # down for 1.5 s while the read retries
        restart()  # moto keeps its state in the process: the object is still there
        reader.join(timeout=30)
    assert result.get("error") is None and result["data"] == b"\xff\xd8 jpeg bytes"
    assert result["seconds"] >= 1.5  # it waited the outage out rather than failing
    retries = _retry_warnings(caplog)
    assert len(retries) >= 2 and "read s3://storage-restart/photo.jpg" in retries[0]


def test_read_object_gives_up_on_a_dead_server_within_the_deadline(own_server):
    url, stop, _ = own_server
    location = _locate(url, "s3://storage-dead/photo.jpg")
    # One call while the server is up builds the client (a second or more on a loaded
    # machine), so that the timed read below spends its deadline on refused connections.
    with pytest.raises(StorageError):
        read_object(location, max_bytes=10)
    stop()
    with pytest.raises(StorageUnavailable, match=r"EndpointConnectionError.*gave up after \d+ attempts") as info:
        read_object(location, max_bytes=10, retry=RetryPolicy(attempts=20, base_delay_s=0.1, deadline_s=2.0))
    # The deadline, not the 20 attempts, ended it: no retry was started past 2 s.
    assert 2 <= info.value.attempts < 20


def test_unknown_access_key_is_refused_at_once(own_server, caplog):
    """moto checks signatures once its IAM simulation is switched on (POST /moto-api/reset-auth).

    The switch is process-wide (it would hit the shared s3_server fixture too), so
    it is switched back off before the test ends.
    """
    url, _, _ = own_server
    fs = _bucket(url, "storage-auth")
    fs.pipe_file("storage-auth/a.bin", b"data")
    location = _locate(url, "s3://storage-auth/a.bin")
    previous = requests.post(f"{url}/moto-api/reset-auth", data=b"0").json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    caplog.set_level("WARNING", logger="jobs.storage")
    try:
        with pytest.raises(AccessDenied, match=r"access denied \(InvalidAccessKeyId") as info:
            read_object(location, max_bytes=10)
    finally:
        requests.post(f"{url}/moto-api/reset-auth", data=previous.encode())
    assert _retry_warnings(caplog) == []  # refused on the first answer, not retried
    assert (info.value.reason, info.value.status, info.value.http_status) == ("invalid_credentials",
                                                                             "storage_error", 403)
    assert read_object(location, max_bytes=10) == b"data"  # and moto is open again


def test_list_folder_sees_objects_written_by_another_client(s3_server):
    fs = _bucket(s3_server, "storage-list")
    fs.pipe_file("storage-list/out/part-a.parquet", b"a")
    folder = _locate(s3_server, "s3://storage-list/out")
    assert list_folder(folder) == ["part-a.parquet"]
    assert [p.rsplit("/", 1)[-1] for p in folder.fs.ls(folder.path, detail=False)] == ["part-a.parquet"]

    _fs(s3_server).pipe_file("storage-list/out/part-b.parquet", b"b")  # another process's write
    # The shared instance's cached listing misses it; list_folder does not.
    assert [p.rsplit("/", 1)[-1] for p in folder.fs.ls(folder.path, detail=False)] == ["part-a.parquet"]
    assert list_folder(folder) == ["part-a.parquet", "part-b.parquet"]
    assert list_folder(_locate(s3_server, "s3://storage-list/missing")) == []
    with pytest.raises(NoSuchBucket):
        list_folder(_locate(s3_server, "s3://storage-no-such-bucket/out"))


def test_list_folder_local(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b").write_bytes(b"")
    (tmp_path / "out" / "a").write_bytes(b"")
    assert list_folder(locate(str(tmp_path / "out"))) == ["a", "b"]
    assert list_folder(locate(str(tmp_path / "missing"))) == []
    assert issubclass(StorageUnavailable, StorageError)
